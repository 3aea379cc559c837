"""A router in two processes on two partitions: the real ``caresync router-process`` child,
started, merged into health, restarted after a kill -9, stopped with the primary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import msgspec
import pytest
from harness import (
    Expected,
    appointment_workload,
    client,
    expected,
    load_refdata,
    make_config,
    pid_alive,
    wait_for,
)

from caresync.cli.datadir import DataDirLock
from caresync.cli.up import mappings_config
from caresync.codecs import encode_envelope, make_envelope
from caresync.config import Config, ConfigError, load_config
from caresync.router.embedded import EmbeddedNats
from caresync.router.processes import partitions_of
from caresync.router.service import RouterService, open_store, subjects_for
from caresync.store import BatchWrite, EntityRow

pytestmark = pytest.mark.anyio

CARESYNC = str(Path(sys.executable).parent / "caresync")


def test_partitions_are_dealt_round_robin_over_the_processes() -> None:
    assert partitions_of(0, 2, 5) == [0, 2, 4]
    assert partitions_of(1, 2, 5) == [1, 3]
    assert partitions_of(0, 1, 3) == [0, 1, 2]
    dealt = sorted(p for g in range(3) for p in partitions_of(g, 3, 8))
    assert dealt == list(range(8))


def test_more_processes_than_partitions_is_a_config_error() -> None:
    env = {"CARESYNC_ROUTER__PROCESSES": "3", "CARESYNC_STREAMS__PARTITIONS": "2"}
    problem = r"router\.processes.*must not exceed streams\.partitions"
    with pytest.raises(ConfigError, match=problem):
        load_config(None, environ=env)
    assert load_config(None, environ={**env, "CARESYNC_ROUTER__PROCESSES": "2"}).router.processes


def test_a_router_process_runs_only_under_caresync_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
    env |= {"CARESYNC_ROUTER__PROCESSES": "2", "CARESYNC_STREAMS__PARTITIONS": "2"}

    def child(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CARESYNC, "router-process", "--data-dir", str(tmp_path), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )

    me = str(os.getpid())
    url = ["--nats", "nats://127.0.0.1:1"]
    bad_group = child("--group", "2", "--parent-pid", me, *url)
    assert bad_group.returncode == 1
    assert "--group 2 is not one of this router's other processes" in bad_group.stderr
    orphan = child("--group", "1", "--parent-pid", "1", *url)
    assert orphan.returncode == 1
    assert "that started this one is gone" in orphan.stderr
    unlocked = child("--group", "1", "--parent-pid", me, *url)
    assert unlocked.returncode == 1
    assert "no `caresync up` holds" in unlocked.stderr


async def test_two_processes_share_the_work_and_a_killed_one_is_restarted(
    tmp_path: Path, unique_prefix: str
) -> None:
    cfg = make_config(unique_prefix, streams={"partitions": 2}, router={"processes": 2})
    subjects = subjects_for(cfg)
    first = appointment_workload(unique_prefix, appointments=40)
    data = tmp_path / "data"
    lock = DataDirLock(data)
    lock.acquire("the test, as caresync up")  # what `caresync up` holds for its processes
    try:
        async with EmbeddedNats(tmp_path / "nats", extra_config=mappings_config(subjects)) as srv:
            service = RouterService(cfg, nats_url=srv.url, data_dir=data)
            async with anyio.create_task_group() as tg, client(srv.url) as nc:
                await tg.start(service.run)
                assert service.router is not None
                assert [w.stream for w in service.router.workers] == [subjects.input_stream(0)]
                assert service.processes is not None
                [other] = service.processes.children
                assert other.process is not None
                pid = other.process.pid
                js = nc.jetstream()
                await load_refdata(js, service)

                async def health() -> dict[str, object]:
                    reply = await nc.request(subjects.control("health"), b"", timeout=5)
                    return dict(msgspec.json.decode(reply.data))

                h = await health()
                assert h["ready"] is True
                assert [p["group"] for p in h["processes"]] == [0, 1]  # type: ignore[attr-defined]
                streams = [p["stream"] for p in h["partitions"]]  # type: ignore[attr-defined]
                assert streams == [subjects.input_stream(0), subjects.input_stream(1)]
                env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
                env["CARESYNC_STREAMS__SUBJECT_PREFIX"] = unique_prefix
                cli = await anyio.run_process(
                    [CARESYNC, "health", "--nats", srv.url], env=env, check=False
                )
                assert cli.returncode == 0, cli.stdout + cli.stderr
                assert b"2 process(es), 2 partition(s)" in cli.stdout

                async def accepted(n: int) -> bool:
                    parts = (await health())["partitions"]
                    return sum(p["accepted"] for p in parts) >= n  # type: ignore[attr-defined]

                half = len(first) // 2
                for s in first[:half]:
                    await js.publish(s.subject, s.data, headers={"Nats-Msg-Id": s.command_id})
                await wait_for(
                    lambda: accepted(expected(first[:half]).applied), what="the first half"
                )
                os.kill(pid, signal.SIGKILL)

                async def restarted() -> bool:
                    h = await health()
                    procs = h["processes"]
                    return bool(h["ready"]) and procs[1]["restarts"] == 1  # type: ignore[index]

                # Published while process 1 is down: its partition waits in JetStream.
                for s in first[half:]:
                    await js.publish(s.subject, s.data, headers={"Nats-Msg-Id": s.command_id})
                await wait_for(restarted, what="process 1 to be started again")
                assert other.process is not None
                assert other.process.pid != pid
                oracle = expected(first)
                # What the killed process had not committed is redelivered to the new one,
                # which applies it once: every state ends as the pure actors say.
                await wait_for(
                    lambda: states_match(cfg, data, oracle), what="the whole workload applied"
                )
                parts = (await health())["partitions"]
                assert all(p["accepted"] > 0 for p in parts)  # type: ignore[attr-defined]
                assert sum(p["rejected"] for p in parts) == 0  # type: ignore[attr-defined]
                second_pid = other.process.pid
                service.stop()
            assert not pid_alive(second_pid)
            assert other.process.returncode == 0  # drained and stopped on SIGTERM
            assert not (data / "router-processes.toml").exists()  # may hold credentials
    finally:
        lock.release()
    assert await states_match(cfg, data, oracle)


async def states_match(cfg: Config, data: Path, oracle: Expected) -> bool:
    """Every entity of the workload's network stored with the state the pure actors reach."""
    wanted = oracle.network.states
    async with await open_store(cfg, data) as store:
        rows = await store.load_entities(list(wanted))
    if set(rows) != set(wanted):
        return False
    return all(
        msgspec.msgpack.decode(rows[key].state, type=type(want)) == want
        for key, want in wanted.items()
    )


