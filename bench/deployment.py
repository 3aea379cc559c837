"""One benchmark run's deployment: a fresh embedded server, the caresync phase, then the raw
nats-py loop doing the same number of message moves on the same server.

Shared by ``caresync bench fanout`` and ``caresync bench workflow``; each brings its own
caresync phase (which starts the router, drives the workload and returns its figures).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from caresync.bench.raw_loop import run_raw
from caresync.bench.report import IN_FLIGHT
from caresync.bench.workload import Workload
from caresync.cli.up import mappings_config
from caresync.config import Config
from caresync.router.embedded import EmbeddedNats
from caresync.router.service import subjects_for

CaresyncPhase = Callable[
    [NatsClient, JetStreamContext, EmbeddedNats, Path], Awaitable[dict[str, Any]]
]
"""Runs caresync on the server; its figures include ``moves``, ``elapsed_s``, ``deadline_s``."""


def say(text: str) -> None:
    """Progress on stderr (stdout is kept for the table or the JSON)."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


async def measure(
    *,
    cfg: Config,
    workload: Workload,
    caresync_phase: CaresyncPhase,
    unit: str,
    prefix: str,
    base_dir: str | None,
    keep: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``caresync_phase`` then the raw loop on one fresh server; (caresync, raw) figures.

    The temporary data dir is removed after a successful run unless ``keep``; after a failure
    it is kept, for its logs.
    """
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=base_dir))
    extra = mappings_config(subjects_for(cfg))
    ok = False
    try:
        async with EmbeddedNats(tmp / "nats", extra_config=extra) as server:
            nc = await nats.connect(server.url, name="caresync-bench", pending_size=64 << 20)
            try:
                js = nc.jetstream(publish_async_max_pending=IN_FLIGHT)
                cs = await caresync_phase(nc, js, server, tmp)
                moves = int(cs["moves"])
                say(
                    f"caresync {workload.n / cs['elapsed_s']:.0f} {unit}; raw loop next "
                    f"({moves} moves, {moves / workload.n:.3f} per command)"
                )
                raw = await run_raw(
                    server.url,
                    js,
                    workload,
                    moves=moves,
                    outputs=int(cs.get("outputs", 0)),
                    workdir=tmp,
                    server_pid=server.pid,
                    batch=cfg.router.batch_size,
                    batches_in_flight=cfg.router.batches_in_flight,
                    expires_s=cfg.router.pull_expires_ms / 1000,
                    deadline_s=cs["deadline_s"],
                )
            finally:
                await nc.close()
        ok = True
    finally:
        if ok and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            say(f"data and logs kept in {tmp}")
    return cs, raw
