"""Faults while the workflow mix flows, checked where it counts: the downstream simulators' own
records, the sync ledgers, and the pure actors (issue 5, part 5).

Each test runs one deployment of its own (subject prefix, data dir, simulators) and checks it
with :func:`caresync.bench.faults_verify.verify` once everything has settled: every appointment as
in a run of the pure actors (the business state of billing, supply, ERP and items too), every
ledger in sync, every effect exactly once in its simulator's records with the payload the pure
run sent, one purchase order per crossing, every command applied once, the outbox all sent.
``bench/soak_crash.py`` runs the same with 50 kills and a 60 s outage.

1. the router (``caresync up --nats``, connectors on) SIGKILLed at seeded random points;
2. the nats-server killed and started again under load;
3. ERP down: billing and supply go on and are in sync meanwhile, ERP catches up once;
4. SQLite writes failing (a lock held by another connection; the database full); and the same
   while the router prunes its dedupe records and outbox (pruning is postponed, not fatal).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import pytest
from harness import client, running, wait_for
from nats.js import JetStreamContext

from caresync.bench import fanout as fo
from caresync.bench.faults_deploy import (
    SYSTEMS,
    Deployment,
    RouterProcess,
    make_deployment,
    workload,
)
from caresync.bench.faults_oracle import Oracle, load_refdata
from caresync.bench.faults_phases import input_ends, kill_rounds, outage, wait_settled
from caresync.bench.faults_stores import open_keys, progress, sim_records
from caresync.bench.faults_verify import Verdict, batch_invariants, verify
from caresync.bench.workload import BenchCommand, Workload
from caresync.config import Config
from caresync.router.embedded import EmbeddedNats
from caresync.router.jetstream import connect
from caresync.router.runtime import RouterSettings
from caresync.router.service import RouterService

pytestmark = pytest.mark.anyio

SEED = 20261124
DOWN_S = 6.0
"""How long the nats-server stays down in the restart test."""


def assert_verified(verdict: Verdict) -> dict[str, int]:
    """Every check held; the counts, for the test's own assertions."""
    assert verdict.problems == [], "\n".join(verdict.problems)
    c = verdict.counts
    assert c["appointments"] > 0
    assert c["sim_records"] == c["effects_expected"] + c["purchase_orders"] > 0
    assert c["commands_applied"] >= c["commands_expected"]
    return c


async def refdata_and_mix(
    dep: Deployment, alive: Callable[[], None], appointments: int, *, seed: int = SEED
) -> tuple[Oracle, Workload]:
    """Reference data sized for ``appointments``, loaded and stocked; the mix, in the oracle."""
    oracle = await load_refdata(dep, alive, appointments=appointments, seed=seed)
    mix = workload(dep, appointments, seed=seed, prefix="wf-")
    oracle.send((c.subject, c.data) for c in mix.commands)
    return oracle, mix


