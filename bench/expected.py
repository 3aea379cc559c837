"""What the router must do with a workload: the pure actors, run in-process like the router.

Every published message is decoded as the router decodes it (envelope, then the kind's typed
payload decoder), skipped if its ``(kind, entity, command id)`` was applied before, decided
with the bench reference data, and its effects followed to the end: an effect to another actor
is encoded in msgpack and decoded with the target's payload type (as it travels on
``<prefix>.int.<kind>.<id>``), then decided in turn; an effect to a downstream system is
recorded.  The result is, per published message, every internal command of its tree (all hops)
and every downstream effect, with the idempotency key each must be published under.

The outcome does not depend on how the router interleaves entities: an appointment hears only
its own commands, in order; billing, supply and ERP are the appointment's own (keyed like it)
and hear only it; items never order (the bench stock never reaches a reorder point).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from caresync.actors import Accepted, ActorRef, Command, Effect, default_registry
from caresync.actors.refdata import RefData
from caresync.codecs import Subjects, WireFormat, decode_envelope

Address = tuple[str, str, str]
"""(kind, entity, command id): a row of the store's ``applied`` table."""


@dataclass(frozen=True, slots=True)
class Sent:
    """One effect as it must be published: Msg-Id, envelope kind and entity, plain payload."""

    key: str
    kind: str
    """``<target kind>.<command>`` or ``<system>.<operation>``."""
    entity: str
    causation_id: str
    payload: Any

    @property
    def address(self) -> Address:
        """Where an internal command is applied: (target kind, entity, its id = the key)."""
        return (self.kind.partition(".")[0], self.entity, self.key)


@dataclass(slots=True)
class Outcome:
    """What one published message causes once everything it leads to is applied."""

    kind: str
    entity: str
    command_id: str
    duplicate: bool = False
    internal: list[Sent] = field(default_factory=list)
    """Every internal command of its tree, all hops, in the order they are decided."""
    downstream: list[Sent] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    @property
    def address(self) -> Address:
        """Where the message itself is applied."""
        return (self.kind, self.entity, self.command_id)


class PureRouter:
    """Every actor's state, and the commands applied; no broker, no store."""

    def __init__(self, subjects: Subjects, refdata: RefData) -> None:
        self._subjects = subjects
        self.refdata = refdata
        self._registry = default_registry()
        self._json = {
            (k.name, name): msgspec.json.Decoder(t)
            for k in self._registry.kinds.values()
            for name, t in k.commands.items()
        }
        self._msgpack = {
            (k.name, name): msgspec.msgpack.Decoder(t)
            for k in self._registry.kinds.values()
            for name, t in k.commands.items()
        }
        self.states: dict[tuple[str, str], Any] = {}
        self.applied: set[Address] = set()

    def send(self, subject: str, data: bytes) -> Outcome:
        """One published message (a source command), followed until every effect is applied."""
        address = self._subjects.parse_address(subject)
        env, fmt = decode_envelope(data)
        raw = env.payload_bytes
        key = (address.kind, env.command)
        payload = (
            msgspec.convert({}, self._json[key].type)
            if not raw
            else self._json[key].decode(raw)
            if fmt is WireFormat.JSON
            else self._msgpack[key].decode(raw)
        )
        first = Command(
            id=env.id,
            name=env.command,
            entity=env.entity,
            occurred_at=env.occurred_at,
            payload=payload,
            correlation_id=env.correlation,
            causation_id=env.causation_id,
            source=env.source,
            refdata=self.refdata,
        )
        outcome = Outcome(address.kind, env.entity, env.id)
        if (address.kind, env.entity, env.id) in self.applied:
            outcome.duplicate = True
            return outcome
        queue: deque[tuple[str, Command[Any]]] = deque([(address.kind, first)])
        while queue:
            kind, command = queue.popleft()
            if (kind, command.entity, command.id) in self.applied:
                continue  # an internal command sent twice: the router's dedupe skips it
            self.applied.add((kind, command.entity, command.id))
            spec = self._registry.kinds[kind]
            state = self.states.get((kind, command.entity))
            if state is None:
                state = spec.initial(command.entity)
            decision = spec.decide(state, command)
            if not isinstance(decision, Accepted):
                outcome.rejected.append(f"{kind}:{command.entity}: {decision.reason}")
                continue
            self.states[(kind, command.entity)] = spec.apply(state, decision.events)
            for effect in decision.effects:
                sent = _sent(effect, command)
                if isinstance(effect.target, ActorRef):
                    outcome.internal.append(sent)
                    queue.append((effect.target.kind, self._internal(kind, command, effect)))
                else:
                    outcome.downstream.append(sent)
        return outcome

    def _internal(self, kind: str, cause: Command[Any], effect: Effect) -> Command[Any]:
        target = effect.target
        assert isinstance(target, ActorRef)
        raw = msgspec.msgpack.encode(effect.payload if effect.payload is not None else {})
        return Command(
            id=effect.key,
            name=effect.name,
            entity=target.entity,
            occurred_at=cause.occurred_at,
            payload=self._msgpack[(target.kind, effect.name)].decode(raw),
            correlation_id=cause.correlation_id or cause.id,
            causation_id=cause.id,
            source=f"caresync/{kind}",
            refdata=self.refdata,
        )


