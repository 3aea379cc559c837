"""The data directory: where the store, the embedded broker's files and ``server.json`` live."""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson

DEFAULT_DATA_DIR = ".caresync"
SERVER_FILE = "server.json"
LOCK_FILE = "router.lock"
CONFIG_FILE = "caresync.toml"


class DataDirError(Exception):
    """Raised when the data directory is locked by another process or holds no server record."""


def resolve_data_dir(flag: str | None, environ: dict[str, str] | None = None) -> Path:
    """``--data-dir``, else $CARESYNC_DATA_DIR, else ``./.caresync``."""
    env = os.environ if environ is None else environ
    return Path(flag or env.get("CARESYNC_DATA_DIR") or DEFAULT_DATA_DIR).absolute()


def resolve_config_path(flag: str | None, data_dir: Path) -> Path | None:
    """``--config``, else $CARESYNC_CONFIG, else ``DIR/caresync.toml`` if present, else none."""
    chosen = flag or os.environ.get("CARESYNC_CONFIG")
    if chosen:
        return Path(chosen)
    candidate = data_dir / CONFIG_FILE
    return candidate if candidate.is_file() else None


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """What ``caresync up`` records so other commands find the router."""

    url: str
    pid: int
    embedded: bool
    started_at: float


def write_server_record(data_dir: Path, url: str, *, embedded: bool) -> None:
    """Record where the router of this data dir listens (atomically)."""
    record = {"url": url, "pid": os.getpid(), "embedded": embedded, "started_at": time.time()}
    tmp = data_dir / (SERVER_FILE + ".tmp")
    tmp.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))
    tmp.replace(data_dir / SERVER_FILE)


def read_server_record(data_dir: Path) -> ServerRecord | None:
    """The record written by ``caresync up``, or None."""
    path = data_dir / SERVER_FILE
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except orjson.JSONDecodeError as exc:
        raise DataDirError(f"{path} is not valid JSON: {exc}") from exc
    return ServerRecord(
        url=str(raw["url"]),
        pid=int(raw["pid"]),
        embedded=bool(raw.get("embedded", False)),
        started_at=float(raw.get("started_at", 0.0)),
    )


def remove_server_record(data_dir: Path) -> None:
    """Forget the record (on a clean stop)."""
    (data_dir / SERVER_FILE).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DataDirLock:
    """An exclusive lock on a data dir: one router (or one rebuild) per store at a time."""

    def __init__(self, data_dir: Path, name: str = LOCK_FILE) -> None:
        self.path = data_dir / name
        self._file: IO[str] | None = None

    def is_held(self) -> bool:
        """Whether some process holds the lock now (taking it for an instant to find out)."""
        if not self.path.exists():
            return False
        with self.path.open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def acquire(self, what: str) -> None:
        """Take the lock or raise DataDirError saying who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise DataDirError(
                f"{self.path.parent} is in use by {holder}; stop it first"
                f" (one router per data dir; lock {self.path.name})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what} (pid {os.getpid()})")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Release the lock."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
