"""``caresync bench entities``: M booked appointments, then idle: resident memory, and the
time a restart takes to be ready.

1. A fresh embedded deployment; the router runs as ``caresync up --nats URL`` (its own
   process, so its RSS is its own; the embedded nats-server is another process, reported
   apart); the bench reference data is loaded.
2. M ``appointment.book`` commands, one per key, are published with PubAck and Msg-Id and
   the router is waited for until it has applied all of them and their fan-out (billing,
   procedure, supply, ERP, item reservations).  RSS now (**busy**).
3. The router is left idle until every actor is passivated (``router.idle_passivate_s``; with
   ``--quick`` 2 s unless ``CARESYNC_ROUTER__IDLE_PASSIVATE_S`` says otherwise); RSS again
   (**idle**, the figure), with the peak (VmHWM).
4. SIGTERM; once it has exited, ``caresync up`` again: **restart-to-ready** is the time from
   spawning it until the health control request (what ``caresync health`` asks) answers
   ready; the time to its ``router ready`` line is reported too.
5. The store, read after the second stop: every appointment booked exactly once.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import anyio
from anyio.abc import Process

from caresync.bench import fanout as fo
from caresync.bench import report
from caresync.bench.deployment import say
from caresync.bench.history import command_chunks, publish_chunks, stream_counts, wait_idle
from caresync.bench.live_router import (
    LEDGERS_NOTE,
    Deployment,
    checks_text,
    dir_mb,
    fresh_deployment,
    load_refdata,
    memory_mb,
    restart_router,
    start_router,
)
from caresync.bench.store_readback import (
    applied_commands,
    entities_by_kind,
    outbox_by_status,
    sizes_text,
    snapshot_sizes,
)
from caresync.router.logs import configure_logging

QUICK_M = 20_000
QUICK_IDLE_PASSIVATE_S = "2"
RSS_TARGET_MB = 400
RESTART_TARGET_S = 5.0
MEASURED = (
    "router process (caresync up --nats URL) VmRSS from /proc once every booking and its "
    "fan-out is applied (busy), and once every actor is passivated (idle); restart = spawn of a "
    "new caresync up after SIGTERM -> first health reply ready: true"
)


def _live_actors(record: dict[str, Any]) -> int:
    return sum(int(p.get("live_actors", 0)) for p in record.get("partitions", []))


async def wait_passivated(d: Deployment, process: Process, deadline_s: float) -> float:
    """Until the router has no live actor; the seconds it took (fails past the deadline)."""
    started = time.monotonic()
    while True:
        record = await fo.health(d.nc, d.subjects)
        if record and _live_actors(record) == 0:
            return time.monotonic() - started
        if process.returncode is not None:
            raise fo.BenchError(f"router exited with {process.returncode} while idle")
        if time.monotonic() - started > deadline_s:
            raise fo.BenchError(
                f"router still has {_live_actors(record)} live actors after {deadline_s:g} s idle"
            )
        await anyio.sleep(0.2)


async def measure(
    m: int, seed: int, quick: bool, base_dir: str | None, keep: bool, command_line: str
) -> dict[str, Any]:
    """Book, idle, restart; the run's result."""
    info = report.machine()
    defaults = {"CARESYNC_ROUTER__IDLE_PASSIVATE_S": QUICK_IDLE_PASSIVATE_S} if quick else {}
    async with fresh_deployment("caresync-bench-entities-", base_dir, keep, defaults) as d:
        idle_passivate_s = d.cfg.router.idle_passivate_s
        process = await start_router(d)
        stop_s = 0.0
        try:
            refdata = await load_refdata(d, process)
            say(f"entities: booking {m:,} appointments")
            started = time.monotonic()
            published = await publish_chunks(
                d.js, command_chunks(m, m, seed=seed, subjects=d.subjects)
            )
            done = await wait_idle(
                d.js, d.subjects, process, deadline_s=300.0 + published.messages / 50
            )
            book_s = done - started
            busy, nats_busy = memory_mb(process.pid), memory_mb(d.server.pid)
            live_busy = _live_actors(await fo.health(d.nc, d.subjects))
            say(
                f"entities: {published.messages:,} bookings applied in {book_s:.1f} s, router "
                f"RSS {busy['rss']:,.0f} MB; idle until every actor is passivated "
                f"(idle_passivate_s {idle_passivate_s:g})"
            )
            passivated_s = await wait_passivated(d, process, idle_passivate_s + 60.0)
            await anyio.sleep(2.0)
            idle, nats_idle = memory_mb(process.pid), memory_mb(d.server.pid)
            applied = fo.totals(await fo.health(d.nc, d.subjects))
            say(f"entities: idle RSS {idle['rss']:,.0f} MB; restarting")
        finally:
            with anyio.CancelScope(shield=True):
                stop_started = time.monotonic()
                first_exit = await fo.stop_router(process)
                stop_s = time.monotonic() - stop_started
        process, restart = await restart_router(d)
        try:
            after = memory_mb(process.pid)
            health_after = await fo.health(d.nc, d.subjects)
        finally:
            with anyio.CancelScope(shield=True):
                second_exit = await fo.stop_router(process)
        counts = await stream_counts(d.js, d.subjects)
        entities = entities_by_kind(d.db_path)
        snapshots = snapshot_sizes(d.db_path)
        booked = applied_commands(d.db_path, "appointment")
        outbox = outbox_by_status(d.db_path)
        sizes = {"jetstream_mb": dir_mb(d.tmp / "nats"), "sqlite_mb": dir_mb(d.router_dir)}
        cfg = d.cfg
    figures = {
        "router_rss_idle_mb": idle["rss"],
        "router_rss_busy_mb": busy["rss"],
        "router_rss_peak_mb": idle["hwm"],
        "router_rss_after_restart_mb": after["rss"],
        "nats_server_rss_busy_mb": nats_busy["rss"],
        "nats_server_rss_idle_mb": nats_idle["rss"],
        "restart_to_ready_s": round(restart.to_health_ready_s, 3),
        "restart_to_ready_line_s": round(restart.to_ready_line_s, 3),
        "stop_s": round(stop_s, 3),
        "booked": booked,
        "appointments": entities.get("appointment", 0),
        "entities": sum(entities.values()),
        "live_actors_busy": live_busy,
        "live_actors_idle": 0,
        "passivated_after_s": round(passivated_s, 2),
        "book_s": round(book_s, 2),
        "bookings_per_s": round(published.messages / book_s, 1),
        "rss_within_target": idle["rss"] <= RSS_TARGET_MB,
        "restart_within_target": restart.to_health_ready_s <= RESTART_TARGET_S,
    }
    checks = {
        "published": published.messages,
        "published_duplicates": published.duplicates,
        "stock_commands": refdata.stock_commands,
        "accepted": applied["accepted"],
        "refused": sum(applied[k] for k in ("rejected", "dead_lettered", "parked")),
        "input_messages": counts.input_messages,
        "internal_messages": counts.internal_messages,
        "dead_letters": counts.dead_letters,
        "ready_after_restart": bool(health_after.get("ready")),
        "router_exit": first_exit,
        "router_exit_after_restart": second_exit,
        "outbox": outbox,
    }
    r = cfg.router
    conditions = {
        "workload": "entities",
        "m": published.messages,
        "keys": published.keys,
        "seed": seed,
        "measured": MEASURED,
        "entities_by_kind": entities,
        "router": {
            "batch_size": r.batch_size,
            "partitions": cfg.streams.partitions,
            "storage": cfg.streams.storage,
            "synchronous": cfg.store.synchronous,
            "max_live_actors": r.max_live_actors,
            "idle_passivate_s": idle_passivate_s,
        },
        "durability": report.DURABILITY,
        "processes": "1 router (caresync up --nats) + 1 nats-server + 1 driver",
        "downstream": report.DOWNSTREAM,
        "sizes": sizes,
        "snapshots": snapshots,
        "targets": {"rss_mb": RSS_TARGET_MB, "restart_s": RESTART_TARGET_S},
    }
    return report.result_doc(command_line, figures, conditions, info, checks)


