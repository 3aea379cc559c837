"""One partition's pipeline: pull → apply (actors) → commit → publish effects → ack.

Stages overlap across batches: while batch *k* is published and acked, batch *k+1* is applied
and committed.  Per batch, everything goes into one SQLite transaction together with the
stream offset, so after a crash the consumer restarts exactly after the last committed
message and per-entity order holds (messages at or below the offset are skipped).
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Set
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream, TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from caresync.actors.contract import EntityKind, Registry
from caresync.codecs import CodecError, Subjects
from caresync.config import Config
from caresync.router.actor import (
    Applied,
    BatchTracker,
    Delivery,
    EntityActor,
    Parked,
    Refused,
    Supervision,
)
from caresync.router.decoding import CommandDecoder, Prepared
from caresync.router.local_fanout import LocalFanout, Tree
from caresync.router.outbox_rows import (
    dead_letter_row,
    effect_row,
    parked_row,
    undecodable_row,
)
from caresync.router.publisher import Publisher
from caresync.router.transport import Inbound, InputConsumer, Transport
from caresync.store import (
    AppliedRow,
    BatchWrite,
    EntityRow,
    OutboxRow,
    ParkedRow,
    Store,
    StoreUnavailable,
)
from caresync.store.point_reads import PointReader

log = structlog.get_logger("caresync.worker")


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The knobs of one partition worker (from ``[router]``, ``[supervision]``, ``[outbox]``)."""

    batch_size: int = 500
    pull_timeout_s: float = 1.0
    batches_in_flight: int = 2
    max_live_actors: int = 10_000
    idle_passivate_s: float = 60.0
    supervision: Supervision = field(default_factory=Supervision)
    commit_retry_initial_s: float = 0.05
    commit_retry_max_s: float = 5.0

    @classmethod
    def from_config(cls, cfg: Config) -> WorkerSettings:
        """Settings from a validated configuration."""
        return cls(
            batch_size=cfg.router.batch_size,
            pull_timeout_s=cfg.router.pull_expires_ms / 1000,
            batches_in_flight=cfg.router.batches_in_flight,
            max_live_actors=cfg.router.max_live_actors,
            idle_passivate_s=cfg.router.idle_passivate_s,
            supervision=Supervision(
                max_failures=cfg.supervision.max_failures,
                backoff_initial_s=cfg.supervision.backoff_initial_ms / 1000,
                backoff_max_s=cfg.supervision.backoff_max_ms / 1000,
            ),
        )


