"""Fault soak: the router SIGKILLed at seeded random points while the workflow mix flows, then a
downstream system down for a minute; everything checked against the pure actors and against
what the simulated systems themselves hold.

One deployment: a nats-server of its own (embedded, in a temporary directory), the router as
``caresync up --nats URL`` in its own process with its connectors on, and the billing, ERP and
supply simulators in this process (so that they outlive the router).  Phases:

1. **crash rounds**: the bench workflow mix (:mod:`caresync.bench.workflow_data`) is
   published; the router is killed with SIGKILL ``--rounds`` times, each time once its
   progress (commands applied + downstream calls recorded) reaches a seeded random point; right
   after each kill the store must hold whole batches only
   (:func:`~caresync.bench.faults_verify.batch_invariants`); the router is started again;
   then everything must settle;
2. **outage**: another mix is published while one system (``--system``, ERP by default) is
   down for ``--outage-s`` seconds (``caresync sim fail``): the other two must take all their
   effects and be in sync meanwhile, the down one must be pending; after ``heal`` everything
   settles.

After each phase, once everything has settled, everything is checked against the pure actors
and the simulators' own records (:func:`caresync.bench.faults_verify.verify`).

Run ``python bench/soak_crash.py --rounds 50`` (any directory), or
``python -m caresync.bench.soak_crash`` from outside the repository.  The building blocks are
the ``caresync.bench.faults_*`` modules, shared with ``tests/test_faults.py``, which runs a
quick set of the same in CI: deployments (:mod:`~caresync.bench.faults_deploy`), the oracle
(:mod:`~caresync.bench.faults_oracle`), the stores read back
(:mod:`~caresync.bench.faults_stores`), the checks (:mod:`~caresync.bench.faults_verify`) and
the phases (:mod:`~caresync.bench.faults_phases`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats
from nats.aio.client import Client as NatsClient

from caresync.bench import fanout as fo
from caresync.bench.faults_deploy import (
    SYSTEMS,
    Deployment,
    RouterProcess,
    SoakError,
    make_deployment,
    say,
    workload,
)
from caresync.bench.faults_oracle import Oracle, load_refdata
from caresync.bench.faults_phases import input_ends, kill_rounds, outage, wait_settled
from caresync.bench.faults_verify import verify
from caresync.router.embedded import EmbeddedNats
from caresync.router.logs import configure_logging

DEFAULT_SEED = 20261124


@dataclass(frozen=True, slots=True)
class Options:
    """What one soak run does."""

    rounds: int = 50
    appointments: int = 300
    outage_appointments: int = 100
    outage_s: float = 60.0
    system: str = "erp"
    seed: int = DEFAULT_SEED
    base_dir: str | None = None
    keep: bool = False


async def soak(opts: Options) -> dict[str, Any]:
    """Run both phases on a fresh embedded nats-server; the report (``problems`` empty when
    every check held)."""
    work = Path(tempfile.mkdtemp(prefix="caresync-soak-", dir=opts.base_dir))
    ok = False
    try:
        async with EmbeddedNats(work / "nats") as server:
            report = await _soak(server.url, work, opts)
        ok = not report["problems"]
    finally:
        if ok and not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"data and logs kept in {work}")
    return report


async def _soak(url: str, work: Path, opts: Options) -> dict[str, Any]:
    dep = make_deployment(url, "soak", work / "router")
    router = RouterProcess(dep)
    report: dict[str, Any] = {"options": dataclasses.asdict(opts), "problems": []}
    nc = await nats.connect(url, name="caresync-soak")
    try:
        async with dep.simulators():
            try:
                await router.start(nc)
                oracle = await load_refdata(
                    dep,
                    router.check_alive,
                    appointments=opts.appointments + opts.outage_appointments,
                    seed=opts.seed,
                )
                report["crash"] = await _crash_phase(dep, router, nc, oracle, opts, report)
                report["outage"] = await _outage_phase(dep, router, nc, oracle, opts, report)
            except SoakError as exc:
                report["problems"].append(str(exc))
            finally:
                report["router_exit"] = await router.stop()
    finally:
        await nc.close()
    if report["router_exit"] != 0:
        report["problems"].append(f"router exited with {report['router_exit']}")
    return report


async def _crash_phase(
    dep: Deployment,
    router: RouterProcess,
    nc: NatsClient,
    oracle: Oracle,
    opts: Options,
    report: dict[str, Any],
) -> dict[str, Any]:
    js = nc.jetstream(publish_async_max_pending=5000)
    mix = workload(dep, opts.appointments, seed=opts.seed, prefix="wf-")
    oracle.send((c.subject, c.data) for c in mix.commands)
    say(f"crash rounds: {mix.n} commands {mix.kinds()}, {opts.rounds} rounds")
    t0 = time.monotonic()
    await fo.publish_all(js, [(c.subject, c.data) for c in mix.commands])
    rng = random.Random(opts.seed)
    kills = await kill_rounds(dep, router, nc, oracle, rng, rounds=opts.rounds, deadline_s=600.0)
    say("settling")
    settle_s = await wait_settled(dep, js, router.check_alive, deadline_s=900.0)
    found = verify(dep, oracle, await input_ends(dep, js))
    report["problems"] += [f"crash rounds: {p}" for p in found.problems]
    report["problems"] += [
        f"right after kill {n}: {p}" for n, k in enumerate(kills, 1) for p in k.invariants
    ]
    say(f"crash rounds: {len(kills)} kills, settled in {settle_s:.1f} s after the last")
    return {
        "commands": mix.n,
        "kills": len(kills),
        "restart_s_max": round(max((k.restart_s for k in kills), default=0.0), 2),
        "settled_after_last_kill_s": round(settle_s, 1),
        "elapsed_s": round(time.monotonic() - t0, 1),
        "counts": found.counts,
    }


async def _outage_phase(
    dep: Deployment,
    router: RouterProcess,
    nc: NatsClient,
    oracle: Oracle,
    opts: Options,
    report: dict[str, Any],
) -> dict[str, Any]:
    js = nc.jetstream(publish_async_max_pending=5000)
    mix = workload(dep, opts.outage_appointments, seed=opts.seed + 1, prefix="wo-")
    say(f"outage: {opts.system} down {opts.outage_s:g} s, {mix.n} commands")
    seen = await outage(
        dep,
        nc,
        js,
        oracle,
        mix,
        router.check_alive,
        system=opts.system,
        down_s=opts.outage_s,
        deadline_s=600.0,
    )
    settle_s = await wait_settled(dep, js, router.check_alive, deadline_s=900.0)
    found = verify(dep, oracle, await input_ends(dep, js))
    if seen.records_while_down or not seen.pending_while_down:
        report["problems"].append(f"outage: {seen}")
    report["problems"] += [f"after the outage: {p}" for p in found.problems]
    say(f"outage: the others in sync after {seen.others_settled_s:.1f} s, all after the heal")
    return {
        "commands": mix.n,
        "system": seen.system,
        "down_s": round(seen.down_s, 1),
        "others_settled_s": round(seen.others_settled_s, 1),
        "pending_while_down": seen.pending_while_down,
        "records_while_down": seen.records_while_down,
        "retries_while_down": seen.retries_while_down,
        "settled_after_heal_s": round(settle_s, 1),
        "counts": found.counts,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python bench/soak_crash.py [--rounds N] ...``: exit status 1 unless every check held."""
    parser = argparse.ArgumentParser(prog="soak_crash", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="SIGKILLs (default 50)")
    parser.add_argument("--appointments", type=int, default=300, help="crash-phase appointments")
    parser.add_argument("--outage-appointments", type=int, default=100)
    parser.add_argument("--outage-s", type=float, default=60.0, help="how long a system is down")
    parser.add_argument("--system", choices=SYSTEMS, default="erp", help="the system taken down")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--data-dir", help="where the temporary deployment is made")
    parser.add_argument("--keep", action="store_true", help="keep the deployment's files")
    args = parser.parse_args(argv)
    opts = Options(
        rounds=args.rounds,
        appointments=args.appointments,
        outage_appointments=args.outage_appointments,
        outage_s=args.outage_s,
        system=args.system,
        seed=args.seed,
        base_dir=args.data_dir,
        keep=args.keep,
    )
    configure_logging("error")
    report = anyio.run(soak, opts, backend="asyncio")
    print(json.dumps(report, indent=2), flush=True)
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
