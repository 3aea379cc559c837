"""``caresync replay rebuild`` and ``caresync replay snapshot``: the whole state from the log.

A rebuild runs with the router stopped (it takes the data-dir lock).  With
``router.processes = N > 1`` it runs in as many processes as the router does, each rebuilding
the partitions (and so the store files) that router process owns: this process catches up
with the reference data first, then starts the others (``--group G``, hidden) and rebuilds its
own share meanwhile; the summary adds theirs up.
"""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import anyio
import nats.js.errors
import orjson

from caresync.actors import default_registry
from caresync.cli.common import CommandError, Context, connect_client, print_json, tune_gc
from caresync.cli.replay import broker_url, lock_data_dir
from caresync.router.errors import RouterError
from caresync.router.logs import configure_logging
from caresync.router.processes import caresync_command, partitions_of
from caresync.router.refdata import RefDataCatalog
from caresync.router.replay import RebuildReport, rebuild
from caresync.router.service import make_transport, open_store, store_path, subjects_for
from caresync.router.snapshots import Restored, Snapshots, provision_bucket
from caresync.router.worker_settings import WorkerSettings
from caresync.store import partition_path


def _restored(r: Restored) -> dict[str, Any]:
    out: dict[str, Any] = {"streams": list(r.streams), "used": r.used}
    if r.reason:
        out["reason"] = r.reason
    if r.info is not None:
        out["offsets"] = r.info.offsets
        out["rows"] = r.info.rows
        out["taken_at"] = r.info.created_at
        out["bytes"] = r.info.size
    return out


def _offsets(offsets: dict[str, int]) -> str:
    return ", ".join(f"{stream} seq {seq}" for stream, seq in offsets.items())


# -- snapshot -------------------------------------------------------------------------------------
async def run_snapshot(ctx: Context, nats_flag: str | None, as_json: bool) -> int:
    """Snapshot every partition file of the data dir into JetStream now (router running or not)."""
    configure_logging("warning", ctx.config.log.format)
    async with AsyncExitStack() as stack:
        url = await broker_url(ctx, nats_flag, stack, beside_router=True)
        nc = await connect_client(url)
        stack.push_async_callback(nc.close)
        subjects = subjects_for(ctx.config)
        js = nc.jetstream()
        try:
            await provision_bucket(js, subjects, ctx.config.streams)
        except RouterError as exc:
            raise CommandError(str(exc)) from exc
        snapshots = Snapshots(js, subjects)
        main = store_path(ctx.config, ctx.data_dir)
        taken: list[dict[str, Any]] = []
        for p in range(subjects.partitions):
            path, stream = partition_path(main, p), subjects.input_stream(p)
            if not path.exists():
                raise CommandError(f"no store file {path} for partition {p} ({stream})")
            try:
                info = await snapshots.take(path, [stream])
            except nats.js.errors.NotFoundError as exc:
                raise CommandError(f"no stream {stream} at {url}: {exc}") from exc
            taken.append(
                {
                    "stream": stream,
                    "offset": info.offsets[stream],
                    "rows": info.rows,
                    "bytes": info.size,
                }
            )
    if as_json:
        print_json({"snapshots": taken})
    else:
        for t in taken:
            rows = ", ".join(f"{n} {table}" for table, n in t["rows"].items())
            print(f"{t['stream']}: snapshot at seq {t['offset']}, {t['bytes']:,} bytes ({rows})")
    return 0


# -- rebuild --------------------------------------------------------------------------------------
def _summary(report: RebuildReport) -> dict[str, Any]:
    return {
        "messages": report.messages,
        "entities": report.entities,
        "elapsed_s": round(report.elapsed_s, 3),
        "messages_per_s": round(report.messages / report.elapsed_s) if report.elapsed_s else 0,
        "pending_effects": report.pending_effects,
        "snapshots": [_restored(r) for r in report.snapshots],
        "restore_s": round(report.restore_s, 3),
        "warnings": list(report.warnings),
    }


