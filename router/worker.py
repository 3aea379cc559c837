"""One partition's pipeline: pull → apply (actors) → commit → publish effects → ack.

Stages overlap across batches: while batch *k* is published and acked, batch *k+1* is applied
and committed.  The apply stage asks for each batch when it is ready for it, so that a batch
takes every message that arrived until then (``router.batches_in_flight`` lets the pull stage
work ahead).  Per batch, everything goes into one SQLite transaction together with the
stream offset, so after a crash the consumer restarts exactly after the last committed
message and per-entity order holds (messages at or below the offset are skipped).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Set
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream, TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from caresync.actors.contract import Registry
from caresync.codecs import Subjects
from caresync.router.batch_apply import BatchApplier
from caresync.router.publisher import Publisher
from caresync.router.transport import Inbound, InputConsumer, Transport
from caresync.router.worker_settings import WorkerSettings
from caresync.router.worker_stats import StageTimes, WorkerStats
from caresync.store import BatchWrite, OutboxRow, Store, StoreUnavailable

log = structlog.get_logger("caresync.worker")


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
        self._publisher = publisher
        self._settings = settings
        self._applier = BatchApplier(
            stream=stream,
            store=store,
            registry=registry,
            subjects=subjects,
            settings=settings,
            refdata=refdata,
            refdata_barrier=refdata_barrier,
            partition=partition,
        )
        self._last_seq = 0
        self._stop = anyio.Event()
        self._pull_scope: anyio.CancelScope | None = None
        self._inject: MemoryObjectSendStream[list[Inbound] | Release] | None = None
        self.stats = WorkerStats()
        self.stages = StageTimes()
        self._batch_no = 0
        """Batches applied (numbered from 1)."""
        self._committed_no = 0
        """Every batch up to this number is committed."""
        self._commit_progress = anyio.Event()

    @property
    def live_actors(self) -> int:
        """Entities with a live actor now."""
        return self._applier.live

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
            ahead = max(0, self._settings.batches_in_flight - 1)
            send, receive = anyio.create_memory_object_stream[list[Inbound] | Release](ahead)
            self._inject = send.clone()
            # The apply stage asks for each batch when it is ready for it, so that a batch
            # holds every message that arrived until then; ``ahead`` more may be pulled early.
            # (At most ahead + 1 requests are ever unanswered.)
            ask, asked = anyio.create_memory_object_stream[int](ahead + 1)
            for _ in range(ahead):
                ask.send_nowait(self._settings.batch_size)
            commit_send, commit_receive = anyio.create_memory_object_stream[_ToCommit](1)
            pub_send, pub_receive = anyio.create_memory_object_stream[_ToPublish](1)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pull_loop, consumer, send, asked)
                tg.start_soon(self._apply_loop, receive, commit_send, ask)
                tg.start_soon(self._commit_loop, commit_receive, pub_send)
                tg.start_soon(self._publish_loop, consumer, pub_receive)
            # Marks of the last publishes: commit them so a restart does not resend.
            with anyio.CancelScope(shield=True):
                await self._commit(self._publisher.take_marks())
        finally:
            self._applier.close()
            with anyio.CancelScope(shield=True):
                await consumer.close()
        log.info("partition_stopped", stream=self.stream, last_seq=self._last_seq)

    async def _pull_loop(
        self,
        consumer: InputConsumer,
        send: ObjectSendStream[list[Inbound] | Release],
        asked: ObjectReceiveStream[int],
    ) -> None:
        try:
            async with asked:
                await self._pull(consumer, send, asked)
        finally:
            # Releases come in through a clone of the same stream: closing it too lets the
            # apply loop see the end once what is queued has run.
            if self._inject is not None:
                self._inject.close()
                self._inject = None

    async def _pull(
        self,
        consumer: InputConsumer,
        send: ObjectSendStream[list[Inbound] | Release],
        asked: ObjectReceiveStream[int],
    ) -> None:
        async with send:
            while not self._stop.is_set():
                batch: list[Inbound] = []
                with anyio.CancelScope() as scope:
                    self._pull_scope = scope
                    size = await asked.receive()
                    batch = await consumer.next_batch(size, self._settings.pull_timeout_s)
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
        ask: MemoryObjectSendStream[int],
    ) -> None:
        """Apply batch after batch; each is committed by the commit stage while the next one
        is applied (its dedupe records are kept in memory until then, see
        :class:`~caresync.router.batch_apply.UncommittedKeys`, and no actor is passivated
        before its state is committed)."""
        async with receive, commit_send, ask, anyio.create_task_group() as actors_tg:
            self._applier.task_group = actors_tg
            waiting = False
            size = self._settings.batch_size
            while True:
                # Ask for the next batch now, once: a release that comes first does not
                # answer the request (asking again would let the pull stage work ahead).
                if not waiting:
                    with contextlib.suppress(anyio.BrokenResourceError):  # pulling has ended
                        ask.send_nowait(size)
                    waiting = True
                try:
                    batch = await receive.receive()
                except anyio.EndOfStream:
                    break
                if isinstance(batch, Release):
                    await self._drain_commits()
                    await self._run_release(batch, commit_send)
                    continue
                waiting = False
                if batch:
                    t0 = time.perf_counter()
                    self._batch_no += 1
                    write, stats = await self._applier.apply(batch, self._batch_no)
                    self.stages.add("apply", time.perf_counter() - t0)
                    size = self._next_size(len(batch), len(write.applied) + len(write.parked))
                    await commit_send.send(_ToCommit(write, stats, batch[-1], self._batch_no))
                elif self._publisher.has_marks():
                    # Idle: confirmations of what was published still need committing.
                    await commit_send.send(
                        _ToCommit(BatchWrite(), WorkerStats(), None, self._batch_no)
                    )
                self.stats.passivated += self._applier.passivate(self._committed_no)
            await self._drain_commits()
            self._applier.close()

    def _next_size(self, inputs: int, applied: int) -> int:
        """Inputs to ask for next: ``batch_size``, fewer if the last batch's inputs brought so
        many local commands that as many again would apply over ``batch_max_commands``."""
        per_input = max(1.0, applied / inputs)
        fit = int(self._settings.batch_max_commands / per_input)
        return max(1, min(self._settings.batch_size, fit))

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
            write, stats, result = await self._applier.release(request.kind, request.entity)
            if write:
                committed = anyio.Event()
                await commit_send.send(_ToCommit(write, stats, None, self._batch_no, committed))
                await committed.wait()
            request.result = result
        finally:
            request.done.set()

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
                self._applier.task_group = actors_tg
                size = self._settings.batch_size
                while self._last_seq < end_seq:
                    batch = await reader.next_batch(size, self._settings.pull_timeout_s)
                    batch = [m for m in batch if self._last_seq < m.seq <= end_seq]
                    if not batch:
                        continue
                    self._last_seq = batch[-1].seq
                    self._batch_no += 1
                    write, stats = await self._applier.apply(batch, self._batch_no)
                    size = self._next_size(len(batch), len(write.applied) + len(write.parked))
                    write.outbox = [
                        msgspec.structs.replace(row, sent=True) if row.key in already_sent else row
                        for row in write.outbox
                    ]
                    await self._commit(write, stats, self._batch_no)
                    self.stats.passivated += self._applier.passivate(self._committed_no)
                    if progress is not None:
                        progress(self._last_seq - start)
                self._applier.close()
        finally:
            self._applier.close()
            await reader.close()
        return self._last_seq - start

    async def _commit(
        self, write: BatchWrite, stats: WorkerStats | None = None, batch_no: int | None = None
    ) -> tuple[int, int] | None:
        """Commit, retrying transient store failures with back-off; nothing is acked meanwhile.

        ``stats`` are the batch's counts (none: a write that applied nothing) and ``batch_no``
        the last batch it makes durable (default: every batch applied so far)."""
        delay_s = self._settings.commit_retry_initial_s
        while True:
            try:
                seq_range = await self._store.commit(write)
                if stats is not None:
                    self.stats.add(stats)
                done = self._batch_no if batch_no is None else batch_no
                self._applier.keys.committed(done)
                self._committed_no = max(self._committed_no, done)
                self._commit_progress.set()
                self._commit_progress = anyio.Event()
                return seq_range
            except StoreUnavailable as exc:
                self.stats.commit_retries += 1
                log.warning("store_unavailable", error=str(exc), retry_in_s=delay_s)
                await anyio.sleep(delay_s)
                delay_s = min(delay_s * 2, self._settings.commit_retry_max_s)
