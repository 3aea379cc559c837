"""``replay rebuild`` as a fold: one partition's input stream applied in memory, in big chunks.

The live pipeline (:mod:`caresync.router.worker`) runs a task per entity, supervises it and
commits every batch; a rebuild reads a log that is already in order and publishes nothing, so
it needs none of that.  The fold reads the stream in big batches, keeps entity states in a
dict, applies each command with its kind's pure ``decide``/``evolve`` and commits one
transaction per chunk of about :data:`CHUNK_MESSAGES` messages: the snapshots changed since the
last chunk (encoded once), the dedupe records, outbox rows, parked messages and the offset.  A
fold stopped between chunks resumes from the committed offset, as the pipeline does.

It writes what the pipeline's replay writes, message for message (:mod:`.replay_fold_apply`
decides each one).  Windows of ``batch_size`` messages stand in for the pipeline's batches
where those show: a command id is a duplicate if its entity applied or rejected it before, or
if it came earlier in the same window (a parked one too); a window's dead letters of messages
that do not decode come first among its outbox rows.  A pipeline that pulls full batches has
the same batches.

Rows the outbox already has are kept as they are by the store, so the fold does not build them
again (:func:`outbox_keys`), and asks which effects the streams hold (a scan of every stream)
only when a row is new: a rebuild over a whole outbox reads the input streams alone.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable, Set
from typing import Any

import anyio
import msgspec
import structlog

from caresync.actors.contract import Registry
from caresync.codecs import CodecError, Subjects
from caresync.router.decoding import CommandDecoder, Prepared
from caresync.router.local_fanout import LocalFanout
from caresync.router.outbox_rows import undecodable_row
from caresync.router.replay_fold_apply import DedupeKey, EntityKey, FoldApply, FoldEntity
from caresync.router.transport import Inbound, InputConsumer, Transport
from caresync.router.worker_settings import WorkerSettings
from caresync.router.worker_stats import WorkerStats
from caresync.store import BatchWrite, EntityRow, OutboxRow, Store, StoreUnavailable
from caresync.store.errors import map_sqlite_error
from caresync.store.point_reads import PointReader

log = structlog.get_logger("caresync.replay")

CHUNK_MESSAGES = 50_000
"""Messages per transaction (rounded up to a whole window of ``batch_size``)."""
READ_BATCH = 5_000
"""Messages asked of the reader at once."""
CACHE_ENTITIES = 500_000
"""Entity states kept in memory; past it, those committed are dropped and read back as needed."""
CACHE_APPLIED = 5_000_000
"""Dedupe keys kept in memory; past it, those committed are dropped and looked up as needed."""
OUTBOX_KEYS = 5_000_000
"""Largest outbox whose keys :func:`outbox_keys` reads into memory."""

SentKeys = Set[str] | Callable[[], Awaitable[Set[str]]]
"""The keys of the effects already sent, or how to find them (asked once, when first needed)."""


async def outbox_keys(store: Store, limit: int = OUTBOX_KEYS) -> frozenset[str]:
    """The keys of the outbox rows (none past ``limit`` rows): a rebuild keeps those rows as
    they are, so the fold need not build them again."""
    try:
        async with store.connection.execute("SELECT count(*) FROM outbox") as cur:
            row = await cur.fetchone()
        if row is None or int(row[0]) > limit:
            return frozenset()
        async with store.connection.execute("SELECT key FROM outbox") as cur:
            return frozenset(key for (key,) in await cur.fetchall())
    except sqlite3.Error as exc:
        raise map_sqlite_error(exc, "reading the outbox keys") from exc


class PartitionFold:
    """Folds one input stream into the store (the replay of :class:`PartitionWorker`)."""

    def __init__(
        self,
        *,
        stream: str,
        transport: Transport,
        store: Store,
        registry: Registry,
        subjects: Subjects,
        settings: WorkerSettings,
        refdata: Callable[[int], Any] | None = None,
        already_sent: SentKeys = frozenset(),
        in_outbox: Set[str] = frozenset(),
        chunk_messages: int = CHUNK_MESSAGES,
        cache_entities: int = CACHE_ENTITIES,
        cache_applied: int = CACHE_APPLIED,
        partition: int = 0,
    ) -> None:
        self.stream = stream
        self._transport = transport
        self._store = store
        self._subjects = subjects
        self._settings = settings
        self._decoder = CommandDecoder(registry, subjects, refdata)
        self._state_decoders = {
            name: msgspec.msgpack.Decoder(kind.state_type) for name, kind in registry.kinds.items()
        }
        self._encoder = msgspec.msgpack.Encoder()
        self._already_sent = already_sent
        self._in_outbox = in_outbox
        self._reader: InputConsumer | None = None
        self._read_through = 0
        """The last sequence the reader handed out."""
        self._chunk_messages = chunk_messages
        self._cache_entities = cache_entities
        self._cache_applied = cache_applied
        self._fanout = LocalFanout(subjects, self._decoder, partition)
        self._apply = FoldApply(subjects, settings.supervision, in_outbox, self._fanout)
        self._point: PointReader | None = None
        """Lookups of the local commands' targets while entities may be only in the store."""
        self._from_store = False
        """True when entities or dedupe keys may be in the store and not in memory."""
        self._last_seq = 0
        self._in_window = 0
        self._in_chunk = 0
        self._dead: list[OutboxRow] = []
        """Dead letters of the current window's messages that do not decode."""
        self._write = BatchWrite()
        self.stats = WorkerStats()

    async def run(self, end_seq: int, *, progress: Callable[[int], None] | None = None) -> int:
        """Apply the stream from the committed offset through ``end_seq``; publish nothing.

        Effects whose key is in ``already_sent`` are recorded as sent, the others wait in the
        outbox for the router's next start; rows already in the outbox keep their status.  Rows
        whose key is in ``in_outbox`` are not built again, and ``already_sent`` is only asked
        for once a row is not: a rebuild over a whole outbox needs no scan of the streams.
        Returns the number of messages read.
        """
        start = self._last_seq = await self._store.offset(self.stream)
        if start >= end_seq:
            return 0
        # Resuming: what the chunks before wrote is in the store, not in memory.
        if start > 0:
            self._read_from_store()
        self._read_through = start
        self._reader = await self._transport.open_reader(self.stream, start + 1)
        try:
            while self._last_seq < end_seq:
                await self._fold_next(end_seq)
                if progress is not None:
                    progress(self._last_seq - start)
            self._end_window()
            await self._commit()
        finally:
            if self._reader is not None:
                await self._reader.close()
            self._reader = None
            if self._point is not None:
                self._point.close()
                self._point = None
        return self._last_seq - start

    async def _fold_next(self, end_seq: int) -> None:
        assert self._reader is not None, "the reader is open while run() reads"
        batch = await self._reader.next_batch(READ_BATCH, self._settings.pull_timeout_s)
        if batch:
            self._read_through = max(self._read_through, batch[-1].seq)
        last = self._last_seq
        batch = [m for m in batch if last < m.seq <= end_seq]
        if not batch:
            return
        prepared = [self._prepare(m) for m in batch]
        await self._load_missing(prepared)
        apply, window = self._apply, self._settings.batch_size
        now = time.time()
        for message, p in zip(batch, prepared, strict=True):
            if isinstance(p, CodecError):
                self._dead_letter(message, p)
            else:
                apply.apply(p, self._write, now)
            self._in_window += 1
            if self._in_window >= window:
                self._last_seq = message.seq
                self._end_window()
                if self._in_chunk >= self._chunk_messages:
                    await self._commit()
        self._last_seq = batch[-1].seq

    def _prepare(self, message: Inbound) -> Prepared | CodecError:
        try:
            return self._decoder.prepare(message)
        except CodecError as exc:
            return exc

    def _dead_letter(self, message: Inbound, exc: CodecError) -> None:
        self._apply.stats.dead_lettered += 1
        self._dead.append(undecodable_row(self._subjects, message, exc))

    def _end_window(self) -> None:
        """Close a window of ``batch_size`` messages: its dead letters, then its other rows."""
        self._in_chunk += self._in_window
        self._in_window = 0
        self._apply.window_seen.clear()
        known = self._in_outbox
        rows = (*self._dead, *self._apply.outbox)
        self._write.outbox.extend(row for row in rows if row.key not in known)
        self._dead, self._apply.outbox = [], []

    async def _sent(self) -> Set[str]:
        """The keys of the effects already sent; found once, the reader paused meanwhile."""
        if not callable(self._already_sent):
            return self._already_sent
        # A long scan must not leave the reader idle past the server's limit for it.
        if self._reader is not None:
            await self._reader.close()
        self._already_sent = await self._already_sent()
        self._reader = await self._transport.open_reader(self.stream, self._read_through + 1)
        return self._already_sent

    # -- store ----------------------------------------------------------------------------------
    async def _load_missing(self, prepared: list[Prepared | CodecError]) -> None:
        """Read back the entities and dedupe keys of a batch that may be only in the store."""
        apply = self._apply
        if len(apply.entities) > self._cache_entities or len(apply.applied) > self._cache_applied:
            # Keep only what the next commit still has to write.
            apply.entities = {key: apply.entities[key] for key in apply.dirty}
            apply.applied = {(a.kind, a.entity, a.command_id) for a in self._write.applied}
            self._read_from_store()
        if not self._from_store:
            return
        commands = [p for p in prepared if isinstance(p, Prepared)]
        missing = list({p.key for p in commands} - apply.entities.keys())
        if missing:
            rows = await self._store.load_entities(missing)
            for key in missing:
                row = rows.get(key)
                if row is not None:
                    apply.entities[key] = self._loaded(row)
        dedupe: set[DedupeKey] = {(p.kind.name, p.command.entity, p.command.id) for p in commands}
        unknown = list(dedupe - apply.applied)
        if unknown:
            apply.applied |= await self._store.applied_among(unknown)

    def _read_from_store(self) -> None:
        """From now on, entities and dedupe keys may be only in the store: the batch reads
        fetch those of input messages, point reads those of local commands."""
        self._from_store = True
        if self._point is None:
            self._point = point = PointReader(self._store.path)

            def entity(key: EntityKey) -> FoldEntity | None:
                row = point.entity(*key)
                return None if row is None else self._loaded(row)

            self._apply.lookup_entity = entity
            self._apply.lookup_applied = lambda key: point.applied(*key)

    def _loaded(self, row: EntityRow) -> FoldEntity:
        """A stored snapshot as the pipeline loads it (undecodable: kept raw, parks on use)."""
        try:
            return FoldEntity(self._state_decoders[row.kind].decode(row.state), row.parked)
        except msgspec.DecodeError as exc:
            return FoldEntity(row.state, False, load_error=f"stored state does not decode: {exc}")

    async def _commit(self) -> None:
        """Commit the chunk: changed snapshots, dedupe records, outbox, parked rows, offset."""
        write, apply = self._write, self._apply
        entities: dict[EntityKey, FoldEntity] = apply.dirty
        encode = self._encoder.encode
        write.entities = [
            EntityRow(kind, entity, e.state if e.load_error else encode(e.state), e.parked, e.seq)
            for (kind, entity), e in entities.items()
        ]
        write.offsets[self.stream] = self._last_seq
        if write.outbox:
            sent = await self._sent()
            write.outbox = [
                OutboxRow(row.key, row.subject, row.payload, row.headers, True)
                if row.key in sent
                else row
                for row in write.outbox
            ]
        delay_s = self._settings.commit_retry_initial_s
        while True:
            try:
                await self._store.commit(write)
                break
            except StoreUnavailable as exc:
                self.stats.commit_retries += 1
                log.warning("store_unavailable", error=str(exc), retry_in_s=delay_s)
                await anyio.sleep(delay_s)
                delay_s = min(delay_s * 2, self._settings.commit_retry_max_s)
        self.stats.add(apply.stats)
        self.stats.batches += 1
        self.stats.received += self._in_chunk
        self.stats.last_seq = self._last_seq
        apply.stats = WorkerStats()
        apply.dirty = {}
        self._write = BatchWrite()
        self._in_chunk = 0