@dataclass(slots=True)
class WorkerStats:
    """Counters of one worker since start (a snapshot is taken with :meth:`as_dict`)."""

    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    parked: int = 0
    local: int = 0
    """Internal commands applied with their cause (counted in accepted, rejected or parked too;
    not in received: they were never read)."""
    batches: int = 0
    commit_retries: int = 0
    passivated: int = 0
    last_seq: int = 0

    def add(self, delta: WorkerStats) -> None:
        """Add the counts of a committed batch (``last_seq`` is taken, not added)."""
        for name in self.__slots__:
            if name != "last_seq":
                setattr(self, name, getattr(self, name) + getattr(delta, name))
        self.last_seq = max(self.last_seq, delta.last_seq)

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class StageTimes:
    """Where a worker's batches spend their time, per pipeline stage (seconds since start, and
    the slowest batch), for ``caresync health`` and the benchmarks."""

    totals: dict[str, float] = field(default_factory=dict)
    slowest: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        """One batch spent ``seconds`` in ``stage``."""
        self.totals[stage] = self.totals.get(stage, 0.0) + seconds
        self.slowest[stage] = max(self.slowest.get(stage, 0.0), seconds)
        self.counts[stage] = self.counts.get(stage, 0) + 1

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Per stage: batches, total and mean milliseconds, the slowest batch."""
        return {
            stage: {
                "batches": self.counts[stage],
                "total_ms": round(total * 1000, 1),
                "mean_ms": round(total * 1000 / self.counts[stage], 3),
                "max_ms": round(self.slowest[stage] * 1000, 3),
            }
            for stage, total in self.totals.items()
        }


@dataclass(frozen=True, slots=True)
class _ToCommit:
    write: BatchWrite
    stats: WorkerStats
    """The batch's counts, added to the worker's once it is committed."""
    last: Inbound | None
    """The last message of the batch; None for a release."""
    batch_no: int
    committed: anyio.Event | None = None


@dataclass(frozen=True, slots=True)
class _ToPublish:
    rows: list[OutboxRow]
    seq_range: tuple[int, int] | None
    last: Inbound | None
    """The message to ack through; None for a release (nothing new was read)."""


DedupeKey = tuple[str, str, str]
"""(kind, entity id, command id)."""


@dataclass(slots=True)
class _Pass:
    """One pass of applying a batch (a batch is applied again if the store knew a local
    command that memory did not)."""

    loaded: dict[tuple[str, str], EntityRow]
    known: Set[DedupeKey]
    """Local commands the store has: duplicates."""
    tracker: BatchTracker = field(default_factory=BatchTracker)
    deliveries: list[Delivery] = field(default_factory=list)
    seen: set[DedupeKey] = field(default_factory=set)
    derived: set[DedupeKey] = field(default_factory=set)
    """Local commands offered: their dedupe records are looked for once the pass is done."""
    saved: dict[tuple[str, str], tuple[Any, bool, str] | None] = field(default_factory=dict)
    """Each touched actor as it was before (state, parked, load error); None if not live."""
    absent: set[tuple[str, str]] = field(default_factory=set)
    """Entities the store has no snapshot of (read while fanning out)."""


@dataclass(slots=True)
class Release:
    """A request to release a parked entity, run in the pipeline between two batches."""

    kind: str
    entity: str
    done: anyio.Event = field(default_factory=anyio.Event)
    result: dict[str, Any] = field(default_factory=dict)


class PartitionWorker:
    """Runs the pipeline of one input stream (one partition)."""

    def __init__(
        self,
        *,
        stream: str,
        consumer_name: str,
        transport: Transport,
        store: Store,
        registry: Registry,
        subjects: Subjects,
        publisher: Publisher,
        settings: WorkerSettings,
        refdata: Callable[[int], Any] | None = None,
        refdata_barrier: Callable[[], Awaitable[None]] | None = None,
        partition: int = 0,
    ) -> None:
        self.stream = stream
        self.consumer_name = consumer_name
        self._transport = transport
        self._store = store
        self._subjects = subjects
        self._publisher = publisher
        self._settings = settings
        self._decoder = CommandDecoder(registry, subjects, refdata)
        self._fanout = LocalFanout(subjects, self._decoder, partition)
        self._point: PointReader | None = None
        """Opened on first use: lookups for local commands in the middle of a batch."""
        self._refdata_barrier = refdata_barrier
        self._state_decoders = {
            name: msgspec.msgpack.Decoder(kind.state_type) for name, kind in registry.kinds.items()
        }
        self._encoder = msgspec.msgpack.Encoder()
        self._actors: OrderedDict[tuple[str, str], EntityActor] = OrderedDict()
        self._actors_tg: TaskGroup | None = None
        self._last_seq = 0
        self._stop = anyio.Event()
        self._pull_scope: anyio.CancelScope | None = None
        self._inject: MemoryObjectSendStream[list[Inbound] | Release] | None = None
        self._registry = registry
        self.stats = WorkerStats()
        self.stages = StageTimes()
        self._pending = WorkerStats()
        self._batch_no = 0
        """Batches applied (numbered from 1)."""
        self._committed_no = 0
        """Every batch up to this number is committed."""
        self._commit_progress = anyio.Event()
        self._uncommitted_applied: dict[int, list[tuple[str, str, str]]] = {}
        """Dedupe keys of applied batches not yet committed (the store does not have them)."""
        self._uncommitted_keys: set[tuple[str, str, str]] = set()
        """Every key of ``_uncommitted_applied``, plus those of batches committed since the
        last dedupe read began (see :meth:`_forget_committed_keys`)."""
        self._committed_keys: list[list[tuple[str, str, str]]] = []
        """Keys of batches committed since then: still in ``_uncommitted_keys``."""

    @property
    def live_actors(self) -> int:
        """Entities with a live actor now."""
        return len(self._actors)

    def stop(self) -> None:
        """Stop pulling; batches already pulled are applied, committed, published and acked."""
        self._stop.set()
        if self._pull_scope is not None:
            self._pull_scope.cancel()

    # -- live pipeline --------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume from the committed offset until :meth:`stop`; then drain and return."""
        self._last_seq = await self._store.offset(self.stream)
        self.stats.last_seq = self._last_seq
        consumer = await self._transport.open_consumer(
            self.stream, self.consumer_name, self._last_seq + 1
        )
        log.info("partition_started", stream=self.stream, from_seq=self._last_seq + 1)
        task_status.started()
        try:
            send, receive = anyio.create_memory_object_stream[list[Inbound] | Release](
                max(0, self._settings.batches_in_flight - 1)
            )
            self._inject = send.clone()
            commit_send, commit_receive = anyio.create_memory_object_stream[_ToCommit](1)
            pub_send, pub_receive = anyio.create_memory_object_stream[_ToPublish](1)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pull_loop, consumer, send)
                tg.start_soon(self._apply_loop, receive, commit_send)
                tg.start_soon(self._commit_loop, commit_receive, pub_send)
                tg.start_soon(self._publish_loop, consumer, pub_receive)
            # Marks of the last publishes: commit them so a restart does not resend.
            with anyio.CancelScope(shield=True):
                await self._commit(self._publisher.take_marks())
        finally:
            self._close_point_reader()
            with anyio.CancelScope(shield=True):
                await consumer.close()
        log.info("partition_stopped", stream=self.stream, last_seq=self._last_seq)

    async def _pull_loop(
        self, consumer: InputConsumer, send: ObjectSendStream[list[Inbound] | Release]
    ) -> None:
        try:
            await self._pull(consumer, send)
        finally:
            # Releases come in through a clone of the same stream: closing it too lets the
            # apply loop see the end once what is queued has run.
            if self._inject is not None:
                self._inject.close()
                self._inject = None

    async def _pull(
        self, consumer: InputConsumer, send: ObjectSendStream[list[Inbound] | Release]
    ) -> None:
        async with send:
            while not self._stop.is_set():
                batch: list[Inbound] = []
                with anyio.CancelScope() as scope:
                    self._pull_scope = scope
                    batch = await consumer.next_batch(
                        self._settings.batch_size, self._settings.pull_timeout_s
                    )
                self._pull_scope = None
                if scope.cancelled_caught:
                    break
                # Redeliveries of what is already in the pipeline or committed are dropped:
                # this is what keeps per-entity order across ack timeouts and restarts.
                fresh = [m for m in batch if m.seq > self._last_seq]
                if fresh:
                    self._last_seq = fresh[-1].seq
                await send.send(fresh)  # an empty batch is an idle tick

    async def _apply_loop(
        self,
        receive: ObjectReceiveStream[list[Inbound] | Release],
        commit_send: ObjectSendStream[_ToCommit],
    ) -> None:
        """Apply batch after batch; each is committed by the commit stage while the next one
        is applied (its dedupe records are kept in memory until then, see :meth:`apply_batch`,
        and no actor is passivated before its state is committed)."""
        async with receive, commit_send, anyio.create_task_group() as actors_tg:
            self._actors_tg = actors_tg
            async for batch in receive:
                if isinstance(batch, Release):
                    await self._drain_commits()
                    await self._run_release(batch, commit_send)
                    continue
                t0 = time.perf_counter()
                write = await self.apply_batch(batch)
                if batch:
                    self.stages.add("apply", time.perf_counter() - t0)
                    item = _ToCommit(write, self._pending, batch[-1], self._batch_no)
                    keys = [(a.kind, a.entity, a.command_id) for a in write.applied]
                    self._uncommitted_applied[self._batch_no] = keys
                    self._uncommitted_keys.update(keys)
                    await commit_send.send(item)
                elif self._publisher.has_marks():
                    # Idle: confirmations of what was published still need committing.
                    await commit_send.send(
                        _ToCommit(BatchWrite(), WorkerStats(), None, self._batch_no)
                    )
                self._passivate()
            await self._drain_commits()
            self._close_actors()

    async def _commit_loop(
        self, receive: ObjectReceiveStream[_ToCommit], pub_send: ObjectSendStream[_ToPublish]
    ) -> None:
        async with receive, pub_send:
            async for item in receive:
                t0 = time.perf_counter()
                write = item.write
                marks = self._publisher.take_marks()
                write.sent, write.sent_ranges, write.failed = (
                    marks.sent,
                    marks.sent_ranges,
                    marks.failed,
                )
                seq_range = await self._commit(write, item.stats, item.batch_no)
                if item.last is not None:
                    self.stages.add("commit", time.perf_counter() - t0)
                if item.committed is not None:
                    item.committed.set()
                await pub_send.send(_ToPublish(write.outbox, seq_range, item.last))

    async def _drain_commits(self) -> None:
        """Wait until every batch applied so far is committed."""
        while self._committed_no < self._batch_no:
            await self._commit_progress.wait()

    async def _publish_loop(
        self, consumer: InputConsumer, receive: ObjectReceiveStream[_ToPublish]
    ) -> None:
        async with receive:
            async for item in receive:
                t0 = time.perf_counter()
                await self._publisher.send(item.rows, item.seq_range)
                if item.last is not None:
                    await consumer.ack_through(item.last)
                    self.stages.add("publish", time.perf_counter() - t0)

    # -- parked entities ------------------------------------------------------------------------
    async def release(self, kind: str, entity: str) -> dict[str, Any]:
        """Release a parked entity: re-run its parked message, then those queued behind it, in
        order, between two batches of the pipeline.  The result says what became of each."""
        if self._inject is None:
            return {"error": "the router is not running"}
        request = Release(kind, entity)
        try:
            await self._inject.send(request)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return {"error": "the router is stopping"}
        await request.done.wait()
        return request.result

    async def _run_release(
        self, request: Release, commit_send: ObjectSendStream[_ToCommit]
    ) -> None:
        try:
            write, result = await self._release_write(request.kind, request.entity)
            if write:
                committed = anyio.Event()
                await commit_send.send(
                    _ToCommit(write, self._pending, None, self._batch_no, committed)
                )
                await committed.wait()
            request.result = result
        finally:
            request.done.set()

    async def _release_write(self, kind: str, entity: str) -> tuple[BatchWrite, dict[str, Any]]:
        spec = self._registry.get(kind)
        if spec is None:
            return BatchWrite(), {"error": f"unknown entity kind {kind!r}"}
        key = (kind, entity)
        rows = await self._store.parked(kind, entity)
        stored = await self._store.entity(kind, entity)
        if not rows and (stored is None or not stored.parked):
            return BatchWrite(), {"error": f"{kind} {entity!r} is not parked"}
        actor = self._actor(spec, entity, {key: stored} if stored is not None else {})
        actor.parked = False
        write, tracker = BatchWrite(), BatchTracker()
        self._pending = WorkerStats()
        deliveries: list[tuple[Delivery, ParkedRow]] = []
        results: list[dict[str, Any]] = []
        for row in rows:
            message = Inbound(
                row.subject,
                row.data,
                row.headers,
                row.stream,
                row.seq,
                timestamp_ns=row.timestamp_ns,
            )
            try:
                prepared = self._decoder.prepare(message)
            except CodecError as exc:  # it decoded when it was parked; a schema change since
                write.outbox.append(dead_letter_row(self._subjects, message, exc.code, exc.reason))
                write.released.append((kind, entity, row.stream, row.seq))
                results.append({"seq": row.seq, "outcome": "dead_lettered", "reason": exc.reason})
                continue
            delivery = Delivery(prepared, tracker)
            actor.deliver(delivery)
            deliveries.append((delivery, row))
        await tracker.wait()
        touched: dict[tuple[str, str], tuple[EntityActor, int]] = {}
        now = time.time()
        for delivery, row in deliveries:
            outcome = delivery.outcome
            if isinstance(outcome, Parked):
                reason = outcome.reason
                # Failed again (or behind one that did): it stays parked, in its place.
                results.append({"seq": row.seq, "outcome": "parked", "reason": reason})
                continue
            write.released.append((kind, entity, row.stream, row.seq))
            self._record(delivery, write, touched, now)
            verdict = "applied" if isinstance(outcome, Applied) else "rejected"
            reason = outcome.reason if isinstance(outcome, Refused) else ""
            results.append({"seq": row.seq, "outcome": verdict, "reason": reason})
        state = actor.state if actor.load_error else self._encoder.encode(actor.state)
        last = max((seq for _, seq in touched.values()), default=stored.seq if stored else 0)
        write.entities.append(EntityRow(kind, entity, state, actor.parked, last))
        return write, {"kind": kind, "id": entity, "parked": actor.parked, "messages": results}

    # -- replay ---------------------------------------------------------------------------------
    async def replay(
        self, end_seq: int, *, already_sent: Set[str] = frozenset(), progress: Any = None
    ) -> int:
        """Apply the stream from the committed offset through ``end_seq``; publish nothing.

        Effects whose key is in ``already_sent`` (found in the streams) are recorded as sent;
        the others wait in the outbox for the router's next start.  Rows already in the outbox
        keep their status.  Returns the number of messages read.
        """
        self._last_seq = await self._store.offset(self.stream)
        start = self._last_seq
        if self._last_seq >= end_seq:
            return 0
        reader = await self._transport.open_reader(self.stream, self._last_seq + 1)
        try:
            async with anyio.create_task_group() as actors_tg:
                self._actors_tg = actors_tg
                while self._last_seq < end_seq:
                    batch = await reader.next_batch(
                        self._settings.batch_size, self._settings.pull_timeout_s
                    )
                    batch = [m for m in batch if self._last_seq < m.seq <= end_seq]
                    if not batch:
                        continue
                    self._last_seq = batch[-1].seq
                    write = await self.apply_batch(batch)
                    write.outbox = [
                        dataclasses.replace(row, sent=True) if row.key in already_sent else row
                        for row in write.outbox
                    ]
                    await self._commit(write)
                    self._passivate()
                    if progress is not None:
                        progress(self._last_seq - start)
                self._close_actors()
        finally:
            self._close_point_reader()
            await reader.close()
        return self._last_seq - start

    def _forget_committed_keys(self) -> None:
        """Drop from memory the dedupe keys of batches committed by now, just before a dedupe
        read of the store: that read sees them.

        Not when the commit lands: a read already running may have begun before it, and
        would see the keys in neither place (a duplicate applied again).  Keys committed
        while a read runs stay in memory until the next one begins.
        """
        for keys in self._committed_keys:
            self._uncommitted_keys.difference_update(keys)
        self._committed_keys.clear()

    # -- one batch ------------------------------------------------------------------------------
    async def apply_batch(self, batch: list[Inbound]) -> BatchWrite:
        """Run a batch through the actors; return everything it changes (not yet committed)."""
        write = BatchWrite()
        if not batch:
            return write
        # Counted as committed: the deltas are added to self.stats once the batch commits, so
        # health never reports more than is durable.
        stats = self._pending = WorkerStats()
        self._batch_no += 1
        stats.batches = 1
        stats.received = len(batch)
        stats.last_seq = batch[-1].seq
        write.offsets[self.stream] = batch[-1].seq
        now = time.time()
        if self._refdata_barrier is not None:
            await self._refdata_barrier()
        prepared: list[Prepared] = []
        missing: set[tuple[str, str]] = set()
        for message in batch:
            try:
                p = self._decoder.prepare(message)
            except CodecError as exc:
                stats.dead_lettered += 1
                write.outbox.append(undecodable_row(self._subjects, message, exc))
                continue
            prepared.append(p)
            if p.key not in self._actors:
                missing.add(p.key)
        if not prepared:
            return write
        self._forget_committed_keys()
        # Read at once on this thread: a hand-off to the store's reader thread and back costs
        # more than these indexed lookups (and adds to the latency of every batch).
        reader = self._point_reader()
        done_before = reader.applied_among(
            [(p.kind.name, p.command.entity, p.command.id) for p in prepared]
        )
        loaded = reader.load_entities(list(missing)) if missing else {}
        # Local commands are deduped against memory as they are applied, against the store in
        # one read once the batch is applied: one that the store has (rare: a key that does not
        # follow from its cause's) undoes the batch, which is applied again knowing it.
        known: set[DedupeKey] = set()
        duplicates = stats.duplicates
        while True:
            run = _Pass(loaded, known)
            await self._apply_in_order(prepared, done_before, run)
            found = reader.applied_among(list(run.derived)) if run.derived else set()
            if not found:
                break
            known |= found
            self._undo(run)
            stats.duplicates = duplicates
        touched: dict[tuple[str, str], tuple[EntityActor, int]] = {}
        for d in run.deliveries:
            self._record(d, write, touched, now)
        for (kind, entity), (actor, seq) in touched.items():
            raw = actor.state if actor.load_error else self._encoder.encode(actor.state)
            write.entities.append(EntityRow(kind, entity, raw, actor.parked, seq))
        return write

    async def _apply_in_order(
        self, prepared: list[Prepared], done_before: Set[DedupeKey], run: _Pass
    ) -> None:
        """Offer each command to its actor in stream order, each followed by the local
        commands it sends (:mod:`caresync.router.local_fanout`)."""
        for p in prepared:
            dedupe_key = (p.kind.name, p.command.entity, p.command.id)
            if (
                dedupe_key in done_before
                or dedupe_key in run.seen
                or dedupe_key in self._uncommitted_keys
            ):
                self._pending.duplicates += 1
                continue
            run.seen.add(dedupe_key)
            delivery = await self._offer(p, run)
            if isinstance(delivery.outcome, Applied) and delivery.outcome.effects:
                await self._fan_out(delivery, Tree(p.message), run)
        await run.tracker.wait()

    async def _offer(self, p: Prepared, run: _Pass) -> Delivery:
        """Hand one command to its actor; wait for its outcome if its handler raised (the
        supervision decides before the next command, so that the local commands it may send
        keep their place)."""
        key = p.key
        if key not in run.saved:
            live = self._actors.get(key)
            run.saved[key] = None if live is None else (live.state, live.parked, live.load_error)
        delivery = Delivery(p, run.tracker)
        self._actor(p.kind, p.command.entity, run.loaded).offer(delivery)
        run.deliveries.append(delivery)
        if delivery.outcome is None:
            await run.tracker.wait()
        return delivery

    async def _fan_out(self, cause: Delivery, tree: Tree, run: _Pass) -> None:
        """Build the outbox rows of an applied command's effects, and apply those for entities
        of this partition right away, depth first."""
        assert isinstance(cause.outcome, Applied)
        p = cause.prepared
        rows: list[OutboxRow] = []
        cause.effect_rows = rows
        effects = cause.outcome.effects
        # The targets not live nor read yet, in one query: absent ones are new entities.
        wanted = [
            key
            for key in self._fanout.targets(effects)
            if key not in self._actors and key not in run.loaded and key not in run.absent
        ]
        if wanted:
            found = self._point_reader().load_entities(wanted)
            run.loaded.update(found)
            run.absent.update(key for key in wanted if key not in found)
        for effect in effects:
            row, local = self._fanout.local(p.kind.name, p.command, effect, tree)
            rows.append(row)
            if local is None:
                continue
            dedupe_key = (local.kind.name, local.command.entity, local.command.id)
            if (
                dedupe_key in run.seen
                or dedupe_key in self._uncommitted_keys
                or dedupe_key in run.known
            ):
                self._pending.duplicates += 1
                continue
            run.seen.add(dedupe_key)
            run.derived.add(dedupe_key)
            key = local.key
            delivery = await self._offer(local, run)
            if isinstance(delivery.outcome, Parked):
                tree.parked.add(key)
            elif isinstance(delivery.outcome, Applied) and delivery.outcome.effects:
                await self._fan_out(delivery, tree, run)

    def _undo(self, run: _Pass) -> None:
        """Put every actor the pass touched back as it was before it."""
        for key, before in run.saved.items():
            actor = self._actors.get(key)
            if actor is None:
                continue
            if before is None:  # made by this pass: made again from the store next time
                del self._actors[key]
                actor.close()
            else:
                actor.state, actor.parked, actor.load_error = before

    def _point_reader(self) -> PointReader:
        if self._point is None:
            self._point = PointReader(self._store.path)
        return self._point

    def _close_point_reader(self) -> None:
        if self._point is not None:
            self._point.close()
            self._point = None

    def _record(
        self,
        d: Delivery,
        write: BatchWrite,
        touched: dict[tuple[str, str], tuple[EntityActor, int]],
        now: float,
    ) -> None:
        p, outcome, msg = d.prepared, d.outcome, d.prepared.message
        kind, entity, command = p.kind.name, p.command.entity, p.command
        if msg.local_n:
            self._pending.local += 1
        if isinstance(outcome, Applied):
            self._pending.accepted += 1
            write.applied.append(AppliedRow(command.id, kind, entity, msg.seq, "accepted", "", now))
            if d.effect_rows is not None:
                write.outbox.extend(d.effect_rows)
            else:
                write.outbox.extend(
                    effect_row(self._subjects, kind, command, e) for e in outcome.effects
                )
            touched[p.key] = (self._actors[p.key], msg.seq)
        elif isinstance(outcome, Refused):
            self._pending.rejected += 1
            write.applied.append(
                AppliedRow(command.id, kind, entity, msg.seq, "rejected", outcome.reason, now)
            )
            write.outbox.append(
                dead_letter_row(
                    self._subjects,
                    msg,
                    outcome.code,
                    outcome.reason,
                    kind=f"{kind}.{command.name}",
                    entity=entity,
                )
            )
        elif isinstance(outcome, Parked):
            self._pending.parked += 1
            write.parked.append(
                parked_row(kind, msg, command, outcome.reason, outcome.failures, now)
            )
            if not outcome.behind:
                touched[p.key] = (self._actors[p.key], msg.seq)
        else:  # pragma: no cover - every delivery gets an outcome before the tracker fires
            raise RuntimeError(f"delivery of {command.id} finished without an outcome")

    # -- actors ---------------------------------------------------------------------------------
    def _actor(
        self,
        kind: EntityKind[Any, Any],
        entity: str,
        loaded: dict[tuple[str, str], EntityRow],
    ) -> EntityActor:
        key = (kind.name, entity)
        actor = self._actors.get(key)
        if actor is not None:
            self._actors.move_to_end(key)
            actor.batch_no = self._batch_no
            return actor
        stored = loaded.get(key)
        if stored is None:
            actor = EntityActor(
                kind, entity, kind.initial(entity), False, self._settings.supervision
            )
        else:
            try:
                state = self._state_decoders[kind.name].decode(stored.state)
                actor = EntityActor(kind, entity, state, stored.parked, self._settings.supervision)
            except msgspec.DecodeError as exc:
                # Keep the stored bytes as they are, for an operator to inspect or repair.
                actor = EntityActor(kind, entity, stored.state, False, self._settings.supervision)
                actor.load_error = f"stored state does not decode: {exc}"
        actor.batch_no = self._batch_no
        actor.start_task = self._start_actor
        self._actors[key] = actor
        return actor

    def _start_actor(self, actor: EntityActor) -> None:
        """Run an actor's task (once a delivery has to wait in its mailbox)."""
        assert self._actors_tg is not None, "actors only get deliveries inside the pipeline"
        self._actors_tg.start_soon(actor.run, name=f"actor {actor.kind.name}:{actor.entity}")

    def _passivate(self) -> None:
        """Drop idle actors, and the least recently used over the cap; never one whose state is
        not committed yet (actors are in order of use, so those are all at the end)."""
        cap = self._settings.max_live_actors
        idle_before = time.monotonic() - self._settings.idle_passivate_s
        while self._actors:
            key, actor = next(iter(self._actors.items()))
            if actor.batch_no > self._committed_no:
                break
            if len(self._actors) <= cap and actor.last_used > idle_before:
                break
            del self._actors[key]
            actor.close()
            self.stats.passivated += 1

    def _close_actors(self) -> None:
        for actor in self._actors.values():
            actor.close()
        self._actors.clear()

    async def _commit(
        self, write: BatchWrite, stats: WorkerStats | None = None, batch_no: int | None = None
    ) -> tuple[int, int] | None:
        """Commit, retrying transient store failures with back-off; nothing is acked meanwhile.

        ``stats`` are the batch's counts (default: those of the last batch applied) and
        ``batch_no`` its number (default: every batch applied so far, for callers that apply
        and commit in turn)."""
        delay_s = self._settings.commit_retry_initial_s
        while True:
            try:
                seq_range = await self._store.commit(write)
                if stats is None:
                    stats = self._pending
                if stats is self._pending:  # counted once: the next commit starts afresh
                    self._pending = WorkerStats()
                self.stats.add(stats)
                done = self._batch_no if batch_no is None else batch_no
                for no in [n for n in self._uncommitted_applied if n <= done]:
                    self._committed_keys.append(self._uncommitted_applied.pop(no))
                self._committed_no = max(self._committed_no, done)
                self._commit_progress.set()
                self._commit_progress = anyio.Event()
                return seq_range
            except StoreUnavailable as exc:
                self.stats.commit_retries += 1
                log.warning("store_unavailable", error=str(exc), retry_in_s=delay_s)
                await anyio.sleep(delay_s)
                delay_s = min(delay_s * 2, self._settings.commit_retry_max_s)
