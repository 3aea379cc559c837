"""Plain records the store reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec


class EntityRow(msgspec.Struct, frozen=True, gc=False):
    """The snapshot of one entity: written with each batch that changes it, read on load.

    Fields in the order of the table's columns (``batch_write`` inserts them as they are)."""

    kind: str
    id: str
    state: bytes
    parked: bool
    seq: int


class AppliedRow(msgspec.Struct, frozen=True, gc=False):
    """A dedupe record: this command id reached a final outcome.

    Fields in the order of the table's columns (``batch_write`` inserts them as they are)."""

    command_id: str
    kind: str
    entity: str
    seq: int
    outcome: str
    reason: str
    applied_at: float


class OutboxRow(msgspec.Struct, frozen=True, gc=False):
    """A message to publish with ``Nats-Msg-Id`` = ``key``."""

    key: str
    subject: str
    payload: bytes
    headers: dict[str, str] | None = None
    sent: bool = False
    """Already in its stream (found there by a rebuild): recorded as sent, never published."""


class PendingEffect(msgspec.Struct, frozen=True, gc=False):
    """An outbox row read back for publishing."""

    seq: int
    key: str
    subject: str
    payload: bytes
    headers: dict[str, str] | None
    attempts: int


class ParkedRow(msgspec.Struct, frozen=True, gc=False):
    """A message held back because its entity is parked."""

    kind: str
    id: str
    stream: str
    seq: int
    command_id: str
    subject: str
    data: bytes
    headers: dict[str, str] | None
    reason: str
    failures: int
    parked_at: float
    timestamp_ns: int = 0
    """When the input stream stored it (decides the reference data in force); 0 if unknown."""


@dataclass(slots=True)
class BatchWrite:
    """Everything one pulled batch changes, committed in one transaction."""

    entities: list[EntityRow] = field(default_factory=list)
    applied: list[AppliedRow] = field(default_factory=list)
    outbox: list[OutboxRow] = field(default_factory=list)
    parked: list[ParkedRow] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)
    sent: list[tuple[str, float]] = field(default_factory=list)
    """Outbox keys confirmed by a PubAck, with the time; marked sent in this transaction."""
    sent_ranges: list[tuple[int, int, float]] = field(default_factory=list)
    """Outbox seq ranges (first, last, time) of whole batches confirmed: one UPDATE each."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """Outbox keys that cannot be published (no stream for the subject), with the error."""
    released: list[tuple[str, str, str, int]] = field(default_factory=list)
    """Parked messages (kind, id, stream, seq) that a release applied: no longer parked."""

    def __bool__(self) -> bool:
        return bool(
            self.entities
            or self.applied
            or self.outbox
            or self.parked
            or self.offsets
            or self.sent
            or self.sent_ranges
            or self.failed
            or self.released
        )
