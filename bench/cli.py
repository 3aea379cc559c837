"""``caresync bench fanout``: one fresh embedded deployment, caresync and the raw loop, figures.

Before anything is timed, the bench reference data (:mod:`caresync.bench.refdata`) is written
as CSV files and loaded with ``caresync refdata load``; the router is waited for until it keeps
that version and has applied its stock commands.  The pure actors then run the same messages
in-process (:mod:`caresync.bench.expected`): that gives the counters the phases wait for, the
fan-out per command kind, the moves the raw loop must make, and everything exactly-once is
checked against.

Also runnable as ``python -m caresync.bench.cli`` (from outside the repository).
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from caresync.bench import fanout as fo
from caresync.bench import report
from caresync.bench.args import add_arguments
from caresync.bench.deployment import measure, say
from caresync.bench.expected import Expected, PureRouter, combine, fanout_by_kind, run_pure
from caresync.bench.peer import run_restate
from caresync.bench.refdata import read_back, write_csv
from caresync.bench.workload import SEED, Workload, build_workload
from caresync.cli.refdata import stock_commands
from caresync.codecs import Subjects
from caresync.config import Config, load_config
from caresync.router.embedded import EmbeddedNats
from caresync.router.logs import configure_logging
from caresync.router.service import store_path, subjects_for


@dataclass(frozen=True, slots=True)
class Options:
    """What one ``bench fanout`` run does."""

    n: int = 20_000
    m: int = 2_000
    items: int = 1
    latency_n: int = 0
    seed: int = SEED
    json: bool = False
    write_results: bool = False
    base_dir: str | None = None
    keep: bool = False
    command_line: str = "caresync bench fanout"
    workload: str = "fanout"
    levels: tuple[float, ...] = (0.5,)
    """Latency phases, as fractions of the measured peak."""
    peer: str = ""
    peer_runs: int = 1
    processes: int = 1
    """Router processes."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, command_line: str) -> Options:
        """From the parsed ``caresync bench`` (or ``python -m caresync.bench.cli``) arguments."""
        n, m = (2_000, 200) if args.quick else (args.n, args.m)
        latency = args.workload == "latency"
        default_lat = (min(4_000, n) if latency else min(2_000, n // 4)) if not args.quick else 500
        return cls(
            n=n,
            m=m,
            items=getattr(args, "items", DEFAULT_ITEMS),
            latency_n=getattr(args, "latency_n", 0) or default_lat,
            workload="latency" if latency else "fanout",
            levels=LATENCY_LEVELS if latency else (0.5,),
            peer=getattr(args, "peer", "") or "",
            peer_runs=getattr(args, "peer_runs", 1),
            processes=getattr(args, "processes", 1),
            seed=getattr(args, "seed", SEED),
            json=args.json,
            write_results=args.write_results,
            base_dir=getattr(args, "data_dir", None),
            keep=getattr(args, "keep", False),
            command_line=command_line,
        )


_say = say
DEFAULT_ITEMS = 3
"""Items per bench preference card: 3, as the Restate peer's supply fan-out."""
LATENCY_LEVELS = (0.25, 0.5, 0.75)


async def run_bench(args: argparse.Namespace, ctx: Any) -> int:
    """The ``caresync bench`` command (``ctx`` is unused: the router runs on defaults + env)."""
    command_line = shlex.join(["caresync", *sys.argv[1:]]) if sys.argv[1:] else "caresync bench"
    return await run_bench_args(args, command_line)


async def run(opts: Options) -> int:
    """Run, print (table or JSON), record if asked; exit status 1 unless exactly once."""
    configure_logging("warning")
    try:
        result = await run_fanout(opts)
    except fo.BenchError as exc:
        if opts.json:
            print(orjson.dumps({"error": str(exc), "exactly_once": False}).decode())
        print(f"caresync bench: {exc}", file=sys.stderr)
        return 1
    print(report.as_json(result) if opts.json else report.table(result), flush=True)
    if opts.write_results:
        report.append_results(result, opts.command_line)
        _say(f"appended to {report.RESULTS_PATH}")
    return 0 if result["figures"]["exactly_once"] else 1


async def run_fanout(opts: Options) -> dict[str, Any]:
    """Build the workloads, start the deployment, measure caresync then the raw loop (then the
    peer, if asked, once the deployment is gone)."""
    env = fo.router_environment(os.environ, opts.processes)
    cfg = load_config(None, environ=env)
    subjects = subjects_for(cfg)
    workload = build_workload(
        opts.n, opts.m, items_per_procedure=opts.items, seed=opts.seed, subjects=subjects
    )
    lat_n = max(1, opts.latency_n)
    # The throughput workload's commands per key, so that its mix of kinds (and fan-out)
    # is the same and 50 % of the measured rate is 50 % of the load; steady, so that the mix
    # is the same all through a phase, its first and last commands included (build_workload).
    latencies = [
        build_workload(
            lat_n,
            max(1, lat_n * opts.m // opts.n),
            items_per_procedure=opts.items,
            dup_rate=0.0,
            seed=opts.seed + 1 + i,
            prefix=f"lat{round(level * 100)}-",
            subjects=subjects,
            steady=True,
        )
        for i, level in enumerate(opts.levels)
    ]
    info = report.machine()

    async def caresync_phase(
        nc: NatsClient, js: JetStreamContext, server: EmbeddedNats, tmp: Path
    ) -> dict[str, Any]:
        cs = await _caresync(nc, js, server, tmp, env, cfg, opts, workload, latencies)
        model = cs["model"]
        return {**cs, "moves": model.internal_sent, "outputs": model.downstream_sent}

    cs, raw = await measure(
        cfg=cfg,
        workload=workload,
        caresync_phase=caresync_phase,
        unit="commands/s",
        prefix="caresync-bench-",
        base_dir=opts.base_dir,
        keep=opts.keep,
    )
    result = report.build_result(opts.seed, opts.command_line, cfg, info, workload, cs, raw)
    result["conditions"]["workload"] = opts.workload
    if opts.peer:
        log = Path(tempfile.gettempdir()) / f"caresync-bench-peer-{os.getpid()}.log"
        peer = await anyio.to_thread.run_sync(
            lambda: run_restate(opts.n, opts.m, opts.peer_runs, log)
        )
        report.add_peer(result, peer)
    return result


async def _caresync(
    nc: NatsClient,
    js: JetStreamContext,
    server: EmbeddedNats,
    tmp: Path,
    env: dict[str, str],
    cfg: Config,
    opts: Options,
    workload: Workload,
    latencies: list[Workload],
) -> dict[str, Any]:
    subjects = subjects_for(cfg)
    router_dir = tmp / "router"
    db_path = store_path(cfg, router_dir)
    process = await fo.start_router(server.url, router_dir, env)
    try:
        await fo.wait_ready(nc, subjects, process, Path(f"{router_dir}.log"))
        # -- reference data: loaded, kept by the router, stock applied; not timed
        refdata_dir = tmp / "refdata"
        stock_rows = write_csv(refdata_dir, opts.items)
        loaded = await fo.load_refdata(server.url, refdata_dir, env, tmp / "refdata.log")
        version, stock_sent = int(loaded["version"]), int(loaded["stock_commands"])
        await fo.wait_refdata(db_path, process, version)
        await fo.wait_applied(
            nc,
            subjects,
            process,
            accepted=stock_sent,
            duplicates=0,
            deadline_s=60.0,
            what="stock commands",
        )
        # -- what the router must do: the pure model on the same data and messages
        pure = PureRouter(subjects, read_back(refdata_dir, version))
        stock = run_pure(
            pure,
            [
                (o.subject, o.payload)
                for o in stock_commands(subjects, pure.refdata.dataset, version)
            ],
        )
        tp_model = run_pure(pure, [(c.subject, c.data) for c in workload.commands])
        # In the order the router gets them: each phase's warm-up, then the phase.
        warm_models, lat_models = [], []
        for w in latencies:
            warm_models.append(run_pure(pure, [(c.subject, c.data) for c in w.warmup]))
            lat_models.append(run_pure(pure, [(c.subject, c.data) for c in w.commands]))
        deadline_s = 60.0 + (workload.n + tp_model.internal_sent) / 100
        _say(
            f"caresync: {workload.n} commands ({workload.unique} unique), "
            f"{tp_model.internal_sent} internal commands "
            f"({tp_model.internal_sent / workload.n:.3f} per command), "
            f"{tp_model.downstream_sent} downstream effects; refdata version {version}, "
            f"{stock_sent} stock commands; in {tmp}"
        )
        # -- timed.  The driver holds the workloads and the pure models (millions of objects):
        # frozen out of its collector, so that a full collection in the driver cannot delay a
        # publish it has already timestamped and show up as router latency.
        gc.collect()
        gc.freeze()
        meter = report.CpuMeter(
            {"router": process.pid, "nats-server": server.pid}, trees=frozenset({"router"})
        )
        tp = await fo.throughput_phase(
            nc,
            js,
            subjects,
            process,
            workload,
            accepted=stock.accepted + tp_model.accepted,
            duplicates=tp_model.duplicates,
            deadline_s=deadline_s,
        )
        tp["cpu"] = meter.cores()
        marks = [stage_totals(await fo.health(nc, subjects))]
        peak = workload.n / tp["elapsed_s"]
        models = [stock, tp_model]
        phases = []

        async def wait_for(part: Expected, what: str) -> dict[str, int]:
            """Add ``part`` to what the router must have done; wait until it has."""
            models.append(part)
            so_far = combine(models)
            return await fo.wait_applied(
                nc,
                subjects,
                process,
                accepted=so_far.accepted,
                duplicates=so_far.duplicates,
                deadline_s=deadline_s,
                what=what,
            )

        for level, lat_workload, warm_model, lat_model in zip(
            opts.levels, latencies, warm_models, lat_models, strict=True
        ):
            if lat_workload.warmup:
                await fo.publish_all(js, [(c.subject, c.data) for c in lat_workload.warmup])
                await wait_for(warm_model, f"warm-up of the latency phase at {level:.0%}")
            rate = level * peak
            _say(f"caresync: latency phase at {level:.0%} of peak ({rate:.0f} commands/s)")
            published = await fo.latency_phase(js, lat_workload, rate)
            reached = await wait_for(lat_model, f"latency phase at {level:.0%}")
            phases.append((level, rate, lat_workload, lat_model, published))
            marks.append(stage_totals(await fo.health(nc, subjects)))
        model = combine(models)
        publisher = (await fo.health(nc, subjects)).get("publisher", {})
    finally:
        with anyio.CancelScope(shield=True):
            status = await fo.stop_router(process)
    # -- exactly once: the store and the streams against the pure model
    applied, outbox = fo.read_store(db_path)
    internal: list[tuple[str, bytes]] = []
    for p in range(subjects.partitions):
        internal += await fo.read_stream(js, subjects.input_stream(p), _internal(subjects, p))
    # Those applied with their cause are recorded on the local stream instead.
    internal += await fo.read_stream(js, subjects.local_stream, f"{subjects.prefix}.loc.>")
    downstream = await fo.read_stream(js, subjects.output_stream, f"{subjects.prefix}.out.>")
    levels = [
        {
            "level": level,
            "rate": rate,
            "latency_ms": fo.latencies_ms(
                applied, [lat_model.outcomes[c.command_id] for c in w.commands], published
            ),
        }
        for level, rate, w, lat_model, published in phases
    ]
    checks = {
        **fo.check_applied(applied, model.applied),
        **_prefixed("internal", fo.compare_sent(model.internal, model.internal_sent, internal)),
        **_prefixed(
            "downstream", fo.compare_sent(model.downstream, model.downstream_sent, downstream)
        ),
        "outbox_sent": outbox.get("sent", 0),
        "outbox_expected": model.internal_sent + model.downstream_sent,
        "outbox_not_sent": sum(v for k, v in outbox.items() if k != "sent"),
        "duplicates_sent": workload.duplicates
        + sum(w.duplicates + sum(c.duplicate for c in w.warmup) for w in latencies),
        "duplicates_skipped": reached.get("duplicates", 0),
        "accepted": reached.get("accepted", 0),
        "accepted_expected": model.accepted,
        "rejected_expected": model.rejected,
        "rejected_dead_parked": sum(
            reached.get(k, 0) for k in ("rejected", "dead_lettered", "parked")
        ),
        "stock_commands": stock_sent,
        "stock_expected": stock_rows,
        "refdata_version": version,
        "pubacks_duplicate": int(publisher.get("duplicates", 0)),
        "router_exit": status,
    }
    kind_of = {c.command_id: c.name for c in workload.unique_commands()}
    stages = {"throughput": stage_means({}, marks[0])}
    for i, level in enumerate(opts.levels):
        stages[f"latency {level:.0%}"] = stage_means(marks[i], marks[i + 1])
    return {
        **tp,
        "stages": stages,
        "levels": levels,
        "checks": checks,
        "model": tp_model,
        "fanout_by_kind": fanout_by_kind(tp_model.outcomes, kind_of),
        "deadline_s": deadline_s,
    }


StageTotals = dict[str, tuple[int, float, float]]


def stage_totals(record: dict[str, Any]) -> StageTotals:
    """Per pipeline stage, summed over partitions: (batches, total ms, slowest batch ms)."""
    out: StageTotals = {}
    for part in record.get("partitions", []):
        for stage, t in part.get("stages", {}).items():
            n, total, slowest = out.get(stage, (0, 0.0, 0.0))
            out[stage] = (n + t["batches"], total + t["total_ms"], max(slowest, t["max_ms"]))
    return out


def stage_means(before: StageTotals, after: StageTotals) -> dict[str, float]:
    """Mean milliseconds per batch in each stage between two health records, batches, and the
    slowest batch if it fell between them."""
    out: dict[str, float] = {}
    for stage, (n, total, slowest) in after.items():
        n0, total0, slowest0 = before.get(stage, (0, 0.0, 0.0))
        if n > n0:
            out[f"{stage}_ms"] = round((total - total0) / (n - n0), 2)
            out[f"{stage}_batches"] = n - n0
            if slowest > slowest0:  # the slowest batch since start fell in this phase
                out[f"{stage}_max_ms"] = round(slowest, 1)
    return out


def _prefixed(prefix: str, counts: dict[str, int]) -> dict[str, int]:
    return {f"{prefix}_{k}": v for k, v in counts.items()}


def _internal(subjects: Subjects, partition: int) -> str:
    if subjects.partitions == 1:
        return f"{subjects.prefix}.int.>"
    return f"{subjects.prefix}.part.{partition}.int.>"


async def run_bench_args(args: argparse.Namespace, command_line: str) -> int:
    """Dispatch on the workload (``fanout`` and ``latency`` here; ``workflow``, ``ingest``,
    ``replay``, ``entities`` in their modules)."""
    if args.workload == "ingest":
        from caresync.bench import ingest_run

        return await ingest_run.run(args, command_line)
    if args.workload == "replay":
        from caresync.bench import replay_run

        return await replay_run.run(args, command_line)
    if args.workload == "entities":
        from caresync.bench import entities_run

        return await entities_run.run(args, command_line)
    if args.workload == "workflow":
        from caresync.bench import workflow

        return await workflow.run(workflow.options(args, command_line))
    return await run(Options.from_args(args, command_line))


def main() -> None:
    """``python -m caresync.bench.cli [fanout] [options]`` (run it outside the repository)."""
    parser = argparse.ArgumentParser(prog="python -m caresync.bench.cli")
    add_arguments(parser)
    parser.add_argument("--data-dir", help="where the temporary deployment is made")
    args = parser.parse_args()
    command_line = shlex.join(["python", "-m", "caresync.bench.cli", *sys.argv[1:]])
    sys.exit(anyio.run(run_bench_args, args, command_line, backend="asyncio"))


if __name__ == "__main__":
    main()