async def test_a_release_goes_to_the_process_that_runs_the_partition(
    tmp_path: Path, unique_prefix: str
) -> None:
    cfg = make_config(unique_prefix, streams={"partitions": 2}, router={"processes": 2})
    subjects = subjects_for(cfg)
    data = tmp_path / "data"
    ids = [f"P{i}" for i in range(8)]
    # Stored states that do not decode: the first message to each parks its entity, in the
    # partition (and so the process) that its id hashes to.  Written to both partitions' files
    # (which one an id hashes to is the server's business); each partition reads only its own.
    async with await open_store(cfg, data) as store:
        rows = [EntityRow("appointment", i, b"\xc1 not msgpack", parked=False, seq=1) for i in ids]
        for p in (0, 1):
            await store.of(p).commit(BatchWrite(entities=rows))
    lock = DataDirLock(data)
    lock.acquire("the test, as caresync up")
    try:
        async with EmbeddedNats(tmp_path / "nats", extra_config=mappings_config(subjects)) as srv:
            service = RouterService(cfg, nats_url=srv.url, data_dir=data)
            async with anyio.create_task_group() as tg, client(srv.url) as nc:
                await tg.start(service.run)
                js = nc.jetstream()
                for i in ids:
                    env = make_envelope(
                        id=f"{i}-cancel", kind="appointment.cancel", entity=i, payload={}
                    )
                    await js.publish(subjects.command("appointment", i), encode_envelope(env))

                async def all_parked() -> bool:
                    async with await open_store(cfg, data) as store:
                        return all([await store.parked("appointment", i) for i in ids])

                await wait_for(all_parked, what="every entity parked")
                async with await open_store(cfg, data) as store:
                    streams = {i: (await store.parked("appointment", i))[0].stream for i in ids}
                assert set(streams.values()) == {subjects.input_stream(p) for p in (0, 1)}
                for i in ids:
                    body = msgspec.json.encode({"kind": "appointment", "id": i})
                    reply = await nc.request(subjects.control("release"), body, timeout=30)
                    result = msgspec.json.decode(reply.data)
                    # Re-run where the partition runs: the state still does not decode, so it
                    # stays parked (process 0 would have answered "no parked messages").
                    assert result["parked"] is True, (i, streams[i], result)
                    [message] = result["messages"]
                    assert message["outcome"] == "parked"
                    assert "stored state does not decode" in message["reason"]
                service.stop()
    finally:
        lock.release()
