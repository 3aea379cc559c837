"""What an entity replay found: effects to send, effects already sent, and how the state moved.

An effect is identified by its idempotency key.  A replay sorts the effects its re-applied
messages produce against what the streams and the outbox already hold:

* **would send**: never sent (``new``), or waiting in the outbox (``queued``); a replay that is
  not a dry run queues the new ones, and the router sends them once at its next start;
* **already sent**: the key is in its stream (or recorded as sent): never sent again, even when
  its content now differs (``changed``), because a receiver dedupes by key;
* **no longer produced**: sent (or queued) earlier by these messages, not produced now;
  a replay cannot take it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Literal

from caresync.store import OutboxRow

EffectStatus = Literal["new", "queued", "sent", "failed"]


@dataclass(frozen=True, slots=True)
class Recorded:
    """An outbox row as the store holds it."""

    subject: str
    status: str
    """``pending``, ``sent`` or ``failed``."""
    payload: bytes


@dataclass(frozen=True, slots=True)
class EffectLine:
    """One effect of a replay and where it stands."""

    key: str
    subject: str
    status: EffectStatus
    changed: bool | None = None
    """For an effect sent or queued: whether the replay produced other content than the one
    recorded (None when the outbox no longer holds it)."""

    def as_dict(self) -> dict[str, Any]:
        """A plain dict for JSON output."""
        return {
            "key": self.key,
            "subject": self.subject,
            "status": self.status,
            "changed": self.changed,
        }


@dataclass(frozen=True, slots=True)
class EffectDiff:
    """The effects of a replay, sorted against what was sent."""

    would_send: tuple[EffectLine, ...] = ()
    already_sent: tuple[EffectLine, ...] = ()
    no_longer_produced: tuple[EffectLine, ...] = ()
    undeliverable: tuple[EffectLine, ...] = ()
    """Recorded as failed (no stream stores the subject): the router does not retry them."""

    @property
    def changed_sent(self) -> int:
        """Effects already sent whose content the replay would change (they stay as sent)."""
        return sum(1 for e in self.already_sent if e.changed)

    def as_dict(self) -> dict[str, Any]:
        """A plain dict for JSON output."""
        return {
            "would_send": [e.as_dict() for e in self.would_send],
            "already_sent": [e.as_dict() for e in self.already_sent],
            "no_longer_produced": [e.as_dict() for e in self.no_longer_produced],
            "undeliverable": [e.as_dict() for e in self.undeliverable],
        }


def classify(
    produced: Sequence[OutboxRow],
    previous: Mapping[str, str],
    in_streams: Set[str],
    outbox: Mapping[str, Recorded],
) -> EffectDiff:
    """Sort ``produced`` rows (and ``previous`` effects, key to subject) against the streams'
    Msg-Ids ``in_streams`` and the outbox rows ``outbox`` (by key)."""
    would_send: list[EffectLine] = []
    sent: list[EffectLine] = []
    failed: list[EffectLine] = []
    keys: set[str] = set()
    for row in produced:
        if row.key in keys:
            continue
        keys.add(row.key)
        recorded = outbox.get(row.key)
        changed = None if recorded is None else recorded.payload != row.payload
        if row.key in in_streams or (recorded is not None and recorded.status == "sent"):
            sent.append(EffectLine(row.key, row.subject, "sent", changed))
        elif recorded is None:
            would_send.append(EffectLine(row.key, row.subject, "new"))
        elif recorded.status == "failed":
            failed.append(EffectLine(row.key, row.subject, "failed", changed))
        else:
            would_send.append(EffectLine(row.key, row.subject, "queued", changed))
    gone: list[EffectLine] = []
    for key, subject in sorted(previous.items()):
        if key in keys:
            continue
        recorded = outbox.get(key)
        if key in in_streams or (recorded is not None and recorded.status == "sent"):
            gone.append(EffectLine(key, subject, "sent"))
        elif recorded is not None and recorded.status == "pending":
            gone.append(EffectLine(key, subject, "queued"))
    return EffectDiff(tuple(would_send), tuple(sent), tuple(gone), tuple(failed))


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field of the state that a replay changes (a dotted path into the state)."""

    path: str
    before: Any
    after: Any

    def as_dict(self) -> dict[str, Any]:
        """A plain dict for JSON output."""
        return {"path": self.path, "before": self.before, "after": self.after}


