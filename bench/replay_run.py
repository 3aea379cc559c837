"""``caresync bench replay``: rebuild the state of a large history from JetStream; events/s.

1. **History, not timed.**  A fresh embedded deployment; the router runs as ``caresync up``;
   the bench reference data is loaded; then N commands over M appointment keys (book,
   reschedules, complete or cancel: :mod:`caresync.bench.workload` without re-sends) are
   published into the input stream with ``Nats-Msg-Id`` = command id, and the live router
   applies them once, fan-out included (its internal commands land in the same input stream,
   its downstream effects in the output stream).  After the first ``1 - tail`` of the
   commands, ``caresync replay snapshot`` puts a state snapshot into JetStream while the
   router runs (as its own periodic task would); the last ``tail`` of them come after it.
2. **Rebuild, timed, twice.**  The router is stopped (SIGTERM) and ``caresync replay rebuild
   --json`` runs as its own process: :func:`caresync.router.replay.rebuild` restores the
   snapshot and folds the streams' tail past it.  Then ``caresync replay rebuild --full``
   drops the state and folds every input message from the first.  Each figure is
   rebuild()'s own time, start to done: **events/s = input messages of the history (or its
   source events) / seconds** -- the state of the whole history is what each one rebuilds.
3. **Check.**  Both rebuilt states must equal the live router's, byte for byte, and neither
   rebuild may find an effect left unsent.

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
    split_at,
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
    "caresync replay rebuild (its own process, one per router process; router stopped): "
    "rebuild() start to done, over all the processes = "
    "fetch the store file's state snapshot from the JetStream object store, check it is sound "
    "here, restore it in one SQLite transaction, then fold the input-stream messages past its "
    "offset (router/replay_fold.py), nothing published"
)
MEASURED_FULL = (
    "caresync replay rebuild --full: reset the derived state, fold every input-stream message "
    "(source commands and internal fan-out) through the pure actors in stream order, one SQLite "
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


def _rebuild_command(d: Deployment, profile: Path | None, full: bool) -> list[str]:
    args = ["replay", "rebuild", "--nats", d.server.url, "--data-dir", str(d.router_dir), "--json"]
    if full:
        args.append("--full")
    command = caresync_command()
    if profile is None:
        return [*command, *args]
    if len(command) != 1:
        raise fo.BenchError(f"{PROFILE_ENV} needs the caresync script next to the interpreter")
    return [sys.executable, "-m", "cProfile", "-o", str(profile), command[0], *args]


async def snapshot_process(d: Deployment) -> tuple[dict[str, Any], float]:
    """Run ``caresync replay snapshot --json`` beside the running router; its summary, wall s."""
    args = ["replay", "snapshot", "--nats", d.server.url, "--data-dir", str(d.router_dir)]
    started = time.monotonic()
    done = await anyio.run_process(
        [*caresync_command(), *args, "--json"], cwd=d.tmp, env=d.env, check=False
    )
    if done.returncode != 0:
        raise fo.BenchError(
            f"caresync replay snapshot exited with {done.returncode}:\n"
            + done.stderr.decode(errors="replace")
        )
    files = orjson.loads(done.stdout)["snapshots"]
    # One per partition file: the offsets (messages before the snapshots) and sizes add up.
    taken = {
        "offset": sum(int(f["offset"]) for f in files),
        "bytes": sum(int(f["bytes"]) for f in files),
        "files": len(files),
    }
    return taken, time.monotonic() - started


async def rebuild_process(d: Deployment, profile: Path | None, *, full: bool) -> RebuildRun:
    """Run ``caresync replay rebuild --json``; its summary, wall time, peak RSS, progress."""
    out = bytearray()
    err: list[str] = []
    progress: list[tuple[float, int]] = []
    peak = 0.0
    started = time.monotonic()
    process: Process = await anyio.open_process(
        _rebuild_command(d, profile, full), stdin=subprocess.DEVNULL, cwd=d.tmp, env=d.env
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


def _rebuild_figures(run: RebuildRun, counts: Any) -> dict[str, Any]:
    """One rebuild's figures: the history's messages and source events per second of it."""
    s = run.summary
    elapsed, restore_s = float(s["elapsed_s"]), float(s["restore_s"])
    folding_s, snapshots = elapsed - restore_s, s["snapshots"]
    first_quarter, last_quarter = run.quarter_rates()
    return {
        "events_per_s": round(counts.commands / elapsed, 1),
        "source_events_per_s": round(counts.source_messages / elapsed, 1),
        "rebuild_s": round(elapsed, 3),
        "restore_s": restore_s,
        "rebuild_wall_s": round(run.wall_s, 3),
        "messages_replayed": int(s["messages"]),
        "fold_per_s": round(int(s["messages"]) / folding_s, 1) if folding_s > 0 else 0.0,
        "entities": int(s["entities"]),
        "apply_phase_per_s": round(run.steady_per_s(), 1),
        "apply_first_quarter_per_s": round(first_quarter, 1),
        "apply_last_quarter_per_s": round(last_quarter, 1),
        "first_progress_s": round(run.progress[0][0], 2) if run.progress else 0.0,
        "first_progress_messages": run.progress[0][1] if run.progress else 0,
        "rss_peak_mb": run.rss_peak_mb,
        "pending_effects": int(s["pending_effects"]),
        "snapshot_used": bool(snapshots) and all(r["used"] for r in snapshots),
        "snapshot_reasons": [r["reason"] for r in snapshots if r.get("reason")],
    }


async def measure(
    n: int,
    m: int,
    tail: float,
    processes: int,
    seed: int,
    base_dir: str | None,
    keep: bool,
    command_line: str,
) -> dict[str, Any]:
    """Build the history (a state snapshot at 1 - tail of it), stop the router, time the
    rebuild from the snapshot and the full one; the run's result."""
    if not 0.0 <= tail < 1.0:
        raise fo.BenchError(f"--tail must be at least 0 and below 1, not {tail}")
    info = report.machine()
    profile = Path(os.environ[PROFILE_ENV]).resolve() if os.environ.get(PROFILE_ENV) else None
    head_n = n - round(n * tail)
    env = fo.with_processes({}, processes)
    async with fresh_deployment("caresync-bench-replay-", base_dir, keep, env) as d:
        process = await start_router(d)
        try:
            refdata = await load_refdata(d, process)
            say(f"replay: history of {n:,} commands over {m:,} keys, applied by the live router")
            live_started = time.monotonic()
            head, rest = split_at(command_chunks(n, m, seed=seed, subjects=d.subjects), head_n)
            published = await publish_chunks(d.js, head)
            await wait_idle(d.js, d.subjects, process, deadline_s=300.0 + 3 * head_n / 100)
            say(f"replay: {head_n:,} commands applied; state snapshot, the router running")
            taken, snapshot_wall_s = await snapshot_process(d)
            say(
                f"replay: {taken['files']} snapshot(s) at {taken['offset']:,} input messages, "
                f"{taken['bytes'] / 1e6:,.1f} MB "
                f"in {snapshot_wall_s:.1f} s; publishing the last {n - head_n:,} commands"
            )
            published = published + await publish_chunks(d.js, rest)
            live_done = await wait_idle(
                d.js, d.subjects, process, deadline_s=300.0 + 3 * published.messages / 100
            )
            live_s = live_done - live_started - snapshot_wall_s
            applied = fo.totals(await fo.health(d.nc, d.subjects))
        finally:
            with anyio.CancelScope(shield=True):
                router_exit = await fo.stop_router(process)
        counts = await stream_counts(d.js, d.subjects)
        live_entities = entities_by_kind(d.db_path)
        live_digest = state_digest(d.db_path)
        say(
            f"replay: history of {counts.input_messages:,} input messages "
            f"({counts.internal_messages:,} internal fan-out) and {counts.local_records:,} local "
            f"records applied live in {live_s:.1f} s; "
            "rebuilding from the snapshot"
        )
        nats_mem = memory_mb(d.server.pid)
        run = await rebuild_process(d, profile, full=False)
        from_snapshot_digest = state_digest(d.db_path)
        from_snapshot_entities = entities_by_kind(d.db_path)
        say(f"replay: from the snapshot in {run.summary['elapsed_s']} s; rebuilding in full")
        full = await rebuild_process(d, None, full=True)
        rebuilt_entities = entities_by_kind(d.db_path)
        rebuilt_digest = state_digest(d.db_path)
        snapshots = snapshot_sizes(d.db_path)
        outbox = outbox_by_status(d.db_path)
        sizes = {"jetstream_mb": dir_mb(d.tmp / "nats"), "sqlite_mb": dir_mb(d.router_dir)}
        cfg = d.cfg
    fast = _rebuild_figures(run, counts)
    slow = _rebuild_figures(full, counts)
    figures = {
        **fast,
        "state_matches_live": live_digest == from_snapshot_digest,
        "snapshot_offset": int(taken["offset"]),
        "snapshot_bytes": int(taken["bytes"]),
        "snapshot_take_wall_s": round(snapshot_wall_s, 3),
        "tail_commands": n - head_n,
        "full": {**slow, "state_matches_live": live_digest == rebuilt_digest},
        "speedup_vs_full": round(slow["rebuild_s"] / fast["rebuild_s"], 2)
        if fast["rebuild_s"]
        else 0.0,
        "source_events": counts.source_messages,
        "internal_messages": counts.internal_messages,
        "local_records": counts.local_records,
        "nats_server_rss_mb": nats_mem["rss"],
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
        "snapshot_used": fast["snapshot_used"],
        "tail_replayed": fast["messages_replayed"] == counts.input_messages - taken["offset"],
        "replayed_all": slow["messages_replayed"] == counts.input_messages,
        "entities_live": sum(live_entities.values()),
        "entities_from_snapshot": sum(from_snapshot_entities.values()),
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
        "tail": tail,
        "kinds": dict(published.kinds),
        "kinds_text": kinds_text(published.kinds, KINDS),
        "seed": seed,
        "history": HISTORY,
        "measured": MEASURED,
        "measured_full": MEASURED_FULL,
        "entities_by_kind": rebuilt_entities,
        "output_messages": counts.output_messages,
        "router": {
            "batch_size": r.batch_size,
            "partitions": cfg.streams.partitions,
            "storage": cfg.streams.storage,
            "synchronous": cfg.store.synchronous,
            "max_live_actors": r.max_live_actors,
            "processes": r.processes,
        },
        "durability": report.DURABILITY,
        "processes": (
            f"rebuild: caresync replay rebuild in {r.processes} process(es), one per router "
            "process, each on its partitions' files + 1 nats-server (router stopped); history: "
            f"router in {r.processes} process(es) + 1 driver + 1 nats-server (+ caresync replay "
            "snapshot once)"
        ),
        "sizes": sizes,
        "snapshots": snapshots,
        "profiled": str(profile) if profile else "",
    }
    if profile is not None:
        say(f"profile of the rebuild ({profile}):\n{print_profile(profile)}")
    return report.result_doc(command_line, figures, conditions, info, checks)


