"""The router on NATS: connect, provision streams, open the store, run, answer control requests."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NatsClient

from caresync.actors import default_registry
from caresync.actors.contract import Registry
from caresync.codecs import Subjects
from caresync.config import Config, dump_toml
from caresync.connectors.runner import run_connectors
from caresync.router.control import ControlResponder
from caresync.router.ingest import IngestSettings, IngestWorker
from caresync.router.jetstream import JetStreamTransport, connect
from caresync.router.processes import ProcessGroup, partitions_of
from caresync.router.provision import provision
from caresync.router.refdata import RefDataCatalog
from caresync.router.runtime import Router, RouterSettings
from caresync.router.snapshots import Snapshots, SnapshotTask, file_streams
from caresync.store import PartitionedStore

log = structlog.get_logger("caresync.service")

CHILD_CONFIG = "router-processes.toml"
"""The effective configuration process 0 hands to the others (in the data dir)."""


def subjects_for(cfg: Config) -> Subjects:
    """The subject taxonomy of a configuration."""
    return Subjects(
        prefix=cfg.streams.subject_prefix,
        stream_prefix=cfg.streams.stream_prefix,
        partitions=cfg.streams.partitions,
    )


def store_path(cfg: Config, data_dir: Path) -> Path:
    """Where the SQLite store lives: ``store.path``, relative to the data dir unless absolute."""
    path = Path(cfg.store.path)
    return path if path.is_absolute() else data_dir / path


async def open_store(
    cfg: Config,
    data_dir: Path,
    *,
    partitions: Sequence[int] | None = None,
    adopt: bool = False,
) -> PartitionedStore:
    """Open the store a configuration names: its main file and the files of ``partitions``
    (default every partition).  ``adopt``: see :meth:`PartitionedStore.open`."""
    subjects = subjects_for(cfg)
    return await PartitionedStore.open(
        store_path(cfg, data_dir),
        subjects.input_streams(),
        partitions=partitions,
        synchronous=cfg.store.synchronous,
        busy_timeout_ms=cfg.store.busy_timeout_ms,
        cache_mb=cfg.store.cache_mb,
        adopt=adopt,
    )


def make_transport(nc: object, cfg: Config) -> JetStreamTransport:
    """The JetStream transport sized from the configuration."""
    window = cfg.router.batch_size * (cfg.router.batches_in_flight + 2)
    return JetStreamTransport(
        nc,  # type: ignore[arg-type]
        batch=cfg.router.batch_size,
        expires_s=cfg.router.pull_expires_ms / 1000,
        ack_wait_s=cfg.router.ack_wait_s,
        max_ack_pending=max(window, 1000),
    )


class RouterService:
    """One router process's worth of work against a NATS server.

    ``group`` 0 is the primary process (the only one with ``router.processes = 1``): it
    provisions, ingests raw messages, runs the connectors, answers control requests and, with
    several processes, starts the others (:mod:`caresync.router.processes`).  A process of
    another group runs only its partitions and answers its own control subjects.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        nats_url: str,
        data_dir: Path,
        registry: Registry | None = None,
        group: int = 0,
    ) -> None:
        self.cfg = cfg
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.registry = registry or default_registry()
        self.subjects = subjects_for(cfg)
        self.group = group
        self.partitions = partitions_of(group, cfg.router.processes, cfg.streams.partitions)
        self.router: Router | None = None
        self.ingest: IngestWorker | None = None
        self.processes: ProcessGroup | None = None
        self.catalog = RefDataCatalog()
        """The reference data versions this router knows (followed from the refdata stream)."""
        self._stop = anyio.Event()

    @property
    def primary(self) -> bool:
        """Whether this is process 0 (provisioning, ingest, connectors, control)."""
        return self.group == 0

    def stop(self) -> None:
        """Ask the service to stop (safe before it has started)."""
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`stop`; ``task_status.started()`` once the router is ready."""
        cfg = self.cfg
        nc = await connect(
            self.nats_url, name=cfg.nats.name, connect_timeout_s=cfg.nats.connect_timeout_s
        )
        try:
            if self.primary:
                await provision(nc.jetstream(), self.subjects, cfg.streams)
            # Process 0 opens every partition's file (control reads them all); another
            # process only the files of its partitions (and the main one).
            opened = None if self.primary else self.partitions
            async with await open_store(cfg, self.data_dir, partitions=opened) as store:
                await self._serve(nc, store, task_status)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await nc.close()

    async def _serve(
        self, nc: NatsClient, store: PartitionedStore, task_status: TaskStatus[None]
    ) -> None:
        cfg = self.cfg
        transport = make_transport(nc, cfg)
        catalog = self.catalog
        await catalog.restore(store.main)
        router = Router(
            transport=transport,
            store=store,
            registry=self.registry,
            subjects=self.subjects,
            settings=RouterSettings.from_config(cfg),
            refdata=catalog.at,
            refdata_barrier=functools.partial(
                catalog.wait_current, transport, self.subjects.refdata_stream
            ),
            partitions=self.partitions,
            primary=self.primary,
        )
        self.router = router
        if self.primary and cfg.router.processes > 1:
            self.processes = ProcessGroup(
                nc,
                self.subjects,
                processes=cfg.router.processes,
                arguments=self._child_arguments(),
                shutdown_timeout_s=cfg.router.shutdown_timeout_s,
            )
        control = ControlResponder(
            nc,
            router,
            store,
            self.registry,
            self.subjects,
            group=self.group,
            processes=self.processes,
        )
        scopes: list[anyio.CancelScope] = []
        async with anyio.create_task_group() as tg:

            async def background(serve: Callable[..., Awaitable[None]], *args: object) -> None:
                """Start a task that runs until its scope is cancelled at the end."""
                scope = anyio.CancelScope()
                scopes.append(scope)

                async def run(*, task_status: TaskStatus[None]) -> None:
                    with scope:
                        await serve(*args, task_status=task_status)

                await tg.start(run)

            # Reference data first: no command is decided with data older than the log.
            await background(catalog.follow, transport, store.main, self.subjects.refdata_stream)
            await tg.start(router.run)
            ingest = None
            if self.primary:
                ingest = IngestWorker(
                    transport, store.main, self.subjects, IngestSettings.from_config(cfg)
                )
                self.ingest = ingest
                await tg.start(ingest.run)
            await background(control.serve)
            await background(
                SnapshotTask(
                    Snapshots(nc.jetstream(), self.subjects),
                    file_streams(store, self.subjects, self.partitions),
                    every_s=cfg.snapshots.every_s,
                    min_messages=cfg.snapshots.min_messages,
                ).run
            )
            if self.primary:
                # -- downstream connectors (issue 3, part 4): one worker per enabled system;
                # cancelled only once the router has drained.
                await background(run_connectors, nc, cfg, self.subjects, store.main)
            if self.processes is not None:
                await tg.start(self.processes.run)
            task_status.started()
            await self._stop.wait()
            if self.processes is not None:
                self.processes.stop()  # they drain their partitions while this one does
            if ingest is not None:
                ingest.stop()
            router.stop()
            await router.wait_stopped()
            if self.processes is not None:
                await self.processes.wait_stopped()
                # Their configuration may hold credentials: not left behind once they stopped.
                (self.data_dir / CHILD_CONFIG).unlink(missing_ok=True)
            for scope in reversed(scopes):
                scope.cancel()

    def _child_arguments(self) -> list[str]:
        """The other processes load this one's effective configuration, written to the data
        dir (only the owner may read it: it can hold credentials), whatever its sources."""
        path = self.data_dir / CHILD_CONFIG
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(dump_toml(self.cfg), encoding="utf-8")
        return ["--nats", self.nats_url, "--data-dir", str(self.data_dir), "--config", str(path)]
