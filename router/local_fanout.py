"""Local fan-out: a command for an entity of the same partition is applied with its cause.

An accepted command's effects include commands to other actors (``cs.int.<kind>.<id>``).  When
the target lives in the same partition as the cause, the partition applies it at once, right
after the cause and before the next input message, depth first (its own local commands right
after it), in the same batch and the same store transaction.  Only targets in other
partitions wait for the stream.  This saves a whole pipeline cycle per hop: a booking's tree
(appointment, then supply, ERP, billing and procedures, then items) is applied in the batch of
the booking.

Every internal command is still published, as before, once its batch is committed: a command
for another partition on ``cs.int.<kind>.<id>`` to that partition's input stream; a command
applied locally on ``cs.loc.<kind>.<id>`` to the stream ``<PREFIX>_LOCAL``, as a *record* that no
router reads, with the header ``Caresync-Applied-At: <seq>.<n>.<ns>``: applied as the n-th local
command after the input message at position ``seq`` of its partition's input stream, stored at
``ns`` (the time it was decided at, for the reference data in force).  The input streams and the
local stream together are the log of everything the router decided: a rebuild derives the
records again from their causes, exactly as the live partition did; ``replay entity`` reads
both streams and puts each record at its place.

The order is a function of the stream alone, never of batch boundaries or timing, which is
what makes a rebuild reproduce the live state:
- input messages in stream order; each one's local commands right after it, depth first, in
  the order of its effects;
- a local command is deduped like any other (by kind, entity and command id);
- a command whose target already parked within the same tree goes through the stream instead
  (a parked message is kept by stream position, and a tree has only one);
- a command that does not decode (an actor bug) goes through the stream and dead-letters there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from caresync.actors.contract import ActorRef, Command, Effect
from caresync.codecs import CodecError, Subjects, encode_envelope
from caresync.router.decoding import CommandDecoder, Prepared
from caresync.router.outbox_rows import effect_envelope
from caresync.router.transport import Inbound
from caresync.store import OutboxRow

H_APPLIED_AT = "Caresync-Applied-At"
"""Header of an internal command applied locally: ``<root's stream seq>.<n>.<root's time>``."""


@dataclass(slots=True)
class Tree:
    """The local commands derived from one input message (its root)."""

    root: Inbound
    count: int = 0
    """Local commands applied so far (the n of the next one is ``count + 1``)."""
    parked: set[tuple[str, str]] = field(default_factory=set)
    """Entities that parked a local command of this tree."""


def applied_at(message: Inbound) -> tuple[int, int, int] | None:
    """(root seq, n, root time) of a record of a local command; None for another message."""
    headers = message.headers
    if not headers:
        return None
    value = headers.get(H_APPLIED_AT)
    if value is None:
        return None
    parts = value.split(".")
    try:
        seq, n, ns = (int(part) for part in parts)
    except ValueError:
        return None
    return seq, n, ns


def as_applied(record: Inbound, subject: str, stream: str) -> Inbound | None:
    """A record as its partition applied it: on its internal ``subject``, at its root's
    position in the input ``stream`` and its root's time (``replay entity`` orders a history by
    this); None if it has no valid header."""
    at = applied_at(record)
    if at is None:
        return None
    seq, n, ns = at
    return Inbound(subject, record.data, record.headers, stream, seq, "", ns, n)


class LocalFanout:
    """Splits an accepted command's effects into outbox rows and commands to apply now."""

    def __init__(self, subjects: Subjects, decoder: CommandDecoder, partition: int) -> None:
        self._subjects = subjects
        self._decoder = decoder
        self._partition = partition

    def targets(self, effects: Iterable[Effect]) -> list[tuple[str, str]]:
        """The entities of this partition that ``effects`` send commands to (those that may be
        applied now: the worker reads the ones it does not hold in one query)."""
        partition, of = self._partition, self._subjects.partition_of
        return [
            (t.kind, t.entity)
            for t in (e.target for e in effects)
            if isinstance(t, ActorRef) and of(t.kind, t.entity) == partition
        ]

    def local(
        self, source_kind: str, command: Command[Any], effect: Effect, tree: Tree
    ) -> tuple[OutboxRow, Prepared | None]:
        """The outbox row of one effect, and the command to apply now if it is local.

        A local command's row is its record (on the local stream, with the header); the prepared
        command carries a message that stands at its root's stream position and time."""
        subject, envelope, fmt = effect_envelope(self._subjects, source_kind, command, effect)
        row = OutboxRow(effect.key, subject, encode_envelope(envelope, fmt))
        target = effect.target
        if not isinstance(target, ActorRef):
            return row, None
        key = (target.kind, target.entity)
        if key in tree.parked or self._subjects.partition_of(*key) != self._partition:
            return row, None
        root = tree.root
        n = tree.count + 1
        headers = {H_APPLIED_AT: f"{root.seq}.{n}.{root.timestamp_ns}"}
        message = Inbound(
            row.subject, row.payload, headers, root.stream, root.seq, "", root.timestamp_ns, n
        )
        try:
            # The command as the stream would give it, without decoding what was just encoded.
            prepared = self._decoder.prepare_local(message, target.kind, envelope)
        except CodecError:
            return row, None
        tree.count += 1
        record = self._subjects.local_record(*key)
        return OutboxRow(row.key, record, row.payload, dict(headers)), prepared