def ok(result: dict[str, Any]) -> bool:
    """Every appointment booked once, nothing refused, clean stops, ready after the restart."""
    f, c = result["figures"], result["checks"]
    return bool(
        f["booked"] == f["appointments"] == c["published"]
        and c["published_duplicates"] == 0
        and c["refused"] == 0
        and c["dead_letters"] == 0
        and c["ready_after_restart"]
        and c["router_exit"] == 0
        and c["router_exit_after_restart"] == 0
        and c["outbox"].get("pending", 0) == 0
    )


def rows(result: Any) -> list[tuple[str, str]]:
    """The table: conditions and machine first, then the figures."""
    c, m, f, k = result["conditions"], result["machine"], result["figures"], result["checks"]
    r, t = c["router"], c["targets"]
    return [
        (
            "workload",
            f"{c['m']:,} appointment.book commands, one per key, with PubAck and Msg-Id; "
            "bench reference data (1 item per card) loaded first",
        ),
        ("  entities", ", ".join(f"{kind} {v:,}" for kind, v in c["entities_by_kind"].items())),
        ("  snapshots", f"{sizes_text(c['snapshots'])}; {LEDGERS_NOTE}"),
        (
            "  input stream",
            f"{k['input_messages']:,} messages ({k['internal_messages']:,} internal fan-out)",
        ),
        ("measured", c["measured"]),
        (
            "router settings",
            f"batch_size {r['batch_size']}, partitions {r['partitions']}, storage {r['storage']}, "
            f"synchronous {r['synchronous']}, max_live_actors {r['max_live_actors']:,}, "
            f"idle_passivate_s {r['idle_passivate_s']:g}",
        ),
        ("durability", c["durability"]),
        ("downstream", c["downstream"]),
        ("processes", c["processes"]),
        *report.machine_rows(m),
        (
            "router RSS idle",
            f"{f['router_rss_idle_mb']:,.1f} MB (target <= {t['rss_mb']} MB: "
            f"{str(f['rss_within_target']).lower()}); busy {f['router_rss_busy_mb']:,.1f} MB "
            f"with {f['live_actors_busy']:,} live actors; peak {f['router_rss_peak_mb']:,.1f} MB; "
            f"after restart {f['router_rss_after_restart_mb']:,.1f} MB",
        ),
        (
            "nats-server RSS",
            f"idle {f['nats_server_rss_idle_mb']:,.1f} MB, busy "
            f"{f['nats_server_rss_busy_mb']:,.1f} MB",
        ),
        (
            "restart to ready",
            f"{f['restart_to_ready_s']:.2f} s to health ready (target <= {t['restart_s']:g} s: "
            f"{str(f['restart_within_target']).lower()}); {f['restart_to_ready_line_s']:.2f} s "
            f"to the ready line; the stop before it (SIGTERM, drain) {f['stop_s']:.2f} s",
        ),
        (
            "booked",
            f"{f['booked']:,} appointments booked, {f['appointments']:,} appointment entities, "
            f"{f['entities']:,} entities in all",
        ),
        (
            "bookings (not the figure)",
            f"{f['bookings_per_s']:,.0f} bookings/s with fan-out ({f['book_s']:.1f} s); every "
            f"actor passivated {f['passivated_after_s']:.1f} s after the last",
        ),
        (
            "on disk",
            f"JetStream {c['sizes']['jetstream_mb']:,} MB, SQLite {c['sizes']['sqlite_mb']:,} MB",
        ),
        ("checks", checks_text(k)),
    ]


async def run(args: argparse.Namespace, command_line: str) -> int:
    """The ``caresync bench entities`` command."""
    configure_logging("warning")
    m = QUICK_M if args.quick else args.m
    return await report.report_run(
        "entities",
        measure(m, args.seed, args.quick, getattr(args, "data_dir", None), args.keep, command_line),
        json_out=args.json,
        write_results=args.write_results,
        command_line=command_line,
        rows_of=rows,
        ok=ok,
    )
