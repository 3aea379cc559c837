"""Reaching a downstream system over HTTP: ``POST <url>/<operation>`` with httpx.

Status codes map to outcomes: 2xx is success (``outcome`` from the JSON reply, ``created``
when the body says nothing), 409 with ``"outcome": "duplicate"`` is a duplicate, the statuses
in ``transient_http_statuses`` (default 408, 425, 429, 500, 502, 503, 504) are transient
(honouring ``Retry-After`` in seconds), any other status is permanent.  Connection errors are
transient; timeouts too unless ``retry_on_timeout`` is false.  ``transport`` is httpx's seam:
tests may pass ``httpx.MockTransport``.
"""

from __future__ import annotations

import httpx

from caresync.config.schema import ConnectorConfig
from caresync.connectors.downstream import (
    IDEMPOTENCY_HEADER,
    Delivery,
    decode_reply,
    interpret_reply,
    split_header,
)
from caresync.connectors.errors import ConnectorSetupError, PermanentError, TransientError


class HttpDownstream:
    """A :class:`~caresync.connectors.downstream.Downstream` over HTTP (one pooled client)."""

    def __init__(
        self,
        system: str,
        cfg: ConnectorConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not cfg.url:
            raise ConnectorSetupError(f"downstream.{system}.url is empty: no HTTP endpoint")
        headers = {"Content-Type": "application/json", "User-Agent": "caresync-connector"}
        auth = split_header(cfg.auth_header)
        if auth is not None:
            headers[auth[0]] = auth[1]
        self._transient = frozenset(cfg.transient_http_statuses)
        self._retry_on_timeout = cfg.retry_on_timeout
        self._client = httpx.AsyncClient(
            base_url=cfg.url.rstrip("/") + "/",
            headers=headers,
            timeout=cfg.timeout_s,
            transport=transport,
        )

    async def call(self, operation: str, idempotency_key: str, body: bytes) -> Delivery:
        """POST and interpret the response (see the Downstream protocol)."""
        what = f"POST {operation}"
        try:
            response = await self._client.post(
                operation, content=body, headers={IDEMPOTENCY_HEADER: idempotency_key}
            )
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise PermanentError(f"{what}: {exc}") from exc
        except httpx.TimeoutException as exc:
            error = TransientError if self._retry_on_timeout else PermanentError
            raise error(f"{what}: timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise TransientError(f"{what}: {str(exc) or type(exc).__name__}") from exc
        return _interpret(what, response, self._transient)

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        await self._client.aclose()


def _interpret(what: str, response: httpx.Response, transient: frozenset[int]) -> Delivery:
    status = response.status_code
    what = f"{what}: HTTP {status}"
    reply = decode_reply(response.content)
    if response.is_success:
        if reply is None:
            return Delivery("created")
        if reply.error or reply.outcome:
            return interpret_reply(reply, what)
        return Delivery("created", str(reply.reference))
    if status == 409 and reply is not None and reply.outcome == "duplicate":
        return Delivery("duplicate", str(reply.reference))
    detail = reply.error if reply is not None and reply.error else response.text[:200]
    message = f"{what} {detail}".rstrip()
    if status in transient:
        raise TransientError(message, retry_after_s=_retry_after_s(response))
    raise PermanentError(message)


def _retry_after_s(response: httpx.Response) -> float | None:
    # Only the delta-seconds form: an HTTP date would need the server's clock to mean much.
    value = response.headers.get("Retry-After", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
