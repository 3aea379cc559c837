"""caresync under the fan-out workload: the router as its own process, driven over NATS.

The router runs as ``caresync up --nats URL`` in a separate process, so the driver and the
router never share an event loop.  Progress is read from the router's ``<prefix>.ctl.health``
control request; after the router has stopped, its SQLite store is read (read-only) to verify
exactly-once and to time every fan-out command.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import anyio
import nats.errors
import orjson
from anyio.abc import Process
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api

from caresync.bench.workload import BenchCommand, Workload
from caresync.codecs import Subjects

POLL_S = 0.02


class BenchError(Exception):
    """The benchmark could not complete; the message says what was reached."""


# -- publishing ---------------------------------------------------------------------------------
async def publish_all(js: JetStreamContext, messages: Sequence[tuple[str, bytes]]) -> float:
    """publish_async every message (in flight bounded by the context), await every PubAck.

    No ``Nats-Msg-Id``: re-sent commands must reach the router, whose dedupe is measured.
    Returns the seconds from the first publish to the last PubAck.
    """
    t0 = time.monotonic()
    futures = [await js.publish_async(subject, data) for subject, data in messages]
    acks = await asyncio.gather(*futures)
    if any(ack.duplicate for ack in acks):
        raise BenchError("a publish without Msg-Id came back as a duplicate")
    return time.monotonic() - t0


# -- the router process -------------------------------------------------------------------------
def caresync_command() -> list[str]:
    """How to run the ``caresync`` command of this interpreter's environment."""
    script = Path(sys.executable).parent / "caresync"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from caresync.cli import main; main()"]


