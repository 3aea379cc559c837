"""caresync under the fan-out workload: the router as its own process, driven over NATS.

The router runs as ``caresync up --nats URL`` in a separate process, so the driver and the
router never share an event loop; its downstream connectors are switched off (no simulator
runs: the bench ends where the effects are in the output stream).  Before anything is timed,
the bench reference data is loaded with ``caresync refdata load`` and the router is waited for
until it keeps that version and has applied its stock commands.  Progress is read from the
router's ``<prefix>.ctl.health`` control request; after the router has stopped, its SQLite
store is read (read-only) and the streams are read back to verify exactly-once against the
pure model (:mod:`caresync.bench.expected`) and to time every fan-out command.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import anyio
import msgspec
import nats.errors
import orjson
from anyio.abc import Process
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api

from caresync.bench.expected import Address, Outcome, Sent
from caresync.bench.workload import Workload
from caresync.codecs import Subjects, WireFormat, decode_envelope
from caresync.config.schema import DownstreamConfig
from caresync.router.processes import caresync_command
from caresync.store import read_only_union

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
def router_environment(base: Mapping[str, str], processes: int = 1) -> dict[str, str]:
    """The router's environment: ours minus data dir, config file, NATS URL and log settings,
    with every downstream connector switched off, in ``processes`` processes (with at least as
    many partitions).

    Other ``CARESYNC_<SECTION>__<KEY>`` variables are passed on, so that a setting can be
    benchmarked (``CARESYNC_ROUTER__BATCH_SIZE=1000 caresync bench``); the figures show them.
    Connectors are off whatever the environment says: no simulator runs, and their
    acknowledgements would be commands the workload does not account for.
    """
    dropped = (
        "CARESYNC_DATA_DIR",
        "CARESYNC_CONFIG",
        "CARESYNC_NATS__",
        "CARESYNC_LOG__",
        "CARESYNC_DOWNSTREAM__",
    )
    env = {k: v for k, v in base.items() if not k.upper().startswith(dropped)}
    env["CARESYNC_LOG__LEVEL"] = "warning"
    for system in msgspec.structs.fields(DownstreamConfig):
        env[f"CARESYNC_DOWNSTREAM__{system.name.upper()}__ENABLED"] = "false"
    return with_processes(env, processes)


def with_processes(env: dict[str, str], processes: int) -> dict[str, str]:
    """``env`` asking for ``processes`` router processes and at least as many partitions."""
    if processes > 1:
        partitions = int(env.get("CARESYNC_STREAMS__PARTITIONS", "1"))
        env["CARESYNC_ROUTER__PROCESSES"] = str(processes)
        env["CARESYNC_STREAMS__PARTITIONS"] = str(max(partitions, processes))
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
    names = ("received", "accepted", "duplicates", "rejected", "dead_lettered", "parked")
    out = dict.fromkeys(names, 0)
    for part in record.get("partitions", []):
        for name in names:
            out[name] += int(part.get(name, 0))
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
    """Poll health every 20 ms until the router has accepted and deduped what it should.

    Fails at once when anything is rejected, dead-lettered or parked: the workload has none.
    """
    deadline = time.monotonic() + deadline_s
    reached: dict[str, int] = {}
    while True:
        record = await health(nc, subjects)
        if record:
            reached = totals(record)
            if any(reached[k] for k in ("rejected", "dead_lettered", "parked")):
                raise BenchError(f"{what}: the router refused commands; reached {reached}")
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
    *,
    accepted: int,
    duplicates: int,
    deadline_s: float,
) -> dict[str, Any]:
    """Publish every command; time from the first publish until the router's counters reach
    ``accepted`` and ``duplicates`` (totals since it started)."""
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
            accepted=accepted,
            duplicates=duplicates,
            deadline_s=deadline_s,
            what="throughput phase",
        )
        elapsed = time.monotonic() - t0
    return {"elapsed_s": elapsed, "publish_s": publish_s, "reached": reached}


SETTLE_S = 1.0
"""Pause before a latency phase: it follows the peak run (or the previous phase), and the
router is still publishing, acking and checkpointing what that left behind.  Without it the
first phase measured that recovery: p99 at 25 % of peak 25.7 / 34.9 ms, 8.4 / 11.2 with it
(bench latency, router.batch_size 2000)."""


async def latency_phase(
    js: JetStreamContext, workload: Workload, rate_per_s: float
) -> dict[str, float]:
    """After :data:`SETTLE_S`, publish ``workload`` paced at ``rate_per_s``; the wall time of
    each command's publish."""
    await anyio.sleep(SETTLE_S)
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


# -- reference data -----------------------------------------------------------------------------
async def load_refdata(url: str, directory: Path, env: dict[str, str], log_path: Path) -> Any:
    """``caresync refdata load DIR --nats URL --json``; its JSON report (version, stock_commands).

    The same environment as the router's, so that the prefix and partitions agree.
    """
    with open_log(log_path) as log_file:
        done = await anyio.run_process(
            [
                *caresync_command(),
                *("refdata", "load", str(directory), "--json"),
                *("--nats", url, "--data-dir", str(directory.parent / "refdata-cli")),
            ],
            stdin=subprocess.DEVNULL,
            stderr=log_file,
            cwd=directory.parent,
            env=env,
            check=False,
        )
    try:
        report = orjson.loads(done.stdout)
    except orjson.JSONDecodeError:
        report = {}
    if done.returncode != 0 or not report.get("ok"):
        raise BenchError(
            f"caresync refdata load exited with {done.returncode}: "
            f"{done.stdout.decode(errors='replace')[-2000:]}\n{log_tail(log_path)}"
        )
    return report