_ABSENT = object()


def state_changes(before: Any, after: Any, path: str = "") -> list[FieldChange]:
    """The fields that differ between two states given as builtins (``msgspec.to_builtins``).

    Mappings are compared field by field, down to the leaves; anything else (lists included)
    is one value.  A state that did not exist is ``None``.
    """
    if before == after:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        changes: list[FieldChange] = []
        for name in dict.fromkeys([*before, *after]):
            sub = f"{path}.{name}" if path else str(name)
            changes += state_changes(before.get(name, _ABSENT), after.get(name, _ABSENT), sub)
        return changes
    return [
        FieldChange(
            path or "(state)",
            None if before is _ABSENT else before,
            None if after is _ABSENT else after,
        )
    ]


@dataclass(frozen=True, slots=True)
class OutcomeChange:
    """A re-applied command whose outcome differs from the one recorded (its dedupe record)."""

    seq: int
    command_id: str
    before: str
    after: str

    def as_dict(self) -> dict[str, Any]:
        """A plain dict for JSON output."""
        return {
            "seq": self.seq,
            "command_id": self.command_id,
            "before": self.before,
            "after": self.after,
        }


@dataclass(slots=True)
class EntityReplay:
    """What replaying one entity did (or, in a dry run, would do)."""

    kind: str
    id: str
    stream: str = ""
    messages: int = 0
    """Messages in the entity's history (through the store's committed offset)."""
    reapplied: int = 0
    """Messages from ``from_seq`` on: the ones whose effects count."""
    from_seq: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    outcome_changes: list[OutcomeChange] = field(default_factory=list)
    effects: EffectDiff = field(default_factory=EffectDiff)
    state: list[FieldChange] = field(default_factory=list)
    existed: bool = False
    """Whether the store held a snapshot of the entity."""
    parked: bool = False
    written: bool = False
    """A snapshot, dedupe records and outbox rows were committed (never in a dry run)."""
    error: str = ""
    """Why the entity could not be replayed (nothing was written for it)."""
    warnings: list[str] = field(default_factory=list)

    @property
    def state_changed(self) -> bool:
        """Whether the replayed state differs from the stored snapshot."""
        return bool(self.state)

    def as_dict(self) -> dict[str, Any]:
        """A plain dict for JSON output."""
        return {
            "kind": self.kind,
            "id": self.id,
            "stream": self.stream,
            "messages": self.messages,
            "reapplied": self.reapplied,
            "from_seq": self.from_seq,
            "outcomes": {
                "accepted": self.accepted,
                "rejected": self.rejected,
                "duplicates": self.duplicates,
                "dead_lettered": self.dead_lettered,
            },
            "outcome_changes": [c.as_dict() for c in self.outcome_changes],
            "effects": self.effects.as_dict(),
            "state": {
                "changed": self.state_changed,
                "existed": self.existed,
                "fields": [c.as_dict() for c in self.state],
            },
            "parked": self.parked,
            "written": self.written,
            "error": self.error,
            "warnings": list(self.warnings),
        }


def totals(replays: Sequence[EntityReplay]) -> dict[str, int]:
    """Sums over several entity replays, for summaries."""
    return {
        "entities": len(replays),
        "messages": sum(r.messages for r in replays),
        "reapplied": sum(r.reapplied for r in replays),
        "would_send": sum(len(r.effects.would_send) for r in replays),
        "already_sent": sum(len(r.effects.already_sent) for r in replays),
        "changed_sent": sum(r.effects.changed_sent for r in replays),
        "no_longer_produced": sum(len(r.effects.no_longer_produced) for r in replays),
        "state_changed": sum(1 for r in replays if r.state_changed),
        "written": sum(1 for r in replays if r.written),
        "errors": sum(1 for r in replays if r.error),
    }
