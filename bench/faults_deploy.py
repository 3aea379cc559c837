"""Deployments for the fault tests and the soak: a router subprocess and its simulators.

A :class:`Deployment` is one router's configuration on one NATS server (its own subject prefix,
data directory and environment, connectors on); :class:`RouterProcess` runs it as ``caresync up
--nats URL`` in a child process that can be SIGKILLed and started again; the billing, ERP and
supply simulators run in the calling process (:meth:`Deployment.simulators`), so that they
outlive the router, and take control requests (:func:`sim_control`).  :func:`poll` waits for a
condition while checking that the router lives.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
from anyio.abc import Process
from nats.aio.client import Client as NatsClient

from caresync.bench import fanout as fo
from caresync.bench.workflow_data import build_workflow
from caresync.bench.workload import Workload
from caresync.codecs import Subjects
from caresync.config import Config, load_config
from caresync.router.service import store_path, subjects_for
from caresync.sim import SimServer, SimSettings

SYSTEMS = ("billing", "erp", "supply")
POLL_S = 0.1


class SoakError(Exception):
    """Raised when a phase cannot go on: a deadline passed or the router exited."""


def say(text: str) -> None:
    """Progress on stderr."""
    print(f"soak: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Deployment:
    """One router's configuration on one NATS server: prefixes, directories, environment."""

    url: str
    prefix: str
    sim_prefix: str
    data_dir: Path
    env: dict[str, str]
    cfg: Config

    @property
    def subjects(self) -> Subjects:
        """The router's subject and stream names."""
        return subjects_for(self.cfg)

    @property
    def db_path(self) -> Path:
        """The router's SQLite store."""
        return store_path(self.cfg, self.data_dir)

    @property
    def sim_db(self) -> Path:
        """The simulators' own records."""
        return self.data_dir / "sim.db"

    @property
    def log_path(self) -> Path:
        """Where the router process logs (``caresync up``'s stdout and stderr)."""
        return Path(f"{self.data_dir}.log")

    @property
    def input_streams(self) -> list[str]:
        """Every partition's input stream."""
        return self.subjects.input_streams()

    def simulators(self) -> SimServer:
        """Billing, ERP and supply on ``sim_prefix``, feeding back to this router's prefix."""
        settings = SimSettings(sim_prefix=self.sim_prefix, router_prefix=self.prefix)
        return SimServer(self.url, self.sim_db, settings)


def make_deployment(
    url: str,
    prefix: str,
    data_dir: Path,
    *,
    backoff_max_ms: int = 400,
    settings: Mapping[str, str] | None = None,
) -> Deployment:
    """A deployment with its own subject prefix; connectors on, to simulators on
    ``<prefix>sim``, retrying at most every ``backoff_max_ms``.

    ``settings``: more ``CARESYNC_*`` variables for the router.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    sim_prefix = f"{prefix}sim"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CARESYNC_")}
    env |= {
        "CARESYNC_STREAMS__SUBJECT_PREFIX": prefix,
        "CARESYNC_STREAMS__STREAM_PREFIX": prefix.upper(),
        "CARESYNC_LOG__LEVEL": "warning",
    }
    for system in SYSTEMS:
        env[f"CARESYNC_DOWNSTREAM__{system.upper()}__SUBJECT_PREFIX"] = sim_prefix
        env[f"CARESYNC_DOWNSTREAM__{system.upper()}__BACKOFF_MAX_MS"] = str(backoff_max_ms)
    env |= dict(settings or {})
    cfg = load_config(None, environ=env)
    return Deployment(url, prefix, sim_prefix, data_dir, env, cfg)


class RouterProcess:
    """``caresync up --nats URL`` of a deployment, as a child process."""

    def __init__(self, dep: Deployment) -> None:
        self._dep = dep
        self._process: Process | None = None
        self.starts = 0

    async def start(self, nc: NatsClient) -> None:
        """Start and wait until its health says ready."""
        dep = self._dep
        self._process = await fo.start_router(dep.url, dep.data_dir, dep.env)
        self.starts += 1
        try:
            await fo.wait_ready(nc, dep.subjects, self._process, dep.log_path)
        except fo.BenchError as exc:
            raise SoakError(str(exc)) from None

    def check_alive(self) -> None:
        """Raise SoakError if the router has exited."""
        if self._process is not None and self._process.returncode is not None:
            raise SoakError(
                f"the router exited with {self._process.returncode}:\n"
                f"{fo.log_tail(self._dep.log_path)}"
            )

    async def kill(self) -> None:
        """SIGKILL, and reap (even when cancelled)."""
        process, self._process = self._process, None
        if process is not None:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGKILL)
                await process.wait()
                await process.aclose()

    async def stop(self) -> int:
        """SIGTERM, wait for the drain (SIGKILL after 30 s, and when cancelled); its exit
        status, 0 for a clean stop."""
        process, self._process = self._process, None
        if process is None:
            return 0
        with anyio.CancelScope(shield=True):
            status = await fo.stop_router(process, timeout_s=30.0)
        return status  # noqa: RET504 - returned inside the scope, mypy sees a missing return


async def sim_control(nc: NatsClient, dep: Deployment, op: str, **body: Any) -> dict[str, Any]:
    """One control request to the simulators (what ``caresync sim <op>`` sends)."""
    reply = await nc.request(f"{dep.sim_prefix}.control.{op}", orjson.dumps(body), timeout=10.0)
    answer: dict[str, Any] = orjson.loads(reply.data)
    if "error" in answer:
        raise SoakError(f"simulators refused {op}: {answer['error']}")
    return answer


def workload(dep: Deployment, appointments: int, *, seed: int, prefix: str) -> Workload:
    """The bench workflow mix: book, sometimes reschedule, then cancel or complete with supply
    lines; appointment ids ``<prefix>appt-<i>``."""
    return build_workflow(appointments, seed=seed, prefix=prefix, subjects=dep.subjects)


async def poll(
    done: Callable[[], bool] | Callable[[], Awaitable[bool]],
    alive: Callable[[], None],
    *,
    deadline_s: float,
    what: str,
) -> None:
    """Until ``done()`` holds (checking that the router lives); SoakError after the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        alive()
        try:
            result = done()
            ok = await result if not isinstance(result, bool) else result
        except sqlite3.Error:
            ok = False  # the router is creating or migrating its store
        if ok:
            return
        if time.monotonic() > deadline:
            raise SoakError(f"timed out after {deadline_s:g} s waiting for {what}")
        await anyio.sleep(POLL_S)
