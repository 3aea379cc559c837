"""A router in several processes: the primary process starts, watches and stops the others.

With ``router.processes = P`` (and at least P partition streams), partition ``p`` runs in
process ``p % P``.  Process 0 is the one ``caresync up`` started: it provisions the streams,
recovers the outbox, runs its own partitions, raw ingest, the connectors, the control
requests, pruning and checkpointing.  It starts processes 1..P-1 as ``caresync
router-process --group K`` once its own router is ready; each runs only its partitions'
pipelines against the same SQLite store (WAL: one writer at a time, readers never blocked)
and answers control requests on its own subjects (:meth:`Subjects.group_control`), through
which process 0 merges their health into its own and forwards parked releases.

A process that exits on its own is started again after a backoff; its partitions wait,
their messages stay in JetStream.  Stopping sends each one SIGTERM (it drains like the
primary) and kills what is still running after the shutdown grace period.  Should process 0
die, the kernel sends the others SIGTERM (``PR_SET_PDEATHSIG``, set by the child itself).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import structlog
from anyio.abc import Process, TaskStatus
from nats.aio.client import Client as NatsClient

from caresync.codecs import Subjects

log = structlog.get_logger("caresync.processes")

READY_LINE = "router-process ready"
"""What a started process prints on stdout once its partitions run."""
HEALTH_TIMEOUT_S = 1.0
FORWARD_TIMEOUT_S = 30.0
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0


class RouterProcessError(Exception):
    """A router process could not be started."""


def caresync_command() -> list[str]:
    """How to run the ``caresync`` command of this interpreter's environment."""
    script = Path(sys.executable).parent / "caresync"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from caresync.cli import main; main()"]


def partitions_of(group: int, processes: int, partitions: int) -> list[int]:
    """The partitions process ``group`` runs: every ``p`` with ``p % processes == group``."""
    return [p for p in range(partitions) if p % processes == group]


def exit_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux); exit now if it already has."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        raise RouterProcessError(f"the router process {parent_pid} that started this one is gone")


@dataclass(slots=True)
class _Child:
    group: int
    process: Process | None = None
    ready: bool = False
    restarts: int = 0
    last_exit: int | None = None
    started: anyio.Event = field(default_factory=anyio.Event)


