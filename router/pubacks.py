"""Publishing to JetStream with a PubAck per message, matched on one wildcard inbox.

nats-py's ``publish_async`` does the same, plus, per message, an ``asyncio.wait_for`` around a
semaphore (which in Python 3.11 runs the acquire as a task of its own), a random token from
``secrets`` and a stdlib JSON parse of the reply: profiled under ``bench fanout``, ~10 % of the
router's main thread.  Here a message costs a counter, a future and the publish itself; the
caller bounds what is in flight (:class:`caresync.router.publisher.Publisher`) and gives up on
a future after its own deadline (:meth:`PubAcks.forget`): after a disconnect no reply comes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.js.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

_NO_RESPONDERS = "503"


class PubAcks:
    """One inbox subscription for the PubAcks of everything published through it."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = ""
        self._sub: Subscription | None = None
        self._waiting: dict[str, asyncio.Future[api.PubAck]] = {}
        self._next = 0

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, Any]
    ) -> tuple[str, asyncio.Future[api.PubAck]]:
        """Publish; the reply token and the future of its PubAck (or of the error)."""
        if self._sub is None:
            self._prefix = self._nc.new_inbox() + "."
            self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[api.PubAck] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        except BaseException:
            del self._waiting[token]
            raise
        return token, future

    def forget(self, token: str) -> None:
        """Stop waiting for a reply (its deadline passed)."""
        future = self._waiting.pop(token, None)
        if future is not None:
            future.cancel()

    @property
    def in_flight(self) -> int:
        """Publishes whose PubAck has not come yet."""
        return len(self._waiting)

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get(api.Header.STATUS) == _NO_RESPONDERS:
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            resp = orjson.loads(msg.data)
        except orjson.JSONDecodeError as exc:
            future.set_exception(exc)
            return
        if "error" in resp:
            try:  # it raises the error's class (ServiceUnavailableError for a 503, ...)
                nats.js.errors.APIError.from_error(resp["error"])
            except nats.js.errors.APIError as exc:
                future.set_exception(exc)
            return
        future.set_result(api.PubAck.from_response(resp))