# -- 1. SIGKILL at seeded random points ------------------------------------------------------------
async def test_sigkill_at_random_points_delivers_each_effect_once(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    dep = make_deployment(nats_url, unique_prefix, tmp_path / "router")
    router = RouterProcess(dep)
    with anyio.fail_after(80):
        async with client(nats_url) as nc, dep.simulators():
            js = nc.jetstream(publish_async_max_pending=5000)
            await router.start(nc)
            try:
                oracle, mix = await refdata_and_mix(dep, router.check_alive, 160)
                await fo.publish_all(js, [(c.subject, c.data) for c in mix.commands])
                kills = await kill_rounds(
                    dep, router, nc, oracle, random.Random(SEED), rounds=3, deadline_s=40
                )
                await wait_settled(dep, js, router.check_alive, deadline_s=60)
                ends = await input_ends(dep, js)
            finally:
                status = await router.stop()
    assert status == 0, fo.log_tail(dep.log_path)
    assert len(kills) == 3, kills
    # Right after each kill the store held whole batches only (read before the restart).
    assert [k.invariants for k in kills] == [(), (), ()]
    c = assert_verified(verify(dep, oracle, ends))
    assert c["purchase_orders"] > 0  # crossings happened, each ordered once


# -- 2. the nats-server restarted under load -------------------------------------------------------
async def publish_until_acked(
    js: JetStreamContext, commands: Sequence[BenchCommand], acked: list[str]
) -> None:
    """Publish every command with its id as Msg-Id, publishing again whatever got no PubAck in
    time; one round of the mix (every appointment's n-th command) is acked before the next
    starts, so that each appointment's order holds.  ``acked`` gets each id once acked."""
    rounds: dict[int, list[BenchCommand]] = {}
    for c in commands:
        rounds.setdefault(int(c.command_id.rsplit("-e", 1)[1]), []).append(c)
    for _, todo in sorted(rounds.items()):
        while todo:
            futures: list[asyncio.Future[Any] | None] = []
            for c in todo:
                try:
                    futures.append(
                        await js.publish_async(
                            c.subject, c.data, headers={"Nats-Msg-Id": c.command_id}
                        )
                    )
                except nats.errors.Error:  # no connection and no room to buffer: again later
                    futures.append(None)
            pending = [f for f in futures if f is not None]
            if pending:
                await asyncio.wait(pending, timeout=2.0)
            again = []
            for c, fut in zip(todo, futures, strict=True):
                if fut is not None and fut.done() and not fut.cancelled() and not fut.exception():
                    acked.append(c.command_id)
                else:
                    if fut is not None:
                        fut.cancel()
                    again.append(c)
            todo = again
            if todo:
                await anyio.sleep(0.2)


async def test_nats_server_restart_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    # A server of its own, restarted on the same port and store; the session one lives on.
    with anyio.fail_after(60):
        async with EmbeddedNats(tmp_path / "nats") as server:
            dep = make_deployment(server.url, "restart", tmp_path / "router")
            router = RouterProcess(dep)
            nc = await connect(server.url, name="test-faults", connect_timeout_s=2.0)
            try:
                async with dep.simulators():
                    js = nc.jetstream(publish_async_max_pending=5000)
                    await router.start(nc)
                    try:
                        oracle, mix = await refdata_and_mix(dep, router.check_alive, 80)
                        books = [c for c in mix.commands if c.name == "book"]
                        rest = [c for c in mix.commands if c.name != "book"]
                        acked: list[str] = []
                        await publish_until_acked(js, books, acked)

                        # Under load: the bookings acked, the router and its connectors busy
                        # with their fan-out; the rest is published while the server is down.
                        async def connectors_busy() -> bool:
                            return sum(open_keys(dep.db_path).values()) > 0

                        await wait_for(connectors_busy, what="effects waiting for their systems")
                        at_kill = progress(dep.db_path)
                        await server.kill()
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(publish_until_acked, js, rest, acked)
                            # Down longer than a JetStream API call waits (5 s): whatever the
                            # router asks meanwhile times out, and it must ask again.
                            await anyio.sleep(DOWN_S)
                            await server.start()
                        await wait_settled(dep, js, router.check_alive, deadline_s=40)
                        ends = await input_ends(dep, js)
                    finally:
                        status = await router.stop()
            finally:
                await nc.close()
    assert sorted(acked) == sorted(c.command_id for c in mix.commands)
    assert at_kill < progress(dep.db_path)
    # The router process lived through it: one start, a clean stop.
    assert (router.starts, status) == (1, 0), fo.log_tail(dep.log_path)
    # Every acknowledged command applied, its effects delivered once (the bookings were
    # acknowledged before the server died, the rest after it came back).
    assert_verified(verify(dep, oracle, ends))


# -- 3. a downstream system down ---------------------------------------------------------------
async def test_erp_down_billing_and_supply_go_on_erp_catches_up_once(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    dep = make_deployment(nats_url, unique_prefix, tmp_path / "router")
    router = RouterProcess(dep)
    with anyio.fail_after(60):
        async with client(nats_url) as nc, dep.simulators():
            js = nc.jetstream(publish_async_max_pending=5000)
            await router.start(nc)
            try:
                oracle = await load_refdata(dep, router.check_alive, appointments=40, seed=SEED)
                before = len(sim_records(dep.sim_db))
                mix = workload(dep, 40, seed=SEED, prefix="wo-")
                seen = await outage(
                    dep,
                    nc,
                    js,
                    oracle,
                    mix,
                    router.check_alive,
                    system="erp",
                    down_s=6.0,
                    deadline_s=30.0,
                )
                await wait_settled(dep, js, router.check_alive, deadline_s=30)
                ends = await input_ends(dep, js)
            finally:
                status = await router.stop()
    assert status == 0
    # While ERP was down: billing and supply held all their effects and were in sync; ERP's
    # effects waited in its ledgers and were retried; ERP itself took nothing.
    assert seen.down_s >= max(6.0, seen.others_settled_s)
    assert seen.pending_while_down > 0
    assert seen.retries_while_down > 0
    assert seen.records_while_down == 0
    assert before == 0
    assert retried_systems(dep) == {"erp"}  # billing and supply never had to retry
    # Afterwards ERP holds each of its effects once, like the others.
    c = assert_verified(verify(dep, oracle, ends))
    erp = [r for r in sim_records(dep.sim_db) if r.system == "erp"]
    assert len(erp) == len(oracle.downstream("erp")) + c["purchase_orders"]
    assert c["retried_calls"] >= seen.retries_while_down


# -- 4. SQLite writes failing ------------------------------------------------------------------
@asynccontextmanager
async def exclusive_lock(db_path: Path) -> AsyncIterator[None]:
    """Another connection holds the database's write lock (``BEGIN EXCLUSIVE``) meanwhile."""
    conn = sqlite3.connect(db_path, timeout=10.0, isolation_level=None, check_same_thread=False)
    try:
        await anyio.to_thread.run_sync(conn.execute, "BEGIN EXCLUSIVE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


@asynccontextmanager
async def disk_full(service: RouterService) -> AsyncIterator[None]:
    """The router's database may not grow by a page (``PRAGMA max_page_count``) meanwhile."""
    assert service.router is not None
    conn = service.router.stores.main.connection
    async with conn.execute("PRAGMA page_count") as cur:
        row = await cur.fetchone()
    assert row is not None
    await conn.execute(f"PRAGMA max_page_count = {int(row[0])}")
    try:
        yield
    finally:
        await conn.execute("PRAGMA max_page_count = 4294967294")


@pytest.mark.parametrize("fault", ["locked", "full"])
async def test_sqlite_write_failure_retries_without_losing_or_half_applying(
    nats_url: str, unique_prefix: str, tmp_path: Path, fault: str
) -> None:
    # Short busy timeout: a held lock fails the router's writes at once instead of after 5 s.
    dep = make_deployment(
        nats_url,
        unique_prefix,
        tmp_path / "router",
        settings={"CARESYNC_STORE__BUSY_TIMEOUT_MS": "100"},
    )
    with anyio.fail_after(60):
        async with (
            client(nats_url) as nc,
            dep.simulators(),
            running(dep.cfg, nats_url, dep.data_dir) as service,
        ):
            js = nc.jetstream(publish_async_max_pending=5000)
            oracle, mix = await refdata_and_mix(dep, lambda: None, 50)
            assert service.router is not None
            worker = service.router.workers[0]
            books = [c for c in mix.commands if c.name == "book"]
            rest = [c for c in mix.commands if c.name != "book"]
            await fo.publish_all(js, [(c.subject, c.data) for c in books])
            # The fault comes while the connectors deliver the bookings' effects: they record
            # every call in the same database.

            async def connectors_at_work() -> bool:
                return await calls_recorded(dep, 20) > 0

            await wait_for(connectors_at_work, what="the connectors at work")
            snapshots: list[list[str]] = []
            fault_cm = exclusive_lock(dep.db_path) if fault == "locked" else disk_full(service)
            async with fault_cm:
                committed = await committed_offset(dep)
                calls = await calls_recorded(dep, 0)
                retries_before = worker.stats.commit_retries
                # Messages keep arriving while nothing can be written.
                await fo.publish_all(js, [(c.subject, c.data) for c in rest])
                for _ in range(3):
                    await anyio.sleep(1.0)
                    snapshots.append(batch_invariants(dep.db_path, oracle))
                    floor = await ack_floor(js, dep)
                    # Not acked past what is committed (AckPolicy.ALL: the floor is the ack).
                    assert floor <= await committed_offset(dep)
                during = await committed_offset(dep), await calls_recorded(dep, 0)
                retries = worker.stats.commit_retries
            await wait_settled(dep, js, lambda: None, deadline_s=40)
            ends = await input_ends(dep, js)
    assert retries > retries_before, "the fault did not make a commit fail"
    if fault == "locked":
        # Nothing could be written while the lock was held, by the pipeline or by the
        # connectors (which record every call in the same database and wait the fault out).
        assert during == (committed, calls)
    assert snapshots == [[], [], []]
    assert_verified(verify(dep, oracle, ends))


async def test_pruning_waits_out_a_locked_database(
    nats_url: str, unique_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prune every 0.2 s instead of every minute (the interval is not a setting).
    from_config = RouterSettings.from_config

    def pruning_often(cfg: Config) -> RouterSettings:
        return dataclasses.replace(from_config(cfg), prune_every_s=0.2)

    monkeypatch.setattr(RouterSettings, "from_config", staticmethod(pruning_often))
    dep = make_deployment(
        nats_url,
        unique_prefix,
        tmp_path / "router",
        settings={
            "CARESYNC_STORE__BUSY_TIMEOUT_MS": "100",
            **{f"CARESYNC_DOWNSTREAM__{s.upper()}__ENABLED": "false" for s in SYSTEMS},
        },
    )
    with anyio.fail_after(20):
        async with running(dep.cfg, nats_url, dep.data_dir) as service:
            async with exclusive_lock(dep.db_path):
                await anyio.sleep(1.0)
            await anyio.sleep(0.5)
            assert service.router is not None
            assert service.router.ready


async def calls_recorded(dep: Deployment, at_least: int) -> int:
    """Downstream calls recorded in the router's store (0 until there are ``at_least``)."""
    conn = sqlite3.connect(f"file:{dep.db_path}?mode=ro", uri=True, timeout=5.0)
    try:
        row = conn.execute("SELECT count(*) FROM downstream_calls").fetchone()
    finally:
        conn.close()
    return int(row[0]) if int(row[0]) >= at_least else 0


def retried_systems(dep: Deployment) -> set[str]:
    """Systems with a call that failed transiently (and was retried)."""
    conn = sqlite3.connect(f"file:{dep.db_path}?mode=ro", uri=True, timeout=5.0)
    try:
        rows = conn.execute(
            "SELECT DISTINCT system FROM downstream_calls WHERE outcome = 'transient'"
        ).fetchall()
    finally:
        conn.close()
    return {str(r[0]) for r in rows}


async def committed_offset(dep: Deployment) -> int:
    """The input offset the router's store has committed."""
    conn = sqlite3.connect(f"file:{dep.db_path}?mode=ro", uri=True, timeout=5.0)
    try:
        row = conn.execute("SELECT coalesce(sum(seq), 0) FROM offsets").fetchone()
    finally:
        conn.close()
    return int(row[0])


async def ack_floor(js: JetStreamContext, dep: Deployment) -> int:
    """Stream sequence through which the router's input consumer is acknowledged."""
    subjects = dep.subjects
    info = await js.consumer_info(subjects.input_stream(0), subjects.consumer_name(0))
    return int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
