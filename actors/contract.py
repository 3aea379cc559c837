"""The actor contract: what every entity kind provides, and what ``decide`` may return.

An entity kind is an id, an empty state, ``decide(state, command) -> Accepted | Rejected``
and ``evolve(state, event) -> state``.  Both are pure: no awaits, no I/O, no clock reads (time
comes in the command), no randomness.  The runtime in ``caresync.router`` does all I/O, applies
commands of one entity strictly in order, skips command ids it has already applied, and
persists the new state, the dedupe record and the effects in one transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import msgspec

S = TypeVar("S")
E = TypeVar("E")
P = TypeVar("P")


_MAX_KEY_BASE = 160


class Command(msgspec.Struct, Generic[P], kw_only=True, frozen=True):
    """A request to change one entity, with its typed payload."""

    id: str
    name: str
    entity: str
    occurred_at: datetime
    payload: P
    correlation_id: str = ""
    causation_id: str = ""
    source: str = ""
    refdata: Any = None
    """The reference data in force when the message entered the log
    (a :class:`caresync.actors.refdata.RefData`, attached by the runtime), or None."""

    @property
    def key(self) -> str:
        """The base of this command's effect keys: unique per entity, not only per id.

        Dedupe is per entity, so two entities may receive commands with the same id; their
        effects must still have different idempotency keys.  Long bases are hashed so that
        effect keys stay within the envelope's id limit.
        """
        base = f"{self.entity}/{self.id}"
        if len(base) <= _MAX_KEY_BASE:
            return base
        return "h:" + hashlib.sha256(base.encode()).hexdigest()[:40]


class ActorRef(msgspec.Struct, frozen=True, tag="actor"):
    """An effect target that is another actor: ``kind`` and entity id."""

    kind: str
    entity: str


class Downstream(msgspec.Struct, frozen=True, tag="downstream"):
    """An effect target that is a downstream system (billing, erp, supply), keyed."""

    system: str
    key: str


Target = ActorRef | Downstream


class Effect(msgspec.Struct, kw_only=True, frozen=True):
    """A message an accepted command sends on: to another actor or a downstream system.

    ``key`` is the idempotency key: deterministic from the command and the target, so that
    sending the effect again (after a crash or in a replay) changes nothing.
    """

    target: Target
    name: str
    key: str
    payload: Any = None


class Accepted(msgspec.Struct, Generic[E], frozen=True):
    """``decide`` accepted the command: the events to record and the effects to send."""

    events: tuple[E, ...] = ()
    effects: tuple[Effect, ...] = ()


class Rejected(msgspec.Struct, frozen=True):
    """``decide`` refused the command; ``reason`` is shown to operators as is."""

    reason: str
    code: str = "rejected"


Decision = Accepted[E] | Rejected


def effect_key(command_id: str, *parts: str) -> str:
    """The idempotency key of an effect: the causing command id plus what tells it apart."""
    return ":".join((command_id, *parts))


@dataclass(frozen=True)
class EntityKind(Generic[S, E]):
    """Everything the runtime needs to host one entity kind."""

    name: str
    state_type: type[S]
    commands: Mapping[str, type[Any]]
    """Command name (the part after the dot in ``Envelope.kind``) to its payload type."""
    initial: Callable[[str], S]
    decide: Callable[[S, Command[Any]], Accepted[E] | Rejected]
    evolve: Callable[[S, E], S]
    schema_version: int = 1
    """Highest payload schema version this kind understands; newer ones are rejected."""
    description: str = ""

    def apply(self, state: S, events: Iterable[E]) -> S:
        """Fold events into a state with ``evolve``."""
        for event in events:
            state = self.evolve(state, event)
        return state


@dataclass(frozen=True)
class Registry:
    """The entity kinds one router hosts; built explicitly, never a global."""

    kinds: Mapping[str, EntityKind[Any, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, *kinds: EntityKind[Any, Any]) -> Registry:
        """A registry of the given kinds (names must be unique)."""
        by_name: dict[str, EntityKind[Any, Any]] = {}
        for kind in kinds:
            if kind.name in by_name:
                raise ValueError(f"entity kind {kind.name!r} registered twice")
            by_name[kind.name] = kind
        return cls(kinds=by_name)

    def get(self, name: str) -> EntityKind[Any, Any] | None:
        """The kind called ``name``, or None."""
        return self.kinds.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.kinds