def ok(result: dict[str, Any]) -> bool:
    """Both rebuilds matched the live state and found nothing unsent; the snapshot was used
    and only the tail past it folded; the full one read everything."""
    f, c = result["figures"], result["checks"]
    return bool(
        f["state_matches_live"]
        and f["full"]["state_matches_live"]
        and f["pending_effects"] == 0
        and f["full"]["pending_effects"] == 0
        and c["snapshot_used"]
        and c["tail_replayed"]
        and c["replayed_all"]
        and c["published_duplicates"] == 0
        and c["live_refused"] == 0
        and c["dead_letters"] == 0
        and c["entities_live"] == c["entities_rebuilt"] == c["entities_from_snapshot"]
        and c["router_exit"] == 0
    )


def _where(f: dict[str, Any]) -> str:
    return (
        f"apply phase {f['apply_phase_per_s']:,.0f} msgs/s (between progress lines; first "
        f"quarter {f['apply_first_quarter_per_s']:,.0f}, last quarter "
        f"{f['apply_last_quarter_per_s']:,.0f}); first progress line "
        f"({f['first_progress_messages']:,} replayed) {f['first_progress_s']:.2f} s after spawn; "
        f"process wall {f['rebuild_wall_s']:.2f} s, peak RSS {f['rss_peak_mb']:,.1f} MB (the "
        "progress lines and RSS are the first rebuild process's)"
    )


