"""A fresh deployment for ``bench replay`` and ``bench entities``: an embedded nats-server in
a temporary directory, the router as its own ``caresync up --nats URL`` process (connectors
off, as in ``bench fanout``), the bench reference data loaded before anything is timed, and
the memory of a process read from ``/proc``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats
from anyio.abc import Process
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from caresync.bench import fanout as fo
from caresync.bench.deployment import say
from caresync.bench.refdata import write_csv
from caresync.bench.report import IN_FLIGHT
from caresync.cli.up import mappings_config
from caresync.codecs import Subjects
from caresync.config import Config, load_config
from caresync.router.embedded import EmbeddedNats
from caresync.router.service import store_path, subjects_for

READY_LINE = b"caresync up: router ready"
"""What ``caresync up`` prints once the router is ready (see :mod:`caresync.cli.up`)."""
LEDGERS_NOTE = (
    "connectors off, so no downstream acknowledgement comes back and the ERP and supply "
    "ledgers keep every effect pending"
)


@dataclass(frozen=True, slots=True)
class Deployment:
    """One run's server, client, configuration and directories."""

    tmp: Path
    server: EmbeddedNats
    nc: NatsClient
    js: JetStreamContext
    cfg: Config
    subjects: Subjects
    env: dict[str, str]
    """The router's environment (``CARESYNC_*`` of ours, connectors off)."""

    @property
    def router_dir(self) -> Path:
        """The router's data dir (its log is ``<router_dir>.log``)."""
        return self.tmp / "router"

    @property
    def log_path(self) -> Path:
        """The router's stdout and stderr, every start appended."""
        return Path(f"{self.router_dir}.log")

    @property
    def db_path(self) -> Path:
        """The router's SQLite store."""
        return store_path(self.cfg, self.router_dir)


@asynccontextmanager
async def fresh_deployment(
    prefix: str, base_dir: str | None, keep: bool, env_defaults: Mapping[str, str] | None = None
) -> AsyncIterator[Deployment]:
    """An embedded server in a new temporary dir, and a client on it.

    ``env_defaults`` are ``CARESYNC_*`` settings for the router that our own environment may
    override.  The directory is removed after a successful run unless ``keep``; after a
    failure it is kept, for its logs.
    """
    env = {**(env_defaults or {}), **fo.router_environment(os.environ)}
    cfg = load_config(None, environ=env)
    subjects = subjects_for(cfg)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=base_dir))
    ok = False
    try:
        async with EmbeddedNats(tmp / "nats", extra_config=mappings_config(subjects)) as server:
            nc = await nats.connect(server.url, name="caresync-bench", pending_size=64 << 20)
            try:
                js = nc.jetstream(publish_async_max_pending=IN_FLIGHT)
                yield Deployment(tmp, server, nc, js, cfg, subjects, env)
            finally:
                await nc.close()
        ok = True
    finally:
        if ok and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            say(f"data and logs kept in {tmp}")


@dataclass(frozen=True, slots=True)
class RefdataLoaded:
    """The bench reference data as the router keeps it."""

    version: int
    stock_commands: int


async def start_router(d: Deployment) -> Process:
    """``caresync up --nats URL --data-dir DIR``, waited for until it answers ready."""
    process = await fo.start_router(d.server.url, d.router_dir, d.env)
    try:
        await fo.wait_ready(d.nc, d.subjects, process, d.log_path)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await fo.stop_router(process)
        raise
    return process


async def load_refdata(d: Deployment, process: Process) -> RefdataLoaded:
    """Load the bench reference data (one item per card) with ``caresync refdata load``;
    wait until the router keeps it and has applied its stock commands."""
    refdata_dir = d.tmp / "refdata"
    write_csv(refdata_dir, 1)
    loaded = await fo.load_refdata(d.server.url, refdata_dir, d.env, d.tmp / "refdata.log")
    version, stock = int(loaded["version"]), int(loaded["stock_commands"])
    await fo.wait_refdata(d.db_path, process, version)
    await fo.wait_applied(
        d.nc,
        d.subjects,
        process,
        accepted=stock,
        duplicates=0,
        deadline_s=60.0,
        what="stock commands",
    )
    return RefdataLoaded(version, stock)


@dataclass(frozen=True, slots=True)
class Restart:
    """How long a fresh ``caresync up`` took to be ready."""

    to_ready_line_s: float
    """Spawn -> ``caresync up: router ready`` in its output."""
    to_health_ready_s: float
    """Spawn -> the first health reply with ``ready: true`` (what ``caresync health`` asks)."""


async def restart_router(d: Deployment, timeout_s: float = 120.0) -> tuple[Process, Restart]:
    """Start the router again and time it until ready (health polled every 20 ms)."""
    offset = d.log_path.stat().st_size if d.log_path.exists() else 0
    started = time.monotonic()
    process = await fo.start_router(d.server.url, d.router_dir, d.env)
    line_at = health_at = 0.0
    try:
        while not (line_at and health_at):
            now = time.monotonic()
            if not line_at and READY_LINE in _read_from(d.log_path, offset):
                line_at = now
            if not health_at and (await fo.health(d.nc, d.subjects, 0.2)).get("ready"):
                health_at = time.monotonic()
            if process.returncode is not None:
                raise fo.BenchError(
                    f"router exited with {process.returncode} on restart:\n"
                    f"{fo.log_tail(d.log_path)}"
                )
            if now - started > timeout_s:
                raise fo.BenchError(f"router not ready {timeout_s:g} s after restart")
            await anyio.sleep(0.02)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await fo.stop_router(process)
        raise
    return process, Restart(line_at - started, health_at - started)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return b""


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process now (``rss``) and at its peak (``hwm``), in MB."""
    out = {"rss": 0.0, "hwm": 0.0}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out["rss" if name == "VmRSS" else "hwm"] = round(int(value.split()[0]) / 1024, 1)
    return out


def dir_mb(path: Path) -> float:
    """Bytes of every file under ``path``, in MB."""
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return round(total / (1 << 20), 1)


def checks_text(checks: dict[str, Any]) -> str:
    """A run's checks on one line; the outbox (rows per status) last."""
    plain = ", ".join(
        f"{name} {str(v).lower() if isinstance(v, bool) else v}"
        for name, v in checks.items()
        if not isinstance(v, dict)
    )
    outbox = checks.get("outbox", {})
    return plain + ", outbox " + ", ".join(f"{s} {v:,}" for s, v in outbox.items())