async def run_rebuild(
    ctx: Context, nats_flag: str | None, as_json: bool, full: bool, group: int | None = None
) -> int:
    """Drop state and rebuild it; the router of this data dir must be stopped.

    From each file's snapshot in JetStream where one is sound, unless ``full``.  ``group``:
    this is one of the processes of a rebuild started by another (which holds the lock)."""
    configure_logging("warning", ctx.config.log.format)
    tune_gc()
    child = group is not None
    lock = None if child else lock_data_dir(ctx, "caresync replay rebuild", "a rebuild")
    cfg = ctx.config
    subjects = subjects_for(cfg)
    processes = max(1, min(cfg.router.processes, subjects.partitions))
    mine = partitions_of(group or 0, processes, subjects.partitions)
    try:
        async with AsyncExitStack() as stack:
            if not child:
                url = await broker_url(ctx, nats_flag, stack)
            elif nats_flag:
                url = nats_flag  # the first process's broker
            else:
                raise CommandError("a rebuild process of a group needs --nats")
            nc = await connect_client(url)
            stack.push_async_callback(nc.close)
            # A rebuild resets every partition's state: it may adopt a store written before
            # one file per partition, and leaves it in that layout (the first process).
            store = await open_store(
                cfg, ctx.data_dir, partitions=mine if child else None, adopt=not child
            )
            stack.push_async_callback(store.close)
            transport = make_transport(nc, cfg)
            catalog = RefDataCatalog()
            await catalog.restore(store.main)
            last = [0]

            def progress(n: int) -> None:
                if n - last[0] >= 10_000:
                    last[0] = n
                    print(f"replayed {n} messages", file=sys.stderr, flush=True)

            try:
                if not child:
                    # Catch up with the reference-data log (the store may have been lost too).
                    async with anyio.create_task_group() as tg:
                        await tg.start(
                            catalog.follow, transport, store.main, subjects.refdata_stream
                        )
                        tg.cancel_scope.cancel()
                started = time.monotonic()
                others: list[dict[str, Any]] = []
                failed: list[str] = []
                try:
                    async with anyio.create_task_group() as tg:
                        if not child:
                            for g in range(1, processes):
                                tg.start_soon(_other_process, ctx, url, full, g, others, failed)
                        report = await rebuild(
                            transport=transport,
                            store=store,
                            registry=default_registry(),
                            subjects=subjects,
                            settings=WorkerSettings.from_config(cfg),
                            progress=None if child else progress,
                            refdata=catalog.at,
                            snapshots=None if full else Snapshots(nc.jetstream(), subjects),
                            partitions=mine if processes > 1 else None,
                        )
                except BaseExceptionGroup as errors:
                    # The other processes are stopped; what went wrong here is what matters.
                    if len(errors.exceptions) == 1:
                        raise errors.exceptions[0] from None
                    raise
                if failed:
                    raise CommandError("; ".join(failed))
                elapsed_s = time.monotonic() - started
            except nats.js.errors.NotFoundError as exc:
                raise CommandError(f"no input stream to rebuild from at {url}: {exc}") from exc
        summary = _summary(report)
        for other in others:
            for name in ("messages", "entities", "pending_effects"):
                summary[name] += other[name]
            summary["snapshots"] += other["snapshots"]
            summary["warnings"] += other["warnings"]
            summary["restore_s"] = max(summary["restore_s"], other["restore_s"])
        if others:
            summary["elapsed_s"] = round(elapsed_s, 3)
            summary["messages_per_s"] = round(summary["messages"] / elapsed_s)
            summary["processes"] = processes
        if not child:
            for warning in summary["warnings"]:
                print(f"warning: {warning}", file=sys.stderr)
        if as_json or child:
            print_json(summary)
        else:
            _print_rebuilt(summary)
        return 0
    finally:
        if lock is not None:
            lock.release()


def _print_rebuilt(summary: dict[str, Any]) -> None:
    for r in summary["snapshots"]:
        streams = ", ".join(r["streams"])
        if r["used"]:
            print(f"{streams}: from the snapshot at {_offsets(r['offsets'])}")
        else:
            print(f"{streams}: from the start ({r['reason']})")
    across = f" in {summary['processes']} processes" if "processes" in summary else ""
    print(
        f"rebuilt {summary['entities']} entities from {summary['messages']} messages in "
        f"{summary['elapsed_s']} s{across} ({summary['messages_per_s']} msgs/s); "
        f"{summary['pending_effects']} effects never sent will go out at the next start"
    )


async def _other_process(
    ctx: Context,
    url: str,
    full: bool,
    group: int,
    out: list[dict[str, Any]],
    failed: list[str],
) -> None:
    """Run process ``group`` of the rebuild; its summary goes to ``out``, or why it failed
    to ``failed``."""
    command = [*caresync_command(), "replay", "rebuild", "--group", str(group), "--nats", url]
    command += ["--data-dir", str(ctx.data_dir)]
    if ctx.config_path is not None:
        command += ["--config", str(ctx.config_path)]
    if full:
        command.append("--full")
    done = await anyio.run_process(command, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        failed.append(
            f"the rebuild process of group {group} exited with {done.returncode}: "
            + " / ".join(tail)
        )
        return
    out.append(orjson.loads(done.stdout))
