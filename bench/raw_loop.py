"""The baseline: plain nats-py doing the same message moves as the router, and nothing else.

In its own process (``python -m caresync.bench.raw_loop --nats URL``): one task consumes
RAW_IN with the router's continuous pull consumer (durable, AckPolicy.ALL) and, per batch,
publishes messages to RAW_FX with ``publish_async`` and a Msg-Id, awaits the PubAcks, and acks
the batch through its last message; another task consumes RAW_FX the same way and acks.  No
decoding, no store, no actor logic, no dedupe.

Message moves: caresync's fan-out is not the same for every command (a booking reaches
billing, supply, ERP and the items of its card; a reschedule only ERP), so the raw loop is
given the total, ``--moves`` internal messages over ``--inputs`` inputs, and spreads it evenly
by stream sequence: input ``s`` (1-based) fans out to ``floor(s * moves / inputs) - floor((s-1)
* moves / inputs)`` messages.  The total is exactly the internal commands caresync sends for
the same workload, one hop instead of several.  caresync also publishes its downstream effects
to the output stream (with PubAcks; no connector consumes them in the bench): ``--outputs``
messages, spread the same way over the RAW_FX messages, are published to RAW_OUT by the task
that consumes RAW_FX before it acks them.

The driver side (:func:`run_raw`) creates the streams, starts the process, publishes the same N
input messages and polls the RAW_FX consumer's ack floor until ``moves`` are consumed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api

from caresync.bench.fanout import POLL_S, BenchError, log_tail, open_log, publish_all
from caresync.bench.report import CpuMeter
from caresync.bench.workload import Workload
from caresync.router.jetstream import JetStreamConsumer, connect
from caresync.router.logs import configure_logging

RAW_IN, RAW_FX, RAW_OUT = "RAW_IN", "RAW_FX", "RAW_OUT"
IN_PREFIX, FX_PREFIX, OUT_PREFIX = "raw.in.", "raw.fx.", "raw.out."
IN_CONSUMER, FX_CONSUMER = "raw-in", "raw-fx"


# -- driver side --------------------------------------------------------------------------------
async def create_streams(js: JetStreamContext) -> None:
    """RAW_IN, RAW_FX and RAW_OUT, file storage, like the router's streams."""
    for name, prefix in ((RAW_IN, IN_PREFIX), (RAW_FX, FX_PREFIX), (RAW_OUT, OUT_PREFIX)):
        await js.add_stream(
            config=api.StreamConfig(
                name=name,
                subjects=[f"{prefix}>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                num_replicas=1,
            )
        )


def raw_messages(workload: Workload) -> list[tuple[str, bytes]]:
    """The workload's messages (same bytes, same order) on ``raw.in.<kind>.<id>``."""
    out = []
    for c in workload.commands:
        _, _, rest = c.subject.partition(".in.")
        out.append((IN_PREFIX + rest, c.data))
    return out


def moves_of(seq: int, moves: int, inputs: int) -> int:
    """Messages the input at stream sequence ``seq`` (1-based) fans out to."""
    if seq > inputs:
        return 0
    return seq * moves // inputs - (seq - 1) * moves // inputs


async def run_raw(
    url: str,
    js: JetStreamContext,
    workload: Workload,
    *,
    moves: int,
    outputs: int = 0,
    workdir: Path,
    server_pid: int,
    batch: int,
    batches_in_flight: int,
    expires_s: float,
    deadline_s: float,
) -> dict[str, Any]:
    """Run the raw loop process over the workload's messages (``moves`` effects in all, and
    ``outputs`` messages published to the output stream on the way)."""
    await create_streams(js)
    messages = raw_messages(workload)
    target = moves
    log_path = workdir / "raw_loop.log"
    with open_log(log_path) as log_file:
        process = await anyio.open_process(
            [
                sys.executable,
                "-m",
                "caresync.bench.raw_loop",
                *("--nats", url),
                *("--moves", str(moves), "--inputs", str(len(messages))),
                *("--outputs", str(outputs)),
                *("--batch", str(batch)),
                *("--batches-in-flight", str(batches_in_flight), "--expires", str(expires_s)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            cwd=workdir,
        )
    try:
        await _wait_line(process, b"ready", log_path)
        meter = CpuMeter({"raw-loop": process.pid, "nats-server": server_pid})
        t0 = time.monotonic()
        publish_s = 0.0

        async def publish() -> None:
            nonlocal publish_s
            publish_s = await publish_all(js, messages)

        async with anyio.create_task_group() as tg:
            tg.start_soon(publish)
            floor = await _wait_floor(js, target, deadline_s, process)
            elapsed = time.monotonic() - t0
        cpu = meter.cores()
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            out = b""
            with anyio.move_on_after(30):
                assert process.stdout is not None
                async for chunk in process.stdout:
                    out += chunk
            with anyio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
            status = await process.wait()
            await process.aclose()
    if status != 0:
        raise BenchError(f"raw loop exited with {status}:\n{log_tail(log_path)}")
    stats = json.loads(out.decode().strip().splitlines()[-1])
    return {
        "elapsed_s": elapsed,
        "publish_s": publish_s,
        "cpu": cpu,
        "fx_ack_floor": floor,
        **stats,
    }


async def _wait_line(process: Process, marker: bytes, log_path: Path) -> None:
    assert process.stdout is not None
    buf = b""
    with anyio.fail_after(60):
        while marker not in buf:
            try:
                buf += await process.stdout.receive()
            except anyio.EndOfStream:
                raise BenchError(
                    f"raw loop exited during start-up:\n{log_tail(log_path)}"
                ) from None


async def _wait_floor(js: JetStreamContext, target: int, deadline_s: float, process: Any) -> int:
    deadline = time.monotonic() + deadline_s
    floor = 0
    while True:
        info = await js.consumer_info(RAW_FX, FX_CONSUMER)
        floor = int(info.ack_floor.stream_seq) if info.ack_floor else 0
        if floor >= target:
            return floor
        if process.returncode is not None or time.monotonic() > deadline:
            raise BenchError(f"raw loop: RAW_FX ack floor {floor} of {target} (deadline or exit)")
        await anyio.sleep(POLL_S)


# -- process side -------------------------------------------------------------------------------
async def _consumer(
    nc: NatsClient, stream: str, name: str, args: argparse.Namespace
) -> JetStreamConsumer:
    # The router's consumer settings (see caresync.router.jetstream / service).
    await nc.jetstream().add_consumer(
        stream,
        config=api.ConsumerConfig(
            durable_name=name,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.ALL,
            ack_wait=60.0,
            max_deliver=-1,
            max_ack_pending=max(args.batch * (args.batches_in_flight + 2), 1000),
            max_waiting=512,
        ),
    )
    consumer = JetStreamConsumer(nc, stream, name, batch=args.batch, expires_s=args.expires)
    await consumer.start()
    return consumer


async def _serve(args: argparse.Namespace) -> dict[str, int]:
    nc = await connect(args.nats, name="caresync-raw-loop", connect_timeout_s=5.0)
    js = nc.jetstream(publish_async_max_pending=100_000)
    stats = {"consumed_in": 0, "published_fx": 0, "consumed_fx": 0, "published_out": 0}
    moves, n_inputs, outputs = args.moves, args.inputs, args.outputs
    inputs = await _consumer(nc, RAW_IN, IN_CONSUMER, args)
    effects = await _consumer(nc, RAW_FX, FX_CONSUMER, args)

    async def relay(
        consumer: JetStreamConsumer, strip: str, prefix: str, total: int, over: int, tag: str
    ) -> tuple[int, int]:
        """Consume one batch; each message publishes its share of ``total`` (spread over
        ``over`` messages) under ``prefix``, with PubAcks; then ack the batch."""
        batch = await consumer.next_batch(args.batch, args.expires)
        if not batch:
            return 0, 0
        futures = []
        for m in batch:
            base = prefix + m.subject[len(strip) :]
            for k in range(moves_of(m.seq, total, over)):
                futures.append(
                    await js.publish_async(
                        f"{base}.{k}", m.data, headers={"Nats-Msg-Id": f"{tag}{m.seq}:{k}"}
                    )
                )
        await asyncio.gather(*futures)
        await consumer.ack_through(batch[-1])
        return len(batch), len(futures)

    async def move() -> None:
        while True:
            consumed, published = await relay(inputs, IN_PREFIX, FX_PREFIX, moves, n_inputs, "")
            stats["consumed_in"] += consumed
            stats["published_fx"] += published

    async def drain() -> None:
        while True:
            consumed, published = await relay(effects, FX_PREFIX, OUT_PREFIX, outputs, moves, "o")
            stats["consumed_fx"] += consumed
            stats["published_out"] += published

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    tasks = [asyncio.create_task(move()), asyncio.create_task(drain())]
    print("ready", flush=True)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
    for task in [*tasks, waiter]:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task  # re-raises a task's own failure
    await inputs.close()
    await effects.close()
    await nc.close()
    return stats


def main() -> None:
    """Entry point of the raw loop process; prints ``ready``, then its counters as JSON."""
    parser = argparse.ArgumentParser(prog="caresync.bench.raw_loop")
    parser.add_argument("--nats", required=True)
    parser.add_argument("--moves", type=int, required=True, help="effect messages in all")
    parser.add_argument("--inputs", type=int, required=True, help="input messages in all")
    parser.add_argument("--outputs", type=int, default=0, help="output messages in all")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--batches-in-flight", type=int, default=2)
    parser.add_argument("--expires", type=float, default=1.0)
    args = parser.parse_args()
    configure_logging("warning")
    stats = asyncio.run(_serve(args))
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
