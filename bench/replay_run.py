"""``caresync bench replay``: rebuild the state of a large history from JetStream; events/s.

1. **History, not timed.**  A fresh embedded deployment; the router runs as ``caresync up``;
   the bench reference data is loaded; then N commands over M appointment keys (book,
   reschedules, complete or cancel: :mod:`caresync.bench.workload` without re-sends) are
   published into the input stream with ``Nats-Msg-Id`` = command id, and the live router
   applies them once, fan-out included (its internal commands land in the same input stream,
   its downstream effects in the output stream).
2. **Rebuild, timed.**  The router is stopped (SIGTERM) and ``caresync replay rebuild --json``
   runs as its own process: :func:`caresync.router.replay.rebuild` reads the Msg-Ids of every
   stream (effects already sent), drops the derived state and re-applies every input stream
   from its first message.  The figure is rebuild()'s own time, start to done: **events/s =
   messages replayed / seconds**; the process's wall time and peak RSS are reported too.
3. **Check.**  The rebuilt entity states must equal the live router's, byte for byte, and the
   rebuild must find no effect left unsent.

``CS_BENCH_PROFILE=FILE`` runs the rebuild under cProfile, writes the stats to FILE and
prints the top 15 functions by cumulative time on stderr (the figures of such a run are
slowed down by the profiler).  Not a ``CARESYNC_*`` name: the configuration loader refuses
unknown ones.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from caresync.bench import fanout as fo
from caresync.bench import report
from caresync.bench.deployment import say
from caresync.bench.history import (
    command_chunks,
    kinds_text,
    publish_chunks,
    stream_counts,
    wait_idle,
)
from caresync.bench.live_router import (
    LEDGERS_NOTE,
    Deployment,
    checks_text,
    dir_mb,
    fresh_deployment,
    load_refdata,
    memory_mb,
    start_router,
)
from caresync.bench.store_readback import (
    entities_by_kind,
    outbox_by_status,
    sizes_text,
    snapshot_sizes,
    state_digest,
)
from caresync.bench.workload import KINDS
from caresync.router.logs import configure_logging
from caresync.router.processes import caresync_command

PROFILE_ENV = "CS_BENCH_PROFILE"
QUICK = (20_000, 2_000)
MEASURED = (
    "caresync replay rebuild (its own process, router stopped): rebuild() start to done = "
    "reset the derived state, fold every input-stream message (source commands and internal "
    "fan-out) through the pure actors in stream order (router/replay_fold.py), one SQLite "
    "transaction per ~50,000 messages, the streams' Msg-Ids read only if an effect is not in "
    "the outbox, nothing published"
)
HISTORY = (
    "N commands over M appointment keys (book, reschedules, complete 80% / cancel), no "
    "re-sends, published with PubAck and Msg-Id = command id, applied once by the live router "
    "(fan-out included) before the rebuild; bench reference data (1 item per card) loaded first"
)
_PROGRESS = re.compile(r"replayed (\d+) messages")


@dataclass(slots=True)
class RebuildRun:
    """What the ``caresync replay rebuild`` process reported and what we saw of it."""

    summary: dict[str, Any]
    wall_s: float
    rss_peak_mb: float
    progress: list[tuple[float, int]] = field(default_factory=list)

    def steady_per_s(self) -> float:
        """Messages/s between the first and the last progress line (the apply phase alone)."""
        if len(self.progress) < 2:
            return 0.0
        return _rate(self.progress[0], self.progress[-1])

    def quarter_rates(self) -> tuple[float, float]:
        """Messages/s over the first and the last quarter of the replay (0 if too few lines):
        a history whose snapshots grow makes every batch dearer than the one before."""
        if not self.progress:
            return 0.0, 0.0
        total = self.progress[-1][1]
        early = [p for p in self.progress if p[1] <= total // 4]
        late = [p for p in self.progress if p[1] >= total - total // 4]
        first = _rate(early[0], early[-1]) if len(early) > 1 else 0.0
        last = _rate(late[0], late[-1]) if len(late) > 1 else 0.0
        return first, last


def _rate(a: tuple[float, int], b: tuple[float, int]) -> float:
    return (b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else 0.0


def _rebuild_command(d: Deployment, profile: Path | None) -> list[str]:
    args = ["replay", "rebuild", "--nats", d.server.url, "--data-dir", str(d.router_dir), "--json"]
    command = caresync_command()
    if profile is None:
        return [*command, *args]
    if len(command) != 1:
        raise fo.BenchError(f"{PROFILE_ENV} needs the caresync script next to the interpreter")
    return [sys.executable, "-m", "cProfile", "-o", str(profile), command[0], *args]


async def rebuild_process(d: Deployment, profile: Path | None) -> RebuildRun:
    """Run ``caresync replay rebuild --json``; its summary, wall time, peak RSS, progress."""
    out = bytearray()
    err: list[str] = []
    progress: list[tuple[float, int]] = []
    peak = 0.0
    started = time.monotonic()
    process: Process = await anyio.open_process(
        _rebuild_command(d, profile), stdin=subprocess.DEVNULL, cwd=d.tmp, env=d.env
    )
    async with process:
        assert process.stdout is not None
        assert process.stderr is not None
        stdout, stderr = process.stdout, process.stderr

        async def read_out() -> None:
            async for chunk in stdout:
                out.extend(chunk)

        async def read_err() -> None:
            pending = ""
            async for text in TextReceiveStream(stderr, errors="replace"):
                *lines, pending = (pending + text).split("\n")
                for line in lines:
                    match = _PROGRESS.search(line)
                    if match:
                        progress.append((time.monotonic() - started, int(match[1])))
                    else:
                        err.append(line)

        async def sample(scope: anyio.CancelScope) -> None:
            nonlocal peak
            with scope:
                while True:
                    peak = max(peak, memory_mb(process.pid)["hwm"])
                    await anyio.sleep(0.1)

        sampler = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_out)
            tg.start_soon(read_err)
            tg.start_soon(sample, sampler)
            status = await process.wait()
            wall_s = time.monotonic() - started
            sampler.cancel()
    if status != 0:
        raise fo.BenchError(f"caresync replay rebuild exited with {status}:\n" + "\n".join(err))
    summary: dict[str, Any] = orjson.loads(bytes(out))
    return RebuildRun(summary, wall_s, peak, progress)


PROFILED_CODE = r"/(router|actors|codecs|store|cli)/|/nats/|aiosqlite|msgspec"
"""The functions the cumulative list keeps: the event loop's own frames say nothing."""


