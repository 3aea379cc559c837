"""What every command shares: loading the config, finding the router, talking to it."""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.errors
import orjson
from nats.aio.client import Client as NatsClient

from caresync.cli.datadir import (
    DataDirError,
    read_server_record,
    resolve_config_path,
    resolve_data_dir,
)
from caresync.config import Config, ConfigError, load_config


class CommandError(Exception):
    """Raised by a command to stop with a message and exit status 1."""


@dataclass(frozen=True, slots=True)
class Context:
    """The data dir and configuration a command runs with."""

    data_dir: Path
    config: Config
    config_path: Path | None


def load_context(data_dir_flag: str | None, config_flag: str | None) -> Context:
    """Resolve the data dir and load the configuration (ConfigError propagates)."""
    data_dir = resolve_data_dir(data_dir_flag)
    config_path = resolve_config_path(config_flag, data_dir)
    return Context(data_dir, load_config(config_path), config_path)


def resolve_url(ctx: Context, nats_flag: str | None) -> str:
    """``--nats``, else ``nats.url`` from the config, else the URL recorded by ``caresync up``."""
    if nats_flag:
        return nats_flag
    if ctx.config.nats.url:
        return ctx.config.nats.url
    try:
        record = read_server_record(ctx.data_dir)
    except DataDirError as exc:
        raise CommandError(str(exc)) from exc
    if record is None:
        raise CommandError(
            f"no router recorded in {ctx.data_dir} (no server.json): start one with "
            f"`caresync up --data-dir {ctx.data_dir}` or pass --nats URL"
        )
    return record.url


async def connect_client(url: str, timeout_s: float = 3.0) -> NatsClient:
    """A short-lived client connection; failure is a CommandError naming the URL."""

    async def quiet(_: Exception) -> None:
        return None

    try:
        # nats-py treats max_reconnect_attempts=0 as "keep trying": allow one, bounded in time.
        with anyio.fail_after(timeout_s * 2 + 1):
            return await nats.connect(
                url,
                connect_timeout=timeout_s,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=quiet,
                name="caresync-cli",
            )
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        raise CommandError(f"cannot reach NATS at {url}: {exc or type(exc).__name__}") from exc


async def request_json(nc: NatsClient, subject: str, body: Any, timeout_s: float) -> Any:
    """A JSON request/reply; no router answering is a CommandError that says so."""
    try:
        reply = await nc.request(subject, orjson.dumps(body), timeout=timeout_s)
    except nats.errors.NoRespondersError:
        raise CommandError(f"no router is serving {subject} on this NATS server") from None
    except nats.errors.TimeoutError:
        raise CommandError(f"no answer on {subject} within {timeout_s:g} s") from None
    return orjson.loads(reply.data)


def print_json(value: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.buffer.write(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def tune_gc() -> None:
    """Make the collector fit a router or a rebuild: many short-lived objects per batch, and
    long-lived entity states that only grow.

    A batch keeps a few thousand objects alive for its whole life, so with CPython's default
    thresholds (700, 10, 10) they get promoted and trigger full collections every fraction of
    a second that free nothing (measured: ~25% of the router's time, and most of its p99).
    A rebuild's fold is the same, over a heap of every entity it holds: ``replay rebuild
    --full`` of 200,200 messages took 35.7 s with the default thresholds, 30.9 s with these.
    Start-up objects are frozen out of the collector, and the young generation is larger.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


__all__ = [
    "CommandError",
    "ConfigError",
    "Context",
    "connect_client",
    "load_context",
    "print_json",
    "resolve_url",
    "tune_gc",
]
