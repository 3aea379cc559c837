"""Reaching a downstream system by NATS request/reply on ``<subject_prefix>.<system>.<operation>``.

No responders means the system is down: nats-server says so at once, and it is retried like a
timeout.  The request goes over the router's own connection.
"""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client as NatsClient

from caresync.config.schema import ConnectorConfig
from caresync.connectors.downstream import (
    IDEMPOTENCY_HEADER,
    Delivery,
    decode_reply,
    interpret_reply,
)
from caresync.connectors.errors import PermanentError, TransientError


class NatsDownstream:
    """A :class:`~caresync.connectors.downstream.Downstream` over NATS request/reply."""

    def __init__(self, nc: NatsClient, system: str, cfg: ConnectorConfig) -> None:
        self._nc = nc
        self._prefix = f"{cfg.subject_prefix}.{system}"
        self._timeout_s = cfg.timeout_s
        self._retry_on_timeout = cfg.retry_on_timeout

    def subject(self, operation: str) -> str:
        """Where a call of ``operation`` is sent."""
        return f"{self._prefix}.{operation}"

    async def call(self, operation: str, idempotency_key: str, body: bytes) -> Delivery:
        """Request and interpret the reply (see the Downstream protocol)."""
        subject = self.subject(operation)
        try:
            # A fresh dict each time: nats-py mutates the headers it is given.
            msg = await self._nc.request(
                subject,
                body,
                timeout=self._timeout_s,
                headers={IDEMPOTENCY_HEADER: idempotency_key},
            )
        except nats.errors.NoRespondersError as exc:
            raise TransientError(f"{subject}: no responders (the system is down)") from exc
        except nats.errors.TimeoutError as exc:
            error = TransientError if self._retry_on_timeout else PermanentError
            raise error(f"{subject}: no reply within {self._timeout_s} s") from exc
        except nats.errors.Error as exc:
            raise TransientError(f"{subject}: {str(exc) or type(exc).__name__}") from exc
        reply = decode_reply(msg.data)
        if reply is None:
            raise PermanentError(
                f"{subject}: reply is not JSON of the contract: {msg.data[:200]!r}"
            )
        return interpret_reply(reply, subject)

    async def aclose(self) -> None:
        """Nothing to release: the connection belongs to the caller."""
