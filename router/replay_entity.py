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
import dataclasses
import functools
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import anyio
import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js import api

from caresync.actors.contract import Accepted, EntityKind, Registry, Rejected
from caresync.codecs import CodecError, Subjects, encode_token
from caresync.codecs.errors import DecodeError
from caresync.codecs.refdata import decode_refdata_set
from caresync.router.decoding import CommandDecoder
from caresync.router.errors import RouterError
from caresync.router.jetstream import JetStreamConsumer, JetStreamTransport
from caresync.router.outbox_rows import dead_letter_row, effect_row
from caresync.router.refdata import RefDataCatalog
from caresync.router.replay_diff import (
    EntityReplay,
    OutcomeChange,
    Recorded,
    classify,
    state_changes,
)
from caresync.router.transport import Inbound
from caresync.store import AppliedRow, BatchWrite, EntityRow, OutboxRow, Store
from caresync.store.errors import map_sqlite_error

log = structlog.get_logger("caresync.replay")

# Effects are stored after their cause; the margin covers clocks of different stream leaders.
_CLOCK_MARGIN_NS = 60 * 1_000_000_000
_BATCH = 500
_CHUNK = 500


class Progress(Protocol):
    """Where a replay reports how many messages it has to read and has read."""

    def expect(self, messages: int) -> None:
        """``messages`` more to read (negative: fewer than announced)."""
        ...

    def advance(self, messages: int) -> None:
        """``messages`` more read."""
        ...