def router_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The router's environment: ours minus data dir, config file, NATS URL and log settings.

    Other ``CARESYNC_<SECTION>__<KEY>`` variables are passed on, so that a setting can be
    benchmarked (``CARESYNC_ROUTER__BATCH_SIZE=1000 caresync bench``); the figures show them.
    """
    dropped = ("CARESYNC_DATA_DIR", "CARESYNC_CONFIG", "CARESYNC_NATS__", "CARESYNC_LOG__")
    env = {k: v for k, v in base.items() if not k.upper().startswith(dropped)}
    env["CARESYNC_LOG__LEVEL"] = "warning"
    return env


async def start_router(url: str, data_dir: Path, env: dict[str, str]) -> Process:
    """``caresync up --nats URL --data-dir DIR``, logging to ``DIR.log``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open_log(Path(f"{data_dir}.log")) as log_file:
        return await anyio.open_process(
            [*caresync_command(), "up", "--nats", url, "--data-dir", str(data_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            cwd=data_dir.parent,
            env=env,
        )


def open_log(path: Path) -> IO[bytes]:
    """A log file for a child process (the child keeps its own descriptor)."""
    return path.open("ab")


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<no log: {exc}>"


async def health(nc: NatsClient, subjects: Subjects, timeout_s: float = 2.0) -> dict[str, Any]:
    """The router's health record; an empty dict if it did not answer in time."""
    try:
        reply = await nc.request(subjects.control("health"), b"{}", timeout=timeout_s)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return {}
    record: dict[str, Any] = orjson.loads(reply.data)
    return record


def totals(record: Mapping[str, Any]) -> dict[str, int]:
    """Counters summed over partitions (accepted, duplicates, rejected...)."""
    out: dict[str, int] = {}
    for part in record.get("partitions", []):
        for name in ("received", "accepted", "duplicates", "rejected", "dead_lettered", "parked"):
            out[name] = out.get(name, 0) + int(part.get(name, 0))
    return out


async def wait_ready(
    nc: NatsClient, subjects: Subjects, process: Process, log_path: Path, timeout_s: float = 60.0
) -> None:
    """Poll health until the router says ready; fail with its log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while not (await health(nc, subjects, 0.5)).get("ready"):
        if process.returncode is not None:
            raise BenchError(
                f"router exited with {process.returncode} during start-up:\n{log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise BenchError(f"router not ready in {timeout_s:g} s:\n{log_tail(log_path)}")
        await anyio.sleep(0.1)


async def stop_router(process: Process, timeout_s: float = 60.0) -> int:
    """SIGTERM, wait for the drain; SIGKILL if it does not stop.  Returns the exit status."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(timeout_s):
            await process.wait()
        if process.returncode is None:
            process.kill()
    status = await process.wait()
    await process.aclose()
    return status


async def wait_applied(
    nc: NatsClient,
    subjects: Subjects,
    process: Process,
    *,
    accepted: int,
    duplicates: int,
    deadline_s: float,
    what: str,
) -> dict[str, int]:
    """Poll health every 20 ms until the router has accepted and deduped what it should."""
    deadline = time.monotonic() + deadline_s
    reached: dict[str, int] = {}
    while True:
        record = await health(nc, subjects)
        if record:
            reached = totals(record)
            if reached["accepted"] >= accepted and reached["duplicates"] >= duplicates:
                return reached
        if process.returncode is not None:
            raise BenchError(f"{what}: router exited with {process.returncode}; reached {reached}")
        if time.monotonic() > deadline:
            raise BenchError(
                f"{what}: not done within {deadline_s:g} s: expected accepted={accepted} "
                f"duplicates={duplicates}, reached {reached}"
            )
        await anyio.sleep(POLL_S)


# -- phases -------------------------------------------------------------------------------------
async def throughput_phase(
    nc: NatsClient,
    js: JetStreamContext,
    subjects: Subjects,
    process: Process,
    workload: Workload,
    deadline_s: float,
) -> dict[str, Any]:
    """Publish every command; time from the first publish until everything is applied."""
    messages = [(c.subject, c.data) for c in workload.commands]
    publish_s = 0.0

    async def publish() -> None:
        nonlocal publish_s
        publish_s = await publish_all(js, messages)

    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(publish)
        reached = await wait_applied(
            nc,
            subjects,
            process,
            accepted=workload.expected_accepted,
            duplicates=workload.duplicates,
            deadline_s=deadline_s,
            what="throughput phase",
        )
        elapsed = time.monotonic() - t0
    return {"elapsed_s": elapsed, "publish_s": publish_s, "reached": reached}


async def latency_phase(
    js: JetStreamContext, workload: Workload, rate_per_s: float
) -> dict[str, float]:
    """Publish ``workload`` paced at ``rate_per_s``; the wall time of each command's publish."""
    published: dict[str, float] = {}
    futures: list[asyncio.Future[api.PubAck]] = []
    t0 = time.monotonic()
    for i, command in enumerate(workload.commands):
        delay = t0 + i / rate_per_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        published[command.command_id] = time.time()
        futures.append(await js.publish_async(command.subject, command.data))
    await asyncio.gather(*futures)
    return published


# -- verification from the store and the streams ------------------------------------------------
def read_store(db_path: Path) -> tuple[dict[str, tuple[str, float]], dict[str, int]]:
    """(command id -> (outcome, applied_at)) and outbox rows per status, read-only."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        applied = {
            cid: (outcome, at)
            for cid, outcome, at in conn.execute(
                "SELECT command_id, outcome, applied_at FROM applied"
            )
        }
        outbox = dict(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"))
    finally:
        conn.close()
    return applied, outbox


async def count_messages(js: JetStreamContext, stream: str, subject_filter: str) -> int:
    """Messages of ``stream`` on ``subject_filter``, through a throw-away filtered consumer."""
    info = await js.add_consumer(
        stream,
        config=api.ConsumerConfig(
            filter_subject=subject_filter,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=10.0,
            mem_storage=True,
        ),
    )
    await js.delete_consumer(stream, info.name)
    return int(info.num_pending or 0)


def check_applied(
    applied: Mapping[str, tuple[str, float]], workloads: Sequence[Workload]
) -> dict[str, int]:
    """Missing, unexpected and not-accepted command ids against what the workloads expect."""
    expected: set[str] = set()
    for w in workloads:
        expected |= w.expected_applied()
    return {
        "applied_rows": len(applied),
        "expected_rows": len(expected),
        "missing": len(expected - applied.keys()),
        "unexpected": len(applied.keys() - expected),
        "not_accepted": sum(1 for outcome, _ in applied.values() if outcome != "accepted"),
    }


def latencies_ms(
    applied: Mapping[str, tuple[str, float]],
    commands: Sequence[BenchCommand],
    published: Mapping[str, float],
) -> list[float]:
    """Per command: the last of its fan-out commands applied, minus its publish time (sorted)."""
    out = []
    for command in commands:
        done = max(applied[eid][1] for eid in command.effect_ids())
        out.append((done - published[command.command_id]) * 1000.0)
    return sorted(out)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted values (the peer's definition)."""
    n = len(sorted_values)
    idx = min(n - 1, max(0, round(p / 100.0 * n + 0.5) - 1))
    return sorted_values[idx]
