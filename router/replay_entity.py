"""``caresync replay entity|window``: re-apply one entity's history through its actor.

An entity's history is the messages on its subjects (``in`` and ``int``) in its partition's
input stream, in stream order, through the offset the store has committed: what the router
applied.  The replay folds all of it from the initial state with the kind's pure ``decide`` and
``evolve``, deduping command ids as the router does and deciding each message with the
reference data in force at its stream time (or the latest, if asked).  Messages before the
replay's start only rebuild the state; the effects of the messages from it on are sorted
against what was sent (see ``replay_diff.py``): the streams are the ledger, the outbox tells
what it still holds.

A dry run computes all of that in memory and writes nothing.  Otherwise the new snapshot, the
dedupe records and the effects go to the store in one transaction: effects already sent are
recorded as sent and never published again; the others wait in the outbox, and the router sends
them once at its next start.  The router of the data dir must be stopped meanwhile.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import nats.js.errors
import structlog

from caresync.actors.contract import Accepted, EntityKind, Registry, Rejected
from caresync.codecs import CodecError, Subjects, encode_token
from caresync.router.decoding import CommandDecoder
from caresync.router.jetstream import JetStreamTransport
from caresync.router.local_fanout import applied_at, as_applied
from caresync.router.outbox_rows import dead_letter_key, dead_letter_row, effect_row
from caresync.router.refdata import RefDataCatalog
from caresync.router.replay_diff import (
    EntityReplay,
    OutcomeChange,
    Recorded,
    classify,
    state_changes,
)
from caresync.router.replay_streams import EntityStreams, Progress
from caresync.router.transport import Inbound
from caresync.store import AppliedRow, BatchWrite, EntityRow, OutboxRow, PartitionedStore, Store
from caresync.store.errors import map_sqlite_error

log = structlog.get_logger("caresync.replay")

_CHUNK = 500


@dataclass(frozen=True, slots=True)
class History:
    """The input messages of one entity, in the order its partition applied them (records of
    local commands at their cause's place), through the committed offset."""

    kind: str
    entity: str
    stream: str
    """The input stream of the entity's partition ("" if no partition has a message for it)."""
    messages: tuple[Inbound, ...]
    through_seq: int
    """The store's committed offset of the stream: later messages are not history yet."""
    truncated: bool
    """The stream no longer starts at sequence 1: older history may be gone."""

    def first_seq_at(self, timestamp_ns: int) -> int | None:
        """Sequence of the first message stored at or after ``timestamp_ns``, or None."""
        return next((m.seq for m in self.messages if m.timestamp_ns >= timestamp_ns), None)


@dataclass(frozen=True, slots=True)
class Touched:
    """An entity with input messages in a time window, and the first of them."""

    kind: str
    entity: str
    stream: str
    first_seq: int
    first_ns: int


@dataclass(slots=True)
class _Fold:
    state: Any
    accepted_any: bool = False
    reapplied: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    last_accepted_seq: int = 0
    first_reapplied_ns: int = 0
    produced: list[OutboxRow] = field(default_factory=list)
    applied: list[AppliedRow] = field(default_factory=list)
    key_prefixes: list[str] = field(default_factory=list)
    """``<command key>:`` of every re-applied command: the prefix of its effects' keys."""
    dlq_keys: list[str] = field(default_factory=list)
    """Dead-letter keys the re-applied messages would have had, produced now or not."""
    error: str = ""


class EntityReplayer:
    """Reads histories and replays entities of one deployment (router stopped)."""

    def __init__(
        self,
        *,
        transport: JetStreamTransport,
        store: PartitionedStore,
        registry: Registry,
        subjects: Subjects,
        catalog: RefDataCatalog,
        current_refdata: bool = False,
        stall_timeout_s: float = 30.0,
    ) -> None:
        self._transport = transport
        self._streams = EntityStreams(transport, subjects, stall_timeout_s=stall_timeout_s)
        self._stores = store
        self._registry = registry
        self._subjects = subjects
        latest = catalog.latest()
        in_force: Callable[[int], Any] = (lambda _ts: latest) if current_refdata else catalog.at
        self._decoder = CommandDecoder(registry, subjects, in_force)
        # With the current data, the effects the data in force produced are what was sent.
        self._baseline = CommandDecoder(registry, subjects, catalog.at) if current_refdata else None
        self._encoder = msgspec.msgpack.Encoder()

    # -- reading ----------------------------------------------------------------------------
    async def history(self, kind: str, entity: str, progress: Progress | None = None) -> History:
        """The entity's input messages through the committed offset (none if it has none)."""
        token = encode_token(entity)
        # Commands applied with their cause (local_fanout.py), to put at their cause's place.
        records = await self._local_records([self._subjects.local_record(kind, entity)])
        partition = await self._streams.partition(kind, token)
        if partition is None and records:  # only ever reached by local commands
            partition = self._subjects.partition_of(kind, entity)
        if partition is None:  # partitioned, and no partition has a message for it
            return History(kind, entity, "", (), 0, False)
        stream = self._subjects.input_stream(partition)
        bound = await self._stores.offset(stream)
        info = await self._transport.js.stream_info(stream)
        truncated = int(info.state.first_seq) > 1
        if bound == 0:
            return History(kind, entity, stream, (), bound, truncated)
        inputs = await self._streams.read(
            stream,
            [self._streams.entity_filter(partition, kind, token)],
            stop=lambda m: m.seq > bound,
            progress=progress,
        )
        subject = self._subjects.internal(kind, entity)
        local = [as_applied(r, subject, stream) for r in records]
        messages = sorted(
            [*inputs, *(m for m in local if m is not None and m.seq <= bound)],
            key=lambda m: (m.seq, m.local_n),
        )
        return History(kind, entity, stream, tuple(messages), bound, truncated)

    async def touched(self, since_ns: int, until_ns: int, kind: str = "") -> list[Touched]:
        """Entities (of ``kind``) with an applied input message stored in [since, until]."""
        found: dict[tuple[str, str], Touched] = {}
        for p in range(self._subjects.partitions):
            stream = self._subjects.input_stream(p)
            bound = await self._stores.offset(stream)
            if bound == 0:
                continue
            filters = [self._streams.entity_filter(p, kind, "*")] if kind else []
            messages = await self._streams.read(
                stream,
                filters,
                start_ns=since_ns,
                headers_only=True,
                stop=functools.partial(_past, bound, until_ns),
            )
            for m in messages:
                if m.timestamp_ns < since_ns:
                    continue
                try:
                    address = self._subjects.parse_address(m.subject)
                except CodecError:
                    continue
                if self._registry.get(address.kind) is None:
                    continue
                key = (address.kind, address.entity)
                if key not in found:
                    found[key] = Touched(
                        address.kind, address.entity, stream, m.seq, m.timestamp_ns
                    )
        await self._touched_locally(found, since_ns, until_ns, kind)
        return sorted(found.values(), key=lambda t: (t.first_ns, t.stream, t.first_seq))

    async def _local_records(
        self, filters: list[str], *, since_ns: int = 0, headers_only: bool = False
    ) -> list[Inbound]:
        """Records of the local stream on ``filters`` (none if the deployment has no local
        stream yet: its router has not run since local fan-out came)."""
        try:
            return await self._streams.read(
                self._subjects.local_stream, filters, start_ns=since_ns, headers_only=headers_only
            )
        except nats.js.errors.NotFoundError:
            return []

    async def _touched_locally(
        self, found: dict[tuple[str, str], Touched], since_ns: int, until_ns: int, kind: str
    ) -> None:
        """Add the entities that commands applied with their cause touched in the window
        (their records are stored after their cause, at or after ``since_ns``)."""
        s = self._subjects
        bounds = {stream: await self._stores.offset(stream) for stream in s.input_streams()}
        records = await self._local_records(
            [s.local_filter(kind)], since_ns=since_ns, headers_only=True
        )
        for r in records:
            at = applied_at(r)
            if at is None:
                continue
            seq, _, ns = at
            try:
                address = s.parse_local(r.subject)
            except CodecError:
                continue
            stream = s.input_stream(s.partition_of(address.kind, address.entity))
            if not since_ns <= ns <= until_ns or seq > bounds.get(stream, 0):
                continue
            key = (address.kind, address.entity)
            first = found.get(key)
            if first is None or (ns, seq) < (first.first_ns, first.first_seq):
                found[key] = Touched(address.kind, address.entity, stream, seq, ns)

    # -- replaying --------------------------------------------------------------------------
    async def replay(self, history: History, *, from_seq: int, dry_run: bool) -> EntityReplay:
        """Fold the history, sort the effects of messages from ``from_seq`` on, and (unless a
        dry run) commit the result.  Problems are reported in ``EntityReplay.error``."""
        spec = self._registry.get(history.kind)
        result = EntityReplay(
            history.kind, history.entity, history.stream, len(history.messages), from_seq=from_seq
        )
        if spec is None:
            result.error = f"unknown entity kind {history.kind!r}"
            return result
        store = self._stores.for_stream(history.stream)  # the entity's partition's file
        stored = await store.entity(history.kind, history.entity)
        result.existed = stored is not None
        result.parked = stored is not None and stored.parked
        fold = self._fold(spec, history, from_seq, self._decoder)
        result.reapplied, result.accepted, result.rejected = (
            fold.reapplied,
            fold.accepted,
            fold.rejected,
        )
        result.duplicates, result.dead_lettered = fold.duplicates, fold.dead_lettered
        if fold.error:
            result.error = fold.error
            return result
        recorded = await self._recorded_outcomes(store, history.kind, history.entity)
        result.outcome_changes = [
            OutcomeChange(row.seq, row.command_id, recorded[row.command_id], row.outcome)
            for row in fold.applied
            if recorded.get(row.command_id, row.outcome) != row.outcome
        ]
        previous: dict[str, str] = {}
        if self._baseline is not None:
            baseline = self._fold(spec, history, from_seq, self._baseline)
            previous.update((row.key, row.subject) for row in baseline.produced)
        produced_keys = [row.key for row in fold.produced]
        outbox = await self._outbox_rows(
            store, [*produced_keys, *previous, *fold.dlq_keys], fold.key_prefixes
        )
        # Rows of these commands that the replay does not produce: sent, or queued, before.
        previous.update((key, rec.subject) for key, rec in outbox.items())
        subjects = {row.key: row.subject for row in fold.produced} | previous
        unconfirmed = {
            k: s for k, s in subjects.items() if k not in outbox or outbox[k].status != "sent"
        }
        prefixes = tuple(fold.key_prefixes)
        anchored = {k for k in unconfirmed if k.startswith(prefixes)} | set(fold.dlq_keys)
        in_streams = await self._streams.sent(unconfirmed, fold.first_reapplied_ns, anchored)
        result.effects = classify(fold.produced, previous, in_streams, outbox)
        before = self._stored_state(spec, stored, result)
        after = msgspec.to_builtins(fold.state) if stored is not None or fold.accepted_any else None
        result.state = state_changes(before, after)
        if history.truncated:
            result.warnings.append(
                f"stream {history.stream} no longer starts at sequence 1: history older than "
                "its first message is gone, the replayed state may lack it"
            )
        if dry_run:
            return result
        if result.parked:
            result.error = (
                f"{history.kind} {history.entity!r} is parked: release it first "
                "(`caresync parked release`)"
            )
        elif history.truncated:
            result.error = f"the history of {history.kind} {history.entity!r} may be incomplete"
        else:
            await self._write(store, history, fold, result, stored)
            result.written = True
        return result

    def _fold(
        self, spec: EntityKind[Any, Any], history: History, from_seq: int, decoder: CommandDecoder
    ) -> _Fold:
        """Apply the whole history in memory; collect what the messages from ``from_seq`` do."""
        fold = _Fold(state=spec.initial(history.entity))
        outcomes: dict[str, str] = {}
        now = time.time()
        subjects, kind, entity = self._subjects, history.kind, history.entity
        for m in history.messages:
            counted = m.seq >= from_seq
            if counted:
                fold.reapplied += 1
                fold.first_reapplied_ns = fold.first_reapplied_ns or m.timestamp_ns
                fold.dlq_keys.append(dead_letter_key(m))
            try:
                prepared = decoder.prepare(m)
            except CodecError as exc:
                if counted:
                    fold.dead_lettered += 1
                    fold.produced.append(dead_letter_row(subjects, m, exc.code, exc.reason))
                continue
            command = prepared.command
            prior = outcomes.get(command.id)
            if prior is not None:  # a dead letter's retry has an id of its own
                fold.duplicates += counted
                continue
            if counted:
                fold.key_prefixes.append(f"{command.key}:")
            try:
                decision = spec.decide(fold.state, command)
                if isinstance(decision, Rejected):
                    outcomes[command.id] = "rejected"
                    if counted:
                        fold.rejected += 1
                        fold.applied.append(
                            AppliedRow(
                                command.id, kind, entity, m.seq, "rejected", decision.reason, now
                            )
                        )
                        fold.produced.append(
                            dead_letter_row(subjects, m, decision.code, decision.reason)
                        )
                    continue
                if not isinstance(decision, Accepted):
                    raise TypeError(f"decide returned {type(decision).__name__}")
                fold.state = spec.apply(fold.state, decision.events)
            except Exception as exc:
                fold.error = (
                    f"seq {m.seq} (command {command.id}): {type(exc).__name__}: {exc}; "
                    "the router parks the entity on such a message"
                )
                return fold
            outcomes[command.id] = "accepted"
            fold.accepted_any = True
            fold.last_accepted_seq = m.seq
            if counted:
                fold.accepted += 1
                fold.applied.append(
                    AppliedRow(command.id, kind, entity, m.seq, "accepted", "", now)
                )
                fold.produced.extend(
                    effect_row(subjects, kind, command, e) for e in decision.effects
                )
        return fold

    def _stored_state(
        self, spec: EntityKind[Any, Any], stored: EntityRow | None, result: EntityReplay
    ) -> Any:
        if stored is None:
            return None
        try:
            return msgspec.to_builtins(msgspec.msgpack.decode(stored.state, type=spec.state_type))
        except msgspec.DecodeError as exc:
            result.warnings.append(f"the stored snapshot does not decode: {exc}")
            return None

    async def _write(
        self,
        store: Store,
        history: History,
        fold: _Fold,
        result: EntityReplay,
        stored: EntityRow | None,
    ) -> None:
        """Snapshot, dedupe records and effects of one entity, in one transaction."""
        write = BatchWrite()
        if result.state_changed and (stored is not None or fold.accepted_any):
            seq = fold.last_accepted_seq or (stored.seq if stored is not None else 0)
            state = self._encoder.encode(fold.state)
            write.entities.append(EntityRow(history.kind, history.entity, state, False, seq))
        write.applied = fold.applied
        sent = {e.key for e in result.effects.already_sent}
        # Existing rows keep their status (ON CONFLICT DO NOTHING): nothing sent is resent.
        write.outbox = [
            msgspec.structs.replace(row, sent=True) if row.key in sent else row
            for row in fold.produced
        ]
        await store.commit(write)
        if result.outcome_changes:
            await self._record_outcomes(store, history, fold, result.outcome_changes)
        log.info(
            "entity_replayed",
            kind=history.kind,
            entity=history.entity,
            from_seq=result.from_seq,
            queued=sum(1 for e in result.effects.would_send if e.status == "new"),
            state_changed=result.state_changed,
        )

    async def _recorded_outcomes(self, store: Store, kind: str, entity: str) -> dict[str, str]:
        """Command id to recorded outcome, for every dedupe record of the entity."""
        try:
            async with store.connection.execute(
                "SELECT command_id, outcome FROM applied WHERE kind = ? AND entity = ?",
                (kind, entity),
            ) as cur:
                return {str(c): str(o) for c, o in await cur.fetchall()}
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "reading dedupe records") from exc

    async def _record_outcomes(
        self, store: Store, history: History, fold: _Fold, changes: Sequence[OutcomeChange]
    ) -> None:
        """Dedupe records say what the replay did: a command accepted now must not stay
        "rejected" (verdicts, reports and later replays read these records)."""
        rows = {row.command_id: row for row in fold.applied}
        params = [
            (
                change.after,
                rows[change.command_id].reason,
                history.kind,
                history.entity,
                change.command_id,
            )
            for change in changes
        ]
        conn = store.connection
        async with store.write_lock:
            try:
                try:
                    await conn.execute("BEGIN IMMEDIATE")
                    await conn.executemany(
                        "UPDATE applied SET outcome = ?, reason = ? "
                        "WHERE kind = ? AND entity = ? AND command_id = ?",
                        params,
                    )
                    await conn.execute("COMMIT")
                except BaseException:
                    with anyio.CancelScope(shield=True), contextlib.suppress(sqlite3.Error):
                        await conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise map_sqlite_error(exc, "recording outcomes") from exc

    # -- what was sent ----------------------------------------------------------------------
    async def _outbox_rows(
        self, store: Store, keys: Iterable[str], prefixes: Sequence[str]
    ) -> dict[str, Recorded]:
        """Outbox rows with one of ``keys``, or a key starting with one of ``prefixes``."""
        conn = store.connection
        sql = "SELECT key, subject, status, payload FROM outbox WHERE "
        found: dict[str, Recorded] = {}
        queries: list[tuple[str, Sequence[str]]] = []
        wanted = list(dict.fromkeys(keys))
        for i in range(0, len(wanted), _CHUNK):
            chunk = wanted[i : i + _CHUNK]
            queries.append((sql + f"key IN ({','.join('?' * len(chunk))})", chunk))
        for prefix in dict.fromkeys(prefixes):
            # Keys compare as bytes: [prefix, prefix with its last character + 1) is the prefix.
            upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            queries.append((sql + "key >= ? AND key < ?", (prefix, upper)))
        try:
            for query, params in queries:
                async with conn.execute(query, params) as cur:
                    for key, subject, status, payload in await cur.fetchall():
                        found[str(key)] = Recorded(str(subject), str(status), bytes(payload))
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "reading the outbox") from exc
        return found


def _past(through_seq: int, until_ns: int, message: Inbound) -> bool:
    return message.seq > through_seq or message.timestamp_ns > until_ns
