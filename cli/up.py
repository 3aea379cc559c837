"""``caresync up``: the embedded broker (unless ``--nats``), the router, until SIGINT/SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from contextlib import AsyncExitStack

import anyio
from anyio.abc import TaskStatus

from caresync.cli.common import CommandError, Context, tune_gc
from caresync.cli.datadir import (
    DataDirError,
    DataDirLock,
    remove_server_record,
    write_server_record,
)
from caresync.codecs import Subjects
from caresync.config import Config
from caresync.router.embedded import EmbeddedNats
from caresync.router.logs import configure_logging
from caresync.router.processes import READY_LINE, RouterProcessError, exit_with_parent
from caresync.router.service import RouterService, subjects_for
from caresync.sim import SimServer, SimSettings
from caresync.store import StoreLayoutError, StoreSchemaError


def mappings_config(subjects: Subjects) -> str:
    """nats-server config for the partition mappings (empty with one partition)."""
    mappings = subjects.partition_mappings()
    if not mappings:
        return ""
    lines = "\n".join(f'  "{src}": "{dst}"' for src, dst in mappings.items())
    return f"mappings {{\n{lines}\n}}\n"


def wants_simulators(cfg: Config) -> bool:
    """Simulate billing, ERP and supply unless a connector points at a real endpoint.

    Real endpoints are an HTTP connector, or a NATS connector with another subject prefix
    than the simulators' (``sim``).
    """
    connectors = (cfg.downstream.billing, cfg.downstream.erp, cfg.downstream.supply)
    enabled = [c for c in connectors if c.enabled]
    return bool(enabled) and all(
        c.transport == "nats" and c.subject_prefix == "sim" for c in enabled
    )


async def run_up(ctx: Context, nats_url: str | None) -> int:
    """Run until a signal; exit status 0 after a clean stop."""
    cfg = ctx.config
    configure_logging(cfg.log.level, cfg.log.format)
    lock = DataDirLock(ctx.data_dir)
    try:
        lock.acquire("caresync up")
    except DataDirError as exc:
        raise CommandError(str(exc)) from exc
    try:
        async with AsyncExitStack() as stack:
            url = nats_url or cfg.nats.url
            embedded: EmbeddedNats | None = None
            if not url:
                embedded = EmbeddedNats(
                    ctx.data_dir, extra_config=mappings_config(subjects_for(cfg))
                )
                await embedded.start()
                # Stopped last: after the router has drained and committed.
                stack.push_async_callback(embedded.stop, 1.5)
                url = embedded.url
            service = RouterService(cfg, nats_url=url, data_dir=ctx.data_dir)
            with _store_refusals_as_errors():
                await _serve_up(ctx, cfg, service, url, embedded)
        remove_server_record(ctx.data_dir)
        print("caresync up: stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        lock.release()


@contextlib.contextmanager
def _store_refusals_as_errors() -> Iterator[None]:
    """A store refused at start (another layout, a newer schema) ends ``up`` with its reason,
    not a traceback."""
    try:
        yield
    except (StoreLayoutError, StoreSchemaError) as exc:
        raise CommandError(str(exc)) from exc
    except BaseExceptionGroup as group:
        refused = group.subgroup(lambda e: isinstance(e, StoreLayoutError | StoreSchemaError))
        if refused is None:
            raise
        leaf: BaseException = refused
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise CommandError(str(leaf)) from group


async def _serve_up(
    ctx: Context, cfg: Config, service: RouterService, url: str, embedded: EmbeddedNats | None
) -> None:
    """The embedded simulators (if wanted) and the router, until a signal."""
    async with anyio.create_task_group() as tg:
        signals = anyio.CancelScope()
        simulators = anyio.CancelScope()
        tg.start_soon(_stop_on_signal, service, signals)
        if wants_simulators(cfg):
            sim = SimServer(
                url,
                ctx.data_dir / "sim.db",
                SimSettings(router_prefix=cfg.streams.subject_prefix),
            )

            async def simulate(*, task_status: TaskStatus[None]) -> None:
                with simulators:
                    await sim.run(task_status=task_status)

            await tg.start(simulate)

        async def serve(*, task_status: TaskStatus[None]) -> None:
            try:
                await service.run(task_status=task_status)
            finally:
                # The simulators go after the router: its last effects still land.
                simulators.cancel()
                signals.cancel()

        await tg.start(serve)
        tune_gc()
        write_server_record(ctx.data_dir, url, embedded=embedded is not None)
        where = "embedded nats-server" if embedded else "NATS"
        print(
            f"caresync up: router ready, {where} at {url}, data in {ctx.data_dir}",
            flush=True,
        )


async def run_router_process(ctx: Context, nats_url: str | None, group: int, parent: int) -> int:
    """Process ``group`` of a multi-process router, as ``caresync up`` starts it: runs its
    partitions until SIGTERM (or its parent's death) and prints a ready line on stdout."""
    cfg = ctx.config
    configure_logging(cfg.log.level, cfg.log.format)
    if not 0 < group < cfg.router.processes:
        raise CommandError(
            f"--group {group} is not one of this router's other processes "
            f"(router.processes = {cfg.router.processes}: groups 1..{cfg.router.processes - 1})"
        )
    if not nats_url:
        raise CommandError("router-process needs --nats URL (the one `caresync up` uses)")
    try:
        exit_with_parent(parent)
    except RouterProcessError as exc:
        raise CommandError(str(exc)) from exc
    if not DataDirLock(ctx.data_dir).is_held():
        raise CommandError(
            f"no `caresync up` holds {ctx.data_dir}: router processes are started by it"
        )
    # One process per group: two would pull the same partitions and break per-entity order.
    lock = DataDirLock(ctx.data_dir, f"router-group-{group}.lock")
    try:
        lock.acquire(f"caresync router-process --group {group}")
    except DataDirError as exc:
        raise CommandError(str(exc)) from exc
    try:
        service = RouterService(
            cfg,
            nats_url=nats_url,
            data_dir=ctx.data_dir,
            group=group,
        )
        with _store_refusals_as_errors():
            async with anyio.create_task_group() as tg:
                signals = anyio.CancelScope()
                tg.start_soon(_stop_on_signal, service, signals, f"router-process {group}")

                async def serve(*, task_status: TaskStatus[None]) -> None:
                    try:
                        await service.run(task_status=task_status)
                    finally:
                        signals.cancel()

                await tg.start(serve)
                tune_gc()
                print(f"{READY_LINE}: group {group}", flush=True)
            return 0
    finally:
        lock.release()


async def _stop_on_signal(
    service: RouterService, scope: anyio.CancelScope, who: str = "caresync up"
) -> None:
    with scope, anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        # Keep the handler installed while draining: a second signal must not kill us midway.
        async for signum in received:
            print(
                f"{who}: {signal.Signals(signum).name} received, stopping",
                file=sys.stderr,
                flush=True,
            )
            service.stop()