def print_profile(path: Path, top: int = 15) -> str:
    """A cProfile stats file as text: the ``top`` functions of caresync, nats-py, aiosqlite
    and msgspec by cumulative time, then the ``top`` of all by own time.

    cProfile sees the main thread only: SQLite runs in aiosqlite's thread, and the time the
    loop waits for it shows as ``select.epoll.poll``.
    """
    buffer = io.StringIO()
    stats = pstats.Stats(str(path), stream=buffer)
    stats.sort_stats("cumulative").print_stats(PROFILED_CODE, top)
    stats.sort_stats("tottime").print_stats(top)
    return buffer.getvalue()


async def measure(
    n: int, m: int, seed: int, base_dir: str | None, keep: bool, command_line: str
) -> dict[str, Any]:
    """Build the history, stop the router, time the rebuild; the run's result."""
    info = report.machine()
    profile = Path(os.environ[PROFILE_ENV]).resolve() if os.environ.get(PROFILE_ENV) else None
    async with fresh_deployment("caresync-bench-replay-", base_dir, keep) as d:
        process = await start_router(d)
        try:
            refdata = await load_refdata(d, process)
            say(f"replay: history of {n:,} commands over {m:,} keys, applied by the live router")
            live_started = time.monotonic()
            published = await publish_chunks(
                d.js, command_chunks(n, m, seed=seed, subjects=d.subjects)
            )
            say(f"replay: published in {published.elapsed_s:.1f} s; waiting for the router")
            live_done = await wait_idle(
                d.js, d.subjects, process, deadline_s=300.0 + 3 * published.messages / 100
            )
            live_s = live_done - live_started
            applied = fo.totals(await fo.health(d.nc, d.subjects))
        finally:
            with anyio.CancelScope(shield=True):
                router_exit = await fo.stop_router(process)
        counts = await stream_counts(d.js, d.subjects)
        live_entities = entities_by_kind(d.db_path)
        live_digest = state_digest(d.db_path)
        say(
            f"replay: history of {counts.input_messages:,} input messages "
            f"({counts.internal_messages:,} internal fan-out) applied live in {live_s:.1f} s; "
            "rebuilding"
        )
        nats_mem = memory_mb(d.server.pid)
        run = await rebuild_process(d, profile)
        rebuilt_entities = entities_by_kind(d.db_path)
        rebuilt_digest = state_digest(d.db_path)
        snapshots = snapshot_sizes(d.db_path)
        outbox = outbox_by_status(d.db_path)
        sizes = {"jetstream_mb": dir_mb(d.tmp / "nats"), "sqlite_mb": dir_mb(d.router_dir)}
        cfg = d.cfg
    s = run.summary
    elapsed = float(s["elapsed_s"])
    messages = int(s["messages"])
    steady = run.steady_per_s()
    first_quarter, last_quarter = run.quarter_rates()
    figures = {
        "events_per_s": round(messages / elapsed, 1),
        "source_events_per_s": round(counts.source_messages / elapsed, 1),
        "rebuild_s": round(elapsed, 3),
        "rebuild_wall_s": round(run.wall_s, 3),
        "messages_replayed": messages,
        "source_events": counts.source_messages,
        "internal_messages": counts.internal_messages,
        "entities": int(s["entities"]),
        "apply_phase_per_s": round(steady, 1),
        "apply_first_quarter_per_s": round(first_quarter, 1),
        "apply_last_quarter_per_s": round(last_quarter, 1),
        "first_progress_s": round(run.progress[0][0], 2) if run.progress else 0.0,
        "first_progress_messages": run.progress[0][1] if run.progress else 0,
        "rebuild_rss_peak_mb": run.rss_peak_mb,
        "nats_server_rss_mb": nats_mem["rss"],
        "pending_effects": int(s["pending_effects"]),
        "state_matches_live": live_digest == rebuilt_digest,
        "live_s": round(live_s, 2),
        "live_commands_per_s": round(published.messages / live_s, 1),
        "publish_per_s": round(published.messages / published.elapsed_s, 1),
    }
    checks = {
        "published": published.messages,
        "published_duplicates": published.duplicates,
        "stock_commands": refdata.stock_commands,
        "live_accepted": applied["accepted"],
        "live_refused": sum(applied[k] for k in ("rejected", "dead_lettered", "parked")),
        "input_messages": counts.input_messages,
        "replayed_all": messages == counts.input_messages,
        "entities_live": sum(live_entities.values()),
        "entities_rebuilt": sum(rebuilt_entities.values()),
        "outbox": outbox,
        "dead_letters": counts.dead_letters,
        "router_exit": router_exit,
    }
    r = cfg.router
    conditions = {
        "workload": "replay",
        "n": published.messages,
        "m": published.keys,
        "kinds": dict(published.kinds),
        "kinds_text": kinds_text(published.kinds, KINDS),
        "seed": seed,
        "history": HISTORY,
        "measured": MEASURED,
        "entities_by_kind": rebuilt_entities,
        "output_messages": counts.output_messages,
        "router": {
            "batch_size": r.batch_size,
            "partitions": cfg.streams.partitions,
            "storage": cfg.streams.storage,
            "synchronous": cfg.store.synchronous,
            "max_live_actors": r.max_live_actors,
        },
        "durability": report.DURABILITY,
        "processes": (
            "rebuild: 1 caresync replay rebuild process + 1 nats-server (router stopped); "
            "history: 1 router + 1 driver + 1 nats-server"
        ),
        "sizes": sizes,
        "snapshots": snapshots,
        "profiled": str(profile) if profile else "",
    }
    if profile is not None:
        say(f"profile of the rebuild ({profile}):\n{print_profile(profile)}")
    return report.result_doc(command_line, figures, conditions, info, checks)


