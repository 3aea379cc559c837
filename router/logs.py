"""Logging: structlog JSON lines (rendered with orjson), configured once at start-up.

Per-message context (entity, command id, correlation id) is bound with contextvars by the
actor handling the message, so every line it logs carries them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Stderr:
    """Whatever ``sys.stderr`` is at each write (tests swap it and close the old one): a
    logger configured once must never hold on to a stream that went away."""

    def write(self, data: bytes | str) -> int:
        if isinstance(data, bytes):
            return sys.stderr.buffer.write(data)
        return sys.stderr.write(data)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(
    level: Literal["debug", "info", "warning", "error"] = "info",
    fmt: Literal["json", "console"] = "json",
) -> None:
    """Configure structlog for the process: JSON lines (or console text) on stderr."""
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    logger_factory: Any
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        logger_factory = structlog.BytesLoggerFactory(_Stderr())  # type: ignore[arg-type]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
        logger_factory = structlog.PrintLoggerFactory(_Stderr())  # type: ignore[arg-type]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