class ProcessGroup:
    """Processes 1..P-1 of a multi-process router, seen from process 0."""

    def __init__(
        self,
        nc: NatsClient,
        subjects: Subjects,
        *,
        processes: int,
        arguments: Sequence[str],
        ready_timeout_s: float = 30.0,
        shutdown_timeout_s: float = 8.0,
    ) -> None:
        """``arguments``: what follows ``caresync router-process --group K`` (the NATS URL,
        data dir and config file of process 0)."""
        self._nc = nc
        self._subjects = subjects
        self._arguments = list(arguments)
        self._ready_timeout_s = ready_timeout_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self.children = [_Child(group) for group in range(1, processes)]
        self._stopped = anyio.Event()
        self._stopping = anyio.Event()
        self._owner = {subjects.input_stream(p): p % processes for p in range(subjects.partitions)}

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every process and wait until each runs its partitions (else raise
        :class:`RouterProcessError`), then keep them running until :meth:`stop`."""
        try:
            async with anyio.create_task_group() as tg:
                for child in self.children:
                    await self._start(child, tg)
                for child in self.children:
                    with anyio.move_on_after(self._ready_timeout_s):
                        await child.started.wait()
                    if not child.ready:
                        raise RouterProcessError(
                            f"router process {child.group} was not ready within "
                            f"{self._ready_timeout_s:g} s (exit status {child.last_exit}); "
                            "its log is on this process's stderr"
                        )
                log.info("router_processes_ready", processes=len(self.children) + 1)
                task_status.started()
        except BaseException:
            # Failed to start, or cancelled: no process may outlive this one's control.
            self._stopping.set()
            with anyio.CancelScope(shield=True):
                await self._kill_all()
            raise
        finally:
            self._stopped.set()

    async def _kill_all(self) -> None:
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                log.error("router_process_killed", group=child.group, pid=child.process.pid)
                child.process.kill()
                await child.process.wait()

    async def _start(self, child: _Child, tg: anyio.abc.TaskGroup) -> None:
        command = [
            *caresync_command(),
            "router-process",
            "--group",
            str(child.group),
            "--parent-pid",
            str(os.getpid()),
            *self._arguments,
        ]
        child.started = anyio.Event()
        child.process = await anyio.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None
        )
        log.info("router_process_started", group=child.group, pid=child.process.pid)
        tg.start_soon(self._watch, child, tg)

    async def _watch(self, child: _Child, tg: anyio.abc.TaskGroup) -> None:
        """Read the process's stdout until it exits; start it again unless stopping."""
        process = child.process
        assert process is not None
        assert process.stdout is not None
        buffered = b""
        async for chunk in process.stdout:
            buffered += chunk
            if not child.ready and READY_LINE.encode() in buffered:
                child.ready = True
                child.started.set()
            buffered = buffered[-len(READY_LINE) :]
        child.last_exit = await process.wait()
        child.ready = False
        child.started.set()
        if self._stopping.is_set():
            return
        child.restarts += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(child.restarts - 1, 8))
        log.error(
            "router_process_exited",
            group=child.group,
            exit_status=child.last_exit,
            restart_in_s=delay,
            restarts=child.restarts,
        )
        with anyio.move_on_after(delay):
            await self._stopping.wait()
        if not self._stopping.is_set():
            await self._start(child, tg)

    def stop(self) -> None:
        """Ask every process to drain and stop (SIGTERM); :meth:`wait_stopped` waits."""
        self._stopping.set()
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                child.process.send_signal(signal.SIGTERM)

    async def wait_stopped(self) -> None:
        """Wait for every process to exit; kill what is still running after the grace."""
        with anyio.move_on_after(self._shutdown_timeout_s + 2.0):
            for child in self.children:
                if child.process is not None:
                    await child.process.wait()
        with anyio.CancelScope(shield=True):
            await self._kill_all()
        await self._stopped.wait()

    # -- control ---------------------------------------------------------------------------------
    def owner(self, stream: str) -> int:
        """The process that runs an input stream (0 if the stream is not known)."""
        return self._owner.get(stream, 0)

    async def request(self, group: int, op: str, body: bytes, timeout_s: float) -> dict[str, Any]:
        """One control request to process ``group``; an ``error`` reply if it does not answer."""
        try:
            reply = await self._nc.request(
                self._subjects.group_control(group, op), body, timeout=timeout_s
            )
        except Exception as exc:  # not running, restarting, or slow: say so, never raise
            return {"error": f"router process {group} did not answer {op}: {exc!r}"}
        data: dict[str, Any] = orjson.loads(reply.data)
        return data

    async def health(self, own: dict[str, Any]) -> dict[str, Any]:
        """Process 0's health merged with every other process's: all partitions, summed
        publisher counters, ready only if every process is."""
        merged = {**own, "partitions": list(own["partitions"]), "publisher": {**own["publisher"]}}
        processes = [{"group": 0, "pid": os.getpid(), "ready": own["ready"], "restarts": 0}]
        ready = bool(own["ready"])
        for child in self.children:
            reply = await self.request(child.group, "health", b"", HEALTH_TIMEOUT_S)
            child_ready = child.ready and bool(reply.get("ready"))
            ready = ready and child_ready
            merged["partitions"].extend(reply.get("partitions", ()))
            for key, value in reply.get("publisher", {}).items():
                merged["publisher"][key] = merged["publisher"].get(key, 0) + value
            processes.append(
                {
                    "group": child.group,
                    "pid": child.process.pid if child.process is not None else None,
                    "ready": child_ready,
                    "restarts": child.restarts,
                    **({"error": reply["error"]} if "error" in reply else {}),
                }
            )
        merged["partitions"].sort(key=lambda p: str(p.get("stream", "")))
        merged["ready"] = ready
        merged["processes"] = processes
        return merged