def refdata_version(db_path: Path) -> int:
    """The highest reference-data version the router's store keeps (0 if none, or unreadable)."""
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return 0
    try:
        row = conn.execute("SELECT max(version) FROM refdata_versions").fetchone()
    except sqlite3.Error:
        return 0
    finally:
        conn.close()
    return int(row[0] or 0)


async def wait_refdata(
    db_path: Path, process: Process, version: int, deadline_s: float = 60.0
) -> None:
    """Until the router's store keeps ``version`` (the router follows the refdata stream)."""
    deadline = time.monotonic() + deadline_s
    while refdata_version(db_path) < version:
        if process.returncode is not None:
            raise BenchError(f"router exited with {process.returncode} while loading refdata")
        if time.monotonic() > deadline:
            raise BenchError(f"router did not take reference-data version {version}")
        await anyio.sleep(0.05)
    # The catalog adds a version right after the store has kept it: let that happen.
    await anyio.sleep(0.2)


# -- verification from the store and the streams ------------------------------------------------
Applied = dict[Address, tuple[str, float]]


def read_store(db_path: Path) -> tuple[Applied, dict[str, int]]:
    """((kind, entity, command id) -> (outcome, applied_at)) and outbox rows per status."""
    conn = read_only_union(db_path)  # every partition file of the store
    try:
        applied = {
            (kind, entity, cid): (outcome, at)
            for kind, entity, cid, outcome, at in conn.execute(
                "SELECT kind, entity, command_id, outcome, applied_at FROM applied"
            )
        }
        outbox = dict(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"))
    finally:
        conn.close()
    return applied, outbox


async def read_stream(
    js: JetStreamContext, stream: str, subject_filter: str, batch: int = 1000
) -> list[tuple[str, bytes]]:
    """(Msg-Id, data) of every message of ``stream`` on ``subject_filter``, in stream order."""
    info = await js.add_consumer(
        stream,
        config=api.ConsumerConfig(
            filter_subject=subject_filter,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
        ),
    )
    want = int(info.num_pending or 0)
    out: list[tuple[str, bytes]] = []
    try:
        sub = await js.pull_subscribe_bind(consumer=info.name, stream=stream)
        try:
            while len(out) < want:
                try:
                    msgs = await sub.fetch(min(batch, want - len(out)), timeout=5.0)
                except nats.errors.TimeoutError:
                    raise BenchError(f"reading {stream}: {len(out)} of {want} messages") from None
                out.extend(((m.headers or {}).get("Nats-Msg-Id", ""), m.data) for m in msgs)
        finally:
            await sub.unsubscribe()
    finally:
        await js.delete_consumer(stream, info.name)
    return out


def compare_sent(
    expected: Mapping[str, Sent], expected_sent: int, messages: Sequence[tuple[str, bytes]]
) -> dict[str, int]:
    """Messages read back from a stream against the pure model's effects.

    ``mismatched``: same Msg-Id, but another kind, entity, cause or payload.
    """
    ids = [msg_id for msg_id, _ in messages]
    distinct = set(ids)
    mismatched = 0
    for msg_id, data in messages:
        want = expected.get(msg_id)
        if want is None:
            continue
        env, fmt = decode_envelope(data)
        raw = env.payload_bytes
        payload = (
            {}
            if not raw
            else msgspec.json.decode(raw)
            if fmt is WireFormat.JSON
            else msgspec.msgpack.decode(raw)
        )
        got = (env.kind, env.entity, env.causation_id, payload)
        if got != (want.kind, want.entity, want.causation_id, want.payload):
            mismatched += 1
    return {
        "in_stream": len(ids),
        "expected": expected_sent,
        "distinct_msg_ids": len(distinct),
        "missing": len(expected.keys() - distinct),
        "unexpected": len(distinct - expected.keys()),
        "mismatched": mismatched,
    }


def check_applied(applied: Applied, expected: set[Address]) -> dict[str, int]:
    """Missing, unexpected and not-accepted rows of ``applied`` against the pure model."""
    return {
        "applied_rows": len(applied),
        "expected_rows": len(expected),
        "missing": len(expected - applied.keys()),
        "unexpected": len(applied.keys() - expected),
        "not_accepted": sum(1 for outcome, _ in applied.values() if outcome != "accepted"),
    }


def latencies_ms(
    applied: Applied, outcomes: Iterable[Outcome], published: Mapping[str, float]
) -> list[float]:
    """Per command: the last of its internal commands (all hops) applied, minus its publish
    time; the command's own applied_at if it fans out to nothing (sorted)."""
    out = []
    for outcome in outcomes:
        addresses = [s.address for s in outcome.internal] or [outcome.address]
        done = max(applied[a][1] for a in addresses)
        out.append((done - published[outcome.command_id]) * 1000.0)
    return sorted(out)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted values (the peer's definition)."""
    n = len(sorted_values)
    idx = min(n - 1, max(0, round(p / 100.0 * n + 0.5) - 1))
    return sorted_values[idx]