def rows(result: Any) -> list[tuple[str, str]]:
    """The table: conditions and machine first, then the figures."""
    c, m, f, k = result["conditions"], result["machine"], result["figures"], result["checks"]
    r, full = c["router"], f["full"]
    return [
        ("history", f"{c['n']:,} commands over {c['m']:,} appointment keys ({c['kinds_text']})"),
        ("  how it was made", c["history"]),
        (
            "  input stream",
            f"{k['input_messages']:,} messages: {f['source_events']:,} source events "
            f"({c['n']:,} commands + {k['stock_commands']:,} stock) + "
            f"{f['internal_messages']:,} internal fan-out to another partition (cs.int); "
            f"{f['local_records']:,} internal commands applied with their cause, in the local "
            "stream (cs.loc: derived again by a rebuild, not read); "
            f"{c['output_messages']:,} downstream effects in the output stream",
        ),
        (
            "  state snapshot",
            f"taken by `caresync replay snapshot` with the router running, after "
            f"{c['n'] - f['tail_commands']:,} commands: {f['snapshot_offset']:,} input messages, "
            f"{f['snapshot_bytes'] / 1e6:,.1f} MB, {f['snapshot_take_wall_s']:.2f} s (process "
            f"wall); {f['tail_commands']:,} commands ({c['tail']:.0%}) came after it",
        ),
        ("  entities", ", ".join(f"{kind} {v:,}" for kind, v in c["entities_by_kind"].items())),
        ("  entity snapshots", f"{sizes_text(c['snapshots'])}; {LEDGERS_NOTE}"),
        ("measured", c["measured"]),
        ("  and in full", c["measured_full"]),
        (
            "router settings",
            f"batch_size {r['batch_size']}, partitions {r['partitions']}, storage {r['storage']}, "
            f"synchronous {r['synchronous']}, max_live_actors {r['max_live_actors']:,}, "
            f"processes {r.get('processes', 1)}",
        ),
        ("durability", c["durability"]),
        ("processes", c["processes"]),
        *report.machine_rows(m),
        (
            "replay events/s",
            f"from the snapshot: {f['events_per_s']:,.0f} history commands/s, "
            f"{f['source_events_per_s']:,.0f} source events/s ({k['input_messages']:,} input "
            f"messages + {f['local_records']:,} local records rebuilt in {f['rebuild_s']:.2f} s: "
            f"restore {f['restore_s']:.2f} s + fold of "
            f"{f['messages_replayed']:,} tail messages at {f['fold_per_s']:,.0f}/s)",
        ),
        (
            "  in full (--full)",
            f"{full['events_per_s']:,.0f} commands/s, {full['source_events_per_s']:,.0f} source "
            f"events/s ({full['messages_replayed']:,} folded in {full['rebuild_s']:.2f} s); the "
            f"snapshot's rebuild is {f['speedup_vs_full']:.1f}x faster",
        ),
        ("  where the time went", _where(f)),
        ("  ... in full", _where(full)),
        (
            "  memory",
            f"nats-server RSS {f['nats_server_rss_mb']:,.1f} MB; on disk JetStream "
            f"{c['sizes']['jetstream_mb']:,} MB, SQLite {c['sizes']['sqlite_mb']:,} MB",
        ),
        ("  entities rebuilt", f"{f['entities']:,} (in full {full['entities']:,})"),
        (
            "  state = live state",
            f"{str(f['state_matches_live']).lower()} (in full "
            f"{str(full['state_matches_live']).lower()})",
        ),
        (
            "  effects left unsent",
            f"{f['pending_effects']:,} (in full {full['pending_effects']:,})",
        ),
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
        measure(
            n,
            m,
            args.tail,
            args.processes,
            args.seed,
            getattr(args, "data_dir", None),
            args.keep,
            command_line,
        ),
        json_out=args.json,
        write_results=args.write_results,
        command_line=command_line,
        rows_of=rows,
        ok=ok,
    )