def _sent(effect: Effect, cause: Command[Any]) -> Sent:
    payload = effect.payload if effect.payload is not None else {}
    target = effect.target
    if isinstance(target, ActorRef):
        return Sent(
            effect.key,
            f"{target.kind}.{effect.name}",
            target.entity,
            cause.id,
            msgspec.msgpack.decode(msgspec.msgpack.encode(payload)),
        )
    return Sent(
        effect.key,
        f"{target.system}.{effect.name}",
        target.key,
        cause.id,
        msgspec.json.decode(msgspec.json.encode(payload)),
    )


@dataclass(slots=True)
class Expected:
    """Everything the router must have done after a run, from the pure outcomes."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    """Per source command id (first send), what it caused."""
    applied: set[Address] = field(default_factory=set)
    internal: dict[str, Sent] = field(default_factory=dict)
    """Internal commands by Msg-Id."""
    internal_sent: int = 0
    """Internal commands sent (more than ``len(internal)`` only if a key were sent twice)."""
    downstream: dict[str, Sent] = field(default_factory=dict)
    downstream_sent: int = 0
    accepted: int = 0
    """Commands applied with outcome accepted: unique sources and every internal command."""
    rejected: int = 0
    duplicates: int = 0

    def add(self, outcome: Outcome) -> None:
        """Count one published message's outcome."""
        if outcome.duplicate:
            self.duplicates += 1
            return
        self.outcomes.setdefault(outcome.command_id, outcome)
        addresses = [outcome.address, *(s.address for s in outcome.internal)]
        self.applied.update(addresses)
        self.rejected += len(outcome.rejected)
        self.accepted += len(addresses) - len(outcome.rejected)
        self.internal_sent += len(outcome.internal)
        self.internal.update((s.key, s) for s in outcome.internal)
        self.downstream_sent += len(outcome.downstream)
        self.downstream.update((s.key, s) for s in outcome.downstream)


def combine(parts: Iterable[Expected]) -> Expected:
    """The expectations of several runs through one model, together."""
    out = Expected()
    for part in parts:
        out.outcomes.update(part.outcomes)
        out.applied |= part.applied
        out.internal.update(part.internal)
        out.internal_sent += part.internal_sent
        out.downstream.update(part.downstream)
        out.downstream_sent += part.downstream_sent
        out.accepted += part.accepted
        out.rejected += part.rejected
        out.duplicates += part.duplicates
    return out


def run_pure(
    pure: PureRouter, messages: Iterable[tuple[str, bytes]], into: Expected | None = None
) -> Expected:
    """Send ``messages`` (subject, data) in order through ``pure``; add their outcomes."""
    expected = into if into is not None else Expected()
    for subject, data in messages:
        expected.add(pure.send(subject, data))
    return expected


def fanout_by_kind(
    outcomes: Mapping[str, Outcome], kind_of: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """Per workload kind (``kind_of``: command id -> kind): commands, and per command the
    internal commands by target (all hops), their total, and the downstream effects."""
    by_kind: dict[str, list[Outcome]] = {}
    for cid, kind in kind_of.items():
        if cid in outcomes:
            by_kind.setdefault(kind, []).append(outcomes[cid])
    out: dict[str, dict[str, Any]] = {}
    for kind, group in by_kind.items():
        n = len(group)
        targets: Counter[str] = Counter(s.kind for o in group for s in o.internal)
        out[kind] = {
            "commands": n,
            "internal": round(sum(len(o.internal) for o in group) / n, 3),
            "from_appointment": round(
                sum(1 for o in group for s in o.internal if s.causation_id == o.command_id) / n, 3
            ),
            "by_target": {t: round(c / n, 3) for t, c in sorted(targets.items())},
            "downstream": round(sum(len(o.downstream) for o in group) / n, 3),
        }
    return out
