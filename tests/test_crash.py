"""Crash safety: a router subprocess is SIGKILLed at random points while thousands of commands
flow, restarted, and at the end every command was applied exactly once and every effect arrived
exactly once — counted on the receiving side (the streams and the target actors' state)."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import orjson
import pytest
from anyio.abc import Process
from harness import (
    appointment_workload,
    expected,
    make_config,
    publish_all,
    stream_messages,
    wait_for,
)
from nats.aio.client import Client as NatsClient
from workflow_network import demo_refdata

from caresync.actors import default_registry
from caresync.codecs.refdata import encode_refdata_set
from caresync.router.provision import provision
from caresync.router.service import subjects_for

pytestmark = pytest.mark.anyio

CARESYNC = str(Path(sys.executable).parent / "caresync")


def router_env(prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
    env |= {
        "CARESYNC_STREAMS__SUBJECT_PREFIX": prefix,
        "CARESYNC_STREAMS__STREAM_PREFIX": prefix.upper(),
        "CARESYNC_ROUTER__BATCH_SIZE": "100",
        "CARESYNC_LOG__LEVEL": "warning",
        # No simulator here: the effects are counted in their stream, not delivered.
        "CARESYNC_DOWNSTREAM__BILLING__ENABLED": "false",
        "CARESYNC_DOWNSTREAM__ERP__ENABLED": "false",
        "CARESYNC_DOWNSTREAM__SUPPLY__ENABLED": "false",
    }
    return env


async def start_router(url: str, data_dir: Path, prefix: str, log: Path) -> Process:
    handle = log.open("ab")
    process = await anyio.open_process(
        [CARESYNC, "up", "--nats", url, "--data-dir", str(data_dir)],
        env=router_env(prefix),
        stdout=handle,
        stderr=handle,
    )
    handle.close()
    return process


async def health(nc: NatsClient, prefix: str) -> dict[str, Any] | None:
    try:
        reply = await nc.request(f"{prefix}.ctl.health", b"{}", timeout=1.0)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return None
    result: dict[str, Any] = orjson.loads(reply.data)
    return result


async def test_sigkill_mid_stream_applies_everything_exactly_once(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    prefix, stream = unique_prefix, f"{unique_prefix.upper()}_IN"
    appointments = 400
    sent = appointment_workload(prefix, appointments)
    rng = random.Random(20261124)
    log = tmp_path / "router.log"
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    async def ready() -> bool:
        h = await health(nc, prefix)
        return bool(h and h["ready"])

    async def router_seq() -> int:
        h = await health(nc, prefix)
        return int(h["partitions"][0]["last_seq"]) if h else 0

    # Streams first, then the reference data, so the router starts with its cards in force.
    cfg = make_config(prefix)
    subjects = subjects_for(cfg)
    await provision(js, subjects, cfg.streams)
    await js.publish(subjects.refdata_subject, encode_refdata_set(demo_refdata().dataset))
    oracle = expected(sent)
    process = await start_router(nats_url, tmp_path, prefix, log)
    try:
        await wait_for(ready, what="the router to be ready")
        await publish_all(js, sent)
        kills = 0
        for _ in range(3):
            last = (await js.stream_info(stream)).state.last_seq
            current = await router_seq()
            if current >= last:
                break
            target = rng.randint(current + 1, last)

            async def reached(t: int = target) -> bool:
                return await router_seq() >= t

            await wait_for(reached, what=f"the router to reach seq {target}")
            process.send_signal(signal.SIGKILL)
            await process.wait()
            kills += 1
            process = await start_router(nats_url, tmp_path, prefix, log)
            await wait_for(ready, what="the restarted router")
        assert kills >= 1, "the router finished before it could be killed: make the workload bigger"

        expected_internal = oracle.internal

        # One partition: every internal command is applied with its cause and recorded on
        # the local stream, exactly once whatever the kills.
        local = f"{prefix.upper()}_LOCAL"

        async def quiescent() -> bool:
            info = await js.stream_info(stream)
            records = await js.stream_info(local)
            count = int(records.state.messages or 0)
            return count >= expected_internal and await router_seq() == info.state.last_seq

        await wait_for(quiescent, timeout_s=60, what="every command and effect to be applied")
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):
            assert await process.wait() == 0, log.read_text()[-3000:]

        assert not await stream_messages(js, stream, f"{prefix}.int.>")
        internal = await stream_messages(js, local, f"{prefix}.loc.>")
        downstream = await stream_messages(js, f"{prefix.upper()}_OUT", f"{prefix}.out.>")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await nc.close()

    # Receiving side: each effect is in its stream exactly once.
    internal_ids = Counter((m.headers or {})["Nats-Msg-Id"] for m in internal)
    assert len(internal) == expected_internal
    assert max(internal_ids.values()) == 1
    downstream_ids = Counter((m.headers or {})["Nats-Msg-Id"] for m in downstream)
    assert len(downstream) == oracle.downstream
    assert max(downstream_ids.values()) == 1

    # Every command applied exactly once, and every actor ends where the pure run ends.
    db = sqlite3.connect(f"file:{tmp_path / 'caresync.db'}?mode=ro", uri=True)
    try:
        applied = db.execute("SELECT count(*) FROM applied").fetchone()[0]
        rows = list(db.execute("SELECT kind, id, state FROM entities"))
    finally:
        db.close()
    assert applied == oracle.applied
    registry = default_registry()
    states = {
        (kind, id_): msgspec.msgpack.decode(raw, type=registry.kinds[kind].state_type)
        for kind, id_, raw in rows
    }
    assert states == oracle.network.states
    assert all(states[("appointment", f"A{a}")].status == "completed" for a in range(appointments))