def ok(result: dict[str, Any]) -> bool:
    """The rebuild read everything, matched the live state and found nothing unsent."""
    f, c = result["figures"], result["checks"]
    return bool(
        f["state_matches_live"]
        and f["pending_effects"] == 0
        and c["replayed_all"]
        and c["published_duplicates"] == 0
        and c["live_refused"] == 0
        and c["dead_letters"] == 0
        and c["entities_live"] == c["entities_rebuilt"]
        and c["router_exit"] == 0
    )


def rows(result: Any) -> list[tuple[str, str]]:
    """The table: conditions and machine first, then the figures."""
    c, m, f, k = result["conditions"], result["machine"], result["figures"], result["checks"]
    r = c["router"]
    return [
        ("history", f"{c['n']:,} commands over {c['m']:,} appointment keys ({c['kinds_text']})"),
        ("  how it was made", c["history"]),
        (
            "  input stream",
            f"{k['input_messages']:,} messages: {f['source_events']:,} source events "
            f"({c['n']:,} commands + {k['stock_commands']:,} stock) + "
            f"{f['internal_messages']:,} internal fan-out (cs.int); "
            f"{c['output_messages']:,} downstream effects in the output stream",
        ),
        ("  entities", ", ".join(f"{kind} {v:,}" for kind, v in c["entities_by_kind"].items())),
        ("  snapshots", f"{sizes_text(c['snapshots'])}; {LEDGERS_NOTE}"),
        ("measured", c["measured"]),
        (
            "router settings",
            f"batch_size {r['batch_size']}, partitions {r['partitions']}, storage {r['storage']}, "
            f"synchronous {r['synchronous']}, max_live_actors {r['max_live_actors']:,}",
        ),
        ("durability", c["durability"]),
        ("processes", c["processes"]),
        *report.machine_rows(m),
        (
            "replay events/s",
            f"{f['events_per_s']:,.0f} messages replayed/s ({f['messages_replayed']:,} in "
            f"{f['rebuild_s']:.2f} s); {f['source_events_per_s']:,.0f} source events/s",
        ),
        (
            "  where the time went",
            f"apply phase {f['apply_phase_per_s']:,.0f} msgs/s (between progress lines; first "
            f"quarter {f['apply_first_quarter_per_s']:,.0f}, last quarter "
            f"{f['apply_last_quarter_per_s']:,.0f}); "
            f"first progress line ({f['first_progress_messages']:,} replayed) "
            f"{f['first_progress_s']:.2f} s after spawn (start-up, Msg-Id scan of every stream, "
            f"reset and those messages); process wall {f['rebuild_wall_s']:.2f} s",
        ),
        (
            "  memory",
            f"rebuild process peak RSS {f['rebuild_rss_peak_mb']:,.1f} MB; nats-server RSS "
            f"{f['nats_server_rss_mb']:,.1f} MB; on disk JetStream {c['sizes']['jetstream_mb']:,} "
            f"MB, SQLite {c['sizes']['sqlite_mb']:,} MB",
        ),
        ("  entities rebuilt", f"{f['entities']:,}"),
        ("  state = live state", str(f["state_matches_live"]).lower()),
        ("  effects left unsent", f"{f['pending_effects']:,}"),
        (
            "history, live (not the figure)",
            f"first application by the live router {f['live_commands_per_s']:,.0f} commands/s "
            f"({f['live_s']:.1f} s, fan-out included); publish {f['publish_per_s']:,.0f} msgs/s",
        ),
        ("checks", checks_text(k)),
        *((("profiled", c["profiled"]),) if c["profiled"] else ()),
    ]


async def run(args: argparse.Namespace, command_line: str) -> int:
    """The ``caresync bench replay`` command."""
    configure_logging("warning")
    n, m = QUICK if args.quick else (args.n, args.m)
    return await report.report_run(
        "replay",
        measure(n, m, args.seed, getattr(args, "data_dir", None), args.keep, command_line),
        json_out=args.json,
        write_results=args.write_results,
        command_line=command_line,
        rows_of=rows,
        ok=ok,
    )
