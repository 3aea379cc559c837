"""The router: one pipeline per partition over a transport and a store.

Transport-agnostic: :mod:`caresync.router.service` runs it on JetStream, the unit tests on the
in-memory transport.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from caresync.actors.contract import Registry
from caresync.codecs import Subjects
from caresync.config import Config
from caresync.router.publisher import Publisher, PublisherStats
from caresync.router.transport import Transport
from caresync.router.worker import PartitionWorker
from caresync.router.worker_settings import WorkerSettings
from caresync.store import PartitionedStore, Store, StoreError, StoreUnavailable

log = structlog.get_logger("caresync.router")


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """Router-wide knobs; the per-partition ones are in :class:`WorkerSettings`."""

    worker: WorkerSettings = field(default_factory=WorkerSettings)
    publish_timeout_s: float = 5.0
    publish_max_in_flight: int = 2000
    publish_retry_initial_s: float = 0.05
    publish_retry_max_s: float = 5.0
    dedupe_retention_s: float = 7 * 86400.0
    outbox_retention_s: float = 86400.0
    prune_every_s: float = 60.0
    checkpoint_every_s: float = 0.1
    """How often the side connection checkpoints the write-ahead log.  A checkpoint syncs the
    log while the pipeline appends to it, and holds up the commit in flight for longer the more
    it has to copy: commits over 10 ms stalled the pipeline for 138-174 ms in all of a ``bench
    latency`` run at 0.1 s, 233-252 ms at 0.5 s and 655-666 ms at 5 s.  Latency p99 at 50% of
    peak, 3 interleaved runs: 23.8 / 31.0 / 24.7 ms at 0.1 s against 31.2 / 33.3 / 27.1 at
    0.5 s.  Throughput unchanged (fanout, 2 processes: 5,824 / 5,695 against 5,743 / 5,788)."""
    shutdown_timeout_s: float = 8.0

    @classmethod
    def from_config(cls, cfg: Config) -> RouterSettings:
        """Settings from a validated configuration."""
        return cls(
            worker=WorkerSettings.from_config(cfg),
            publish_timeout_s=cfg.outbox.publish_timeout_s,
            publish_max_in_flight=cfg.outbox.max_in_flight,
            publish_retry_initial_s=cfg.outbox.retry_backoff_initial_ms / 1000,
            publish_retry_max_s=cfg.outbox.retry_backoff_max_ms / 1000,
            dedupe_retention_s=cfg.store.dedupe_retention_s,
            outbox_retention_s=cfg.store.outbox_retention_s,
            shutdown_timeout_s=cfg.router.shutdown_timeout_s,
        )


class Router:
    """Runs every partition of one deployment until :meth:`stop`."""

    def __init__(
        self,
        *,
        transport: Transport,
        store: Store | PartitionedStore,
        registry: Registry,
        subjects: Subjects,
        settings: RouterSettings | None = None,
        refdata: Callable[[int], Any] | None = None,
        refdata_barrier: Callable[[], Awaitable[None]] | None = None,
        partitions: Sequence[int] | None = None,
        primary: bool = True,
    ) -> None:
        """``partitions``: the partitions this process runs (default all); it recovers the
        outbox of their files at start, prunes and checkpoints them.  ``store``: one file per
        partition, or one :class:`Store` for all of them.  Only the ``primary`` process
        prunes the main file's shared tables (the ingest log)."""
        self.settings = settings or RouterSettings()
        self.primary = primary
        self.subjects = subjects
        self.stores = store = PartitionedStore.of_store(store, subjects.input_streams())
        self.partitions = list(range(subjects.partitions) if partitions is None else partitions)
        stats = PublisherStats()

        def publisher() -> Publisher:
            return Publisher(
                transport,
                timeout_s=self.settings.publish_timeout_s,
                max_in_flight=self.settings.publish_max_in_flight,
                retry_initial_s=self.settings.publish_retry_initial_s,
                retry_max_s=self.settings.publish_retry_max_s,
                stats=stats,
            )

        # A publisher per worker, counting together: its confirmations (outbox seq ranges
        # among them) are committed to that worker's partition file, and no other.
        self.publisher = publisher()
        """Sends what the outbox kept from an earlier run (:meth:`recover_outbox`)."""
        self.workers = [
            PartitionWorker(
                stream=subjects.input_stream(p),
                consumer_name=subjects.consumer_name(p),
                transport=transport,
                store=store.of(p),
                registry=registry,
                subjects=subjects,
                publisher=publisher(),
                settings=self.settings.worker,
                refdata=refdata,
                refdata_barrier=refdata_barrier,
                partition=p,
            )
            for p in self.partitions
        ]
        self._stop = anyio.Event()
        self._stopped = anyio.Event()
        self.ready = False
        self.started_at = 0.0

    def stop(self) -> None:
        """Ask the router to stop: stop pulling, finish and commit what was pulled, return."""
        self._stop.set()

    async def wait_stopped(self) -> None:
        """Wait until :meth:`run` has returned."""
        await self._stopped.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send what the outbox still holds, start every partition, run until stopped."""
        try:
            await self.recover_outbox()
            async with anyio.create_task_group() as tg:
                for worker in self.workers:
                    await tg.start(worker.run)
                maintenance = anyio.CancelScope()
                checkpoints = anyio.CancelScope()
                tg.start_soon(self._maintenance, maintenance)
                tg.start_soon(self._checkpoints, checkpoints)
                self.ready = True
                self.started_at = time.time()
                log.info("router_ready", partitions=len(self.workers))
                task_status.started()
                await self._stop.wait()
                self.ready = False
                log.info("router_stopping")
                maintenance.cancel()
                checkpoints.cancel()
                for worker in self.workers:
                    worker.stop()
                # Draining is bounded: past the limit everything is cancelled.  Nothing is
                # half-applied either way: a batch commits whole or not at all.
                tg.cancel_scope.deadline = anyio.current_time() + self.settings.shutdown_timeout_s
        finally:
            self.ready = False
            self._stopped.set()
        log.info("router_stopped")

    async def _maintenance(self, scope: anyio.CancelScope) -> None:
        with scope:
            while True:
                await anyio.sleep(self.settings.prune_every_s)
                now = time.time()
                removed = sent = 0
                try:
                    for store in self._own_stores():
                        removed += await store.prune_applied(now - self.settings.dedupe_retention_s)
                        sent += await store.prune_outbox(now - self.settings.outbox_retention_s)
                    if self.primary:
                        await self.stores.ingest.prune(now - self.settings.outbox_retention_s)
                except StoreUnavailable as exc:
                    # Locked or full: pruning waits for the next round, the pipeline goes on.
                    log.warning("prune_postponed", error=str(exc))
                    continue
                if removed or sent:
                    log.info("pruned", dedupe_records=removed, sent_effects=sent)

    async def _checkpoints(self, scope: anyio.CancelScope) -> None:
        """Keep SQLite's write-ahead log short from the side, so that no batch commit pays
        for a checkpoint (and its file sync) on the pipeline's critical path."""
        with scope:
            while True:
                await anyio.sleep(self.settings.checkpoint_every_s)
                try:
                    for store in self._own_stores():
                        await store.checkpoint()
                except StoreError as exc:  # commits report a broken store; this only waits
                    log.warning("checkpoint_postponed", error=str(exc))

    def _own_stores(self) -> list[Store]:
        """The files of this process's partitions (the main file too, for the primary)."""
        stores = self.stores.distinct(self.partitions)
        if self.primary and all(s is not self.stores.main for s in stores):
            stores.insert(0, self.stores.main)
        return stores

    async def recover_outbox(self) -> int:
        """Publish outbox rows left pending by an earlier run (a crash); returns how many."""
        total = 0
        for store in self._own_stores():
            after = 0
            while True:
                rows = await store.pending_effects(limit=5000, after_seq=after)
                if not rows:
                    break
                await self.publisher.send(rows)
                await store.commit(self.publisher.take_marks())
                total += len(rows)
                after = rows[-1].seq
        if total:
            log.info("outbox_recovered", effects=total)
        return total

    async def release(self, kind: str, entity: str) -> dict[str, Any]:
        """Release a parked entity in the partition that holds its parked messages."""
        parked = await self.stores.parked(kind, entity)
        stream = parked[0].stream if parked else ""
        worker = next((w for w in self.workers if w.stream == stream), None)
        if worker is None:
            if len(self.workers) != 1 or self.subjects.partitions != 1:
                return {"error": f"{kind} {entity!r} has no parked messages"}
            worker = self.workers[0]
        return await worker.release(kind, entity)

    def health(self) -> dict[str, Any]:
        """Readiness and counters, for ``caresync health`` and ``status``."""
        return {
            "ready": self.ready,
            "started_at": self.started_at,
            "partitions": [
                {
                    "stream": w.stream,
                    "consumer": w.consumer_name,
                    "live_actors": w.live_actors,
                    **w.stats.as_dict(),
                    "stages": w.stages.as_dict(),
                }
                for w in self.workers
            ],
            "publisher": {
                "published": self.publisher.stats.published,
                "duplicates": self.publisher.stats.duplicates,
                "retries": self.publisher.stats.retries,
                "failed": self.publisher.stats.failed,
            },
        }