@dataclass(frozen=True, slots=True)
class History:
    """The input messages of one entity, in stream order, through the committed offset."""

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
        store: Store,
        registry: Registry,
        subjects: Subjects,
        catalog: RefDataCatalog,
        current_refdata: bool = False,
        stall_timeout_s: float = 30.0,
    ) -> None:
        self._transport = transport
        self._store = store
        self._registry = registry
        self._subjects = subjects
        self._stall_timeout_s = stall_timeout_s
        latest = catalog.latest()
        in_force: Callable[[int], Any] = (lambda _ts: latest) if current_refdata else catalog.at
        self._decoder = CommandDecoder(registry, subjects, in_force)
        # With the current data, the effects the data in force produced are what was sent.
        self._baseline = CommandDecoder(registry, subjects, catalog.at) if current_refdata else None
        self._encoder = msgspec.msgpack.Encoder()
        self._partitions: dict[tuple[str, str], int | None] = {}

    # -- reading ----------------------------------------------------------------------------
    async def history(self, kind: str, entity: str, progress: Progress | None = None) -> History:
        """The entity's input messages through the committed offset (none if it has none)."""
        token = encode_token(entity)
        partition = await self._partition(kind, token)
        if partition is None:  # partitioned, and no partition has a message for it
            return History(kind, entity, "", (), 0, False)
        stream = self._subjects.input_stream(partition)
        bound = await self._store.offset(stream)
        info = await self._transport.js.stream_info(stream)
        truncated = int(info.state.first_seq) > 1
        if bound == 0:
            return History(kind, entity, stream, (), bound, truncated)
        messages = await self._read(
            stream,
            [self._entity_filter(partition, kind, token)],
            stop=lambda m: m.seq > bound,
            progress=progress,
        )
        return History(kind, entity, stream, tuple(messages), bound, truncated)

    async def touched(self, since_ns: int, until_ns: int, kind: str = "") -> list[Touched]:
        """Entities (of ``kind``) with an applied input message stored in [since, until]."""
        found: dict[tuple[str, str], Touched] = {}
        for p in range(self._subjects.partitions):
            stream = self._subjects.input_stream(p)
            bound = await self._store.offset(stream)
            if bound == 0:
                continue
            filters = [self._entity_filter(p, kind, "*")] if kind else []
            messages = await self._read(
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
        return sorted(found.values(), key=lambda t: (t.first_ns, t.stream, t.first_seq))

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
        stored = await self._store.entity(history.kind, history.entity)
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
        recorded = await self._recorded_outcomes(history.kind, history.entity)
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
            [*produced_keys, *previous, *fold.dlq_keys], fold.key_prefixes
        )
        # Rows of these commands that the replay does not produce: sent, or queued, before.
        previous.update((key, rec.subject) for key, rec in outbox.items())
        subjects = {row.key: row.subject for row in fold.produced} | previous
        unconfirmed = {
            k: s for k, s in subjects.items() if k not in outbox or outbox[k].status != "sent"
        }
        prefixes = tuple(fold.key_prefixes)
        anchored = {k for k in unconfirmed if k.startswith(prefixes)} | set(fold.dlq_keys)
        in_streams = await self._sent(unconfirmed, fold.first_reapplied_ns, anchored)
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
            await self._write(history, fold, result, stored)
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
                fold.dlq_keys.append(f"dlq:{m.stream}:{m.seq}")
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
        self, history: History, fold: _Fold, result: EntityReplay, stored: EntityRow | None
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
            dataclasses.replace(row, sent=True) if row.key in sent else row for row in fold.produced
        ]
        await self._store.commit(write)
        if result.outcome_changes:
            await self._record_outcomes(history, fold, result.outcome_changes)
        log.info(
            "entity_replayed",
            kind=history.kind,
            entity=history.entity,
            from_seq=result.from_seq,
            queued=sum(1 for e in result.effects.would_send if e.status == "new"),
            state_changed=result.state_changed,
        )

    async def _recorded_outcomes(self, kind: str, entity: str) -> dict[str, str]:
        """Command id to recorded outcome, for every dedupe record of the entity."""
        try:
            async with self._store.connection.execute(
                "SELECT command_id, outcome FROM applied WHERE kind = ? AND entity = ?",
                (kind, entity),
            ) as cur:
                return {str(c): str(o) for c, o in await cur.fetchall()}
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "reading dedupe records") from exc

    async def _record_outcomes(
        self, history: History, fold: _Fold, changes: Sequence[OutcomeChange]
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
        conn = self._store.connection
        async with self._store.write_lock:
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
        self, keys: Iterable[str], prefixes: Sequence[str]
    ) -> dict[str, Recorded]:
        """Outbox rows with one of ``keys``, or a key starting with one of ``prefixes``."""
        conn = self._store.connection
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

    async def _sent(self, wanted: dict[str, str], since_ns: int, anchored: set[str]) -> set[str]:
        """Which of ``wanted`` (key to subject) are Msg-Ids on their subject in the streams.

        An effect is stored after the message that caused it, so a stream is read from the
        first re-applied message's time on, unless it may hold a key that is not ``anchored``
        to a re-applied command (a purchase order is keyed by its threshold crossing, which an
        earlier command may have caused): that stream is read from its start.
        """
        filters: dict[str, set[str]] = {}
        from_start: set[str] = set()
        for key, subject in wanted.items():
            where = await self._stored_at(subject)
            if where is not None:
                filters.setdefault(where[0], set()).add(where[1])
                if key not in anchored:
                    from_start.add(where[0])
        found: set[str] = set()
        for stream, subjects in filters.items():
            start_ns = 0
            if since_ns and stream not in from_start:
                start_ns = max(0, since_ns - _CLOCK_MARGIN_NS)
            for m in await self._read(
                stream, sorted(subjects), start_ns=start_ns, headers_only=True
            ):
                msg_id = (m.headers or {}).get("Nats-Msg-Id", "")
                if msg_id in wanted:
                    found.add(msg_id)
        return found

    async def _stored_at(self, subject: str) -> tuple[str, str] | None:
        """The stream that stores ``subject``, and the subject as stored (partitions map it)."""
        s = self._subjects
        head = f"{s.prefix}."
        if not subject.startswith(head):
            return None
        rest = subject[len(head) :]
        role = rest.split(".", 1)[0]
        if role in ("in", "int"):
            if s.partitions == 1:
                return s.input_stream(0), subject
            parts = rest.split(".")
            if len(parts) != 3:
                return None
            partition = await self._partition(parts[1], parts[2])
            if partition is None:
                return None
            return s.input_stream(partition), f"{s.prefix}.part.{partition}.{rest}"
        if role == "out":
            return s.output_stream, subject
        if role == "dlq":
            return s.dead_letter_stream, subject
        return None

    # -- streams ----------------------------------------------------------------------------
    def _entity_filter(self, partition: int, kind: str, token: str) -> str:
        s = self._subjects
        if s.partitions == 1:
            return f"{s.prefix}.*.{kind}.{token}"
        return f"{s.prefix}.part.{partition}.*.{kind}.{token}"

    async def _partition(self, kind: str, token: str) -> int | None:
        """The partition holding messages of an entity (None if no partition has any).

        Asked of the streams rather than computed, so it does not depend on reproducing the
        server's partition hash.
        """
        if self._subjects.partitions == 1:
            return 0
        key = (kind, token)
        if key not in self._partitions:
            self._partitions[key] = None
            for p in range(self._subjects.partitions):
                info = await self._transport.js.stream_info(
                    self._subjects.input_stream(p),
                    subjects_filter=self._entity_filter(p, kind, token),
                )
                if info.state.subjects:
                    self._partitions[key] = p
                    break
        return self._partitions[key]

    async def _read(
        self,
        stream: str,
        filters: list[str],
        *,
        start_ns: int = 0,
        headers_only: bool = False,
        stop: Callable[[Inbound], bool] | None = None,
        progress: Progress | None = None,
    ) -> list[Inbound]:
        """Messages of ``stream`` on ``filters`` (all if empty) from ``start_ns`` (or the first),
        in order, until the first for which ``stop`` is true (excluded) or the end."""
        js = self._transport.js
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_TIME if start_ns else api.DeliverPolicy.ALL,
            opt_start_time=datetime.fromtimestamp(start_ns / 1e9, UTC) if start_ns else None,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
            headers_only=headers_only or None,
            inactive_threshold=30.0,
            mem_storage=True,
        )
        info = await js.add_consumer(stream, config=config)
        expected = int(info.num_pending or 0)
        out: list[Inbound] = []
        reader = JetStreamConsumer(
            self._transport.nc, stream, info.name, batch=_BATCH, expires_s=1.0, ack=False
        )
        if progress is not None:
            progress.expect(expected)
        seen = 0
        try:
            await reader.start()
            stalled_since = time.monotonic()
            while seen < expected:
                batch = await reader.next_batch(_BATCH, 1.0)
                if not batch:
                    if time.monotonic() - stalled_since > self._stall_timeout_s:
                        raise RouterError(
                            f"reading {stream} stalled after {seen} of {expected} messages"
                        )
                    continue
                stalled_since = time.monotonic()
                done = False
                for m in batch:
                    if stop is not None and stop(m):
                        done = True
                        break
                    out.append(m)
                seen += len(batch)
                if progress is not None:
                    progress.advance(len(batch))
                if done:
                    break
        finally:
            if progress is not None and seen < expected:
                progress.expect(min(seen, expected) - expected)
            with anyio.CancelScope(shield=True):
                await reader.close()
                try:
                    await js.delete_consumer(stream, info.name)
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    log.debug("replay_reader_delete_failed", stream=stream, error=repr(exc))
        return out


