"""The router on NATS: connect, provision streams, open the store, run, answer control requests."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus

from caresync.actors import default_registry
from caresync.actors.contract import Registry
from caresync.codecs import Subjects
from caresync.config import Config
from caresync.connectors.runner import run_connectors
from caresync.router.control import ControlResponder
from caresync.router.ingest import IngestSettings, IngestWorker
from caresync.router.jetstream import JetStreamTransport, connect
from caresync.router.provision import provision
from caresync.router.refdata import RefDataCatalog
from caresync.router.runtime import Router, RouterSettings
from caresync.store import Store

log = structlog.get_logger("caresync.service")


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


async def open_store(cfg: Config, data_dir: Path) -> Store:
    """Open the store a configuration names."""
    return await Store.open(
        store_path(cfg, data_dir),
        synchronous=cfg.store.synchronous,
        busy_timeout_ms=cfg.store.busy_timeout_ms,
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
    """One router process's worth of work against a NATS server."""

    def __init__(
        self,
        cfg: Config,
        *,
        nats_url: str,
        data_dir: Path,
        registry: Registry | None = None,
    ) -> None:
        self.cfg = cfg
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.registry = registry or default_registry()
        self.subjects = subjects_for(cfg)
        self.router: Router | None = None
        self.ingest: IngestWorker | None = None
        self.catalog = RefDataCatalog()
        """The reference data versions this router knows (followed from the refdata stream)."""
        self._stop = anyio.Event()

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
            await provision(nc.jetstream(), self.subjects, cfg.streams)
            async with await open_store(cfg, self.data_dir) as store:
                transport = make_transport(nc, cfg)
                catalog = self.catalog
                await catalog.restore(store)
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
                )
                self.router = router
                control = ControlResponder(nc, router, store, self.registry, self.subjects)
                async with anyio.create_task_group() as tg:
                    # Reference data first: no command is decided with data older than the log.
                    refdata_scope = anyio.CancelScope()

                    async def follow_refdata(*, task_status: TaskStatus[None]) -> None:
                        with refdata_scope:
                            await catalog.follow(
                                transport,
                                store,
                                self.subjects.refdata_stream,
                                task_status=task_status,
                            )

                    await tg.start(follow_refdata)
                    await tg.start(router.run)
                    ingest = IngestWorker(
                        transport, store, self.subjects, IngestSettings.from_config(cfg)
                    )
                    self.ingest = ingest
                    await tg.start(ingest.run)
                    control_scope = anyio.CancelScope()

                    async def serve_control() -> None:
                        with control_scope:
                            await control.serve()

                    tg.start_soon(serve_control)
                    # -- downstream connectors (issue 3, part 4): one worker per enabled system;
                    # cancelled only once the router has drained.
                    connectors_scope = anyio.CancelScope()

                    async def serve_connectors(*, task_status: TaskStatus[None]) -> None:
                        with connectors_scope:
                            await run_connectors(
                                nc, cfg, self.subjects, store, task_status=task_status
                            )

                    await tg.start(serve_connectors)
                    # -- end of downstream connectors
                    task_status.started()
                    await self._stop.wait()
                    ingest.stop()
                    router.stop()
                    await router.wait_stopped()
                    connectors_scope.cancel()
                    control_scope.cancel()
                    refdata_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await nc.close()
