"""The phases of the fault runs: SIGKILLs at seeded random points, a downstream system down,
and waiting until everything has settled.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from caresync.bench import fanout as fo
from caresync.bench.faults_deploy import (
    SYSTEMS,
    Deployment,
    RouterProcess,
    poll,
    say,
    sim_control,
)
from caresync.bench.faults_oracle import Oracle, expected_progress
from caresync.bench.faults_stores import open_keys, progress, read_only, sim_records
from caresync.bench.faults_verify import batch_invariants
from caresync.bench.workflow import consumers_idle
from caresync.bench.workload import Workload


# -- settling --------------------------------------------------------------------------------------
async def settled(dep: Deployment, js: JetStreamContext) -> bool:
    """Nothing left anywhere: every consumer idle, offsets at the streams' ends, the outbox
    sent, every ledger settled, the simulators' feedback sent."""
    streams = [*dep.input_streams, dep.subjects.output_stream]
    if not await consumers_idle(js, streams):
        return False
    lasts = {s: int((await js.stream_info(s)).state.last_seq) for s in dep.input_streams}
    with read_only(dep.db_path) as conn:
        offsets = dict(conn.execute("SELECT stream, seq FROM offsets").fetchall())
        unsent = conn.execute("SELECT count(*) FROM outbox WHERE status != 'sent'").fetchone()[0]
    if unsent or any(offsets.get(s, 0) != last for s, last in lasts.items()):
        return False
    if any(open_keys(dep.db_path).values()):
        return False
    if dep.sim_db.exists():
        with read_only(dep.sim_db) as conn:
            feedback = conn.execute("SELECT count(*) FROM feedback WHERE sent_at IS NULL")
            if feedback.fetchone()[0]:
                return False
    return True


async def wait_settled(
    dep: Deployment, js: JetStreamContext, alive: Callable[[], None], *, deadline_s: float
) -> float:
    """Until :func:`settled` holds twice in a row; the seconds it took."""
    t0 = time.monotonic()
    streak = [0]

    async def twice() -> bool:
        streak[0] = streak[0] + 1 if await settled(dep, js) else 0
        return streak[0] >= 2

    await poll(twice, alive, deadline_s=deadline_s, what="everything to settle")
    return time.monotonic() - t0


async def input_ends(dep: Deployment, js: JetStreamContext) -> dict[str, int]:
    """Last sequence of every input stream."""
    return {s: int((await js.stream_info(s)).state.last_seq) for s in dep.input_streams}


# -- phase 1: SIGKILL at seeded random points ----------------------------------------------------
@dataclass(frozen=True, slots=True)
class Kill:
    """One SIGKILL: the progress it was aimed at and reached, what the store held right after
    it (problems of :func:`batch_invariants`), and how long the restart took."""

    target: int
    reached: int
    invariants: tuple[str, ...]
    restart_s: float


async def kill_rounds(
    dep: Deployment,
    router: RouterProcess,
    nc: NatsClient,
    oracle: Oracle,
    rng: random.Random,
    *,
    rounds: int,
    deadline_s: float,
) -> list[Kill]:
    """Kill the router ``rounds`` times, at as many random points of :func:`progress`
    between where it is now and 95 % of where it ends (:func:`expected_progress`), each
    once progress reaches it (at once after the restart if it already has); check what the
    store holds right after each kill; start the router again."""
    now, ceiling = progress(dep.db_path), int(expected_progress(oracle) * 0.95)
    targets = sorted(rng.sample(range(now + 1, max(now + 1, ceiling)), rounds))
    kills: list[Kill] = []
    for target in targets:

        def reached_target(t: int = target) -> bool:
            return progress(dep.db_path) >= t

        await poll(
            reached_target,
            router.check_alive,
            deadline_s=deadline_s,
            what=f"progress {target}",
        )
        reached = progress(dep.db_path)
        await router.kill()
        invariants = tuple(batch_invariants(dep.db_path, oracle))
        t0 = time.monotonic()
        await router.start(nc)
        kills.append(Kill(target, reached, invariants, time.monotonic() - t0))
        say(f"kill {len(kills)} at progress {reached} (target {target}), restarted")
    return kills


# -- phase 2: a downstream system down ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outage:
    """What was seen while one system was down."""

    system: str
    down_s: float
    others_settled_s: float
    """From the start of the outage until the other systems held every effect, in sync."""
    pending_while_down: int
    """Effects for the down system waiting in its ledgers just before ``heal``."""
    records_while_down: int
    """Records the down system took while down (0 expected)."""
    retries_while_down: int
    """Calls to the down system that failed transiently and were retried."""


async def outage(
    dep: Deployment,
    nc: NatsClient,
    js: JetStreamContext,
    oracle: Oracle,
    mix: Workload,
    alive: Callable[[], None],
    *,
    system: str,
    down_s: float,
    deadline_s: float,
) -> Outage:
    """``system`` down (``sim fail --mode down``) while ``mix`` is published; wait until the
    others hold every effect of it and are in sync, and at least ``down_s``; then ``heal``."""
    others = [s for s in SYSTEMS if s != system]
    before = {(r.system, r.key) for r in sim_records(dep.sim_db)}
    retried_before = _transient_calls(dep, system)
    await sim_control(nc, dep, "fail", system=system, for_s=down_s + deadline_s, mode="down")
    t0 = time.monotonic()
    oracle.send((c.subject, c.data) for c in mix.commands)
    await fo.publish_all(js, [(c.subject, c.data) for c in mix.commands])
    want = {s: oracle.downstream(s).keys() for s in others}

    def others_done() -> bool:
        held = {(r.system, r.key) for r in sim_records(dep.sim_db)}
        if any(not {(s, k) for k in keys} <= held for s, keys in want.items()):
            return False
        pending = open_keys(dep.db_path)
        return all(pending[s] == 0 for s in others) and pending[system] > 0

    await poll(others_done, alive, deadline_s=deadline_s, what=f"the systems but {system}")
    others_s = time.monotonic() - t0
    await anyio.sleep(max(0.0, down_s - others_s))
    pending = open_keys(dep.db_path)[system]
    taken = [r for r in sim_records(dep.sim_db) if r.system == system]
    new = sum(1 for r in taken if (r.system, r.key) not in before)
    retries = _transient_calls(dep, system) - retried_before
    await sim_control(nc, dep, "heal", system=system)
    return Outage(system, time.monotonic() - t0, others_s, pending, new, retries)


def _transient_calls(dep: Deployment, system: str) -> int:
    with read_only(dep.db_path) as conn:
        row = conn.execute(
            "SELECT count(*) FROM downstream_calls WHERE system = ? AND outcome = 'transient'",
            (system,),
        ).fetchone()
    return int(row[0])