async def read_catalog(
    transport: JetStreamTransport,
    store: Store,
    subjects: Subjects,
    *,
    stall_timeout_s: float = 30.0,
) -> RefDataCatalog:
    """Every reference-data version, from the store and the refdata stream; writes nothing.

    (The router's follower also keeps the versions it reads; a dry run must not.)
    """
    catalog = RefDataCatalog()
    await catalog.restore(store)
    stream = subjects.refdata_stream
    last = await transport.last_seq(stream)
    if last <= catalog.latest_version:
        return catalog
    reader = await transport.open_reader(stream, catalog.latest_version + 1)
    try:
        seen = catalog.latest_version
        stalled_since = time.monotonic()
        while seen < last:
            batch = await reader.next_batch(64, 1.0)
            if not batch:
                if time.monotonic() - stalled_since > stall_timeout_s:
                    raise RouterError(f"reading {stream} stalled at seq {seen} of {last}")
                continue
            stalled_since = time.monotonic()
            for m in batch:
                seen = max(seen, m.seq)
                try:
                    dataset = decode_refdata_set(m.data)
                except DecodeError as exc:
                    log.error("refdata_message_unreadable", seq=m.seq, error=exc.reason)
                    continue
                catalog.add(m.seq, m.timestamp_ns or _loaded_at_ns(dataset.loaded_at), dataset)
    finally:
        await reader.close()
    return catalog


def _past(through_seq: int, until_ns: int, message: Inbound) -> bool:
    return message.seq > through_seq or message.timestamp_ns > until_ns


def _loaded_at_ns(loaded_at: datetime) -> int:
    return (loaded_at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000
