"""Publishing to JetStream with a PubAck per message, matched on one wildcard inbox.

nats-py's ``publish_async`` does the same, plus, per message, an ``asyncio.wait_for`` around a
semaphore (which in Python 3.11 runs the acquire as a task of its own), a random token from
``secrets`` and a stdlib JSON parse of the reply: profiled under ``bench fanout``, ~10 % of the
router's main thread.  Here a whole list of messages is one :class:`AckBatch`: per message a
counter, a slot and the publish itself, and one event for the batch, set when the last reply
comes.  The caller bounds what is in flight (:class:`caresync.router.publisher.Publisher`) and
gives up after its own deadline (:meth:`PubAcks.forget`): after a disconnect no reply comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from caresync.router.transport import Publishable

MSG_ID = "Nats-Msg-Id"

SEND_ERRORS = (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError)
"""What a publish raises at once when the connection cannot take it now (sent again later)."""


class AckBatch:
    """The replies to a list of publishes, slot by slot: the reply ``Msg``, the exception the
    publish raised, or None while nothing came."""

    __slots__ = ("done", "remaining", "replies", "tokens")

    def __init__(self, n: int) -> None:
        self.replies: list[Msg | BaseException | None] = [None] * n
        self.tokens: list[str] = [""] * n
        self.remaining = n
        self.done = asyncio.Event()

    def _settle(self, i: int, reply: Msg | BaseException) -> None:
        self.replies[i] = reply
        self.remaining -= 1
        if not self.remaining:
            self.done.set()


class PubAcks:
    """One inbox subscription for the PubAcks of everything published through it."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = ""
        self._sub: Subscription | None = None
        self._waiting: dict[str, tuple[AckBatch, int]] = {}
        self._next = 0

    async def publish(self, messages: Sequence[Publishable]) -> AckBatch:
        """Publish every message with its Msg-Id; the batch its replies land in."""
        batch = AckBatch(len(messages))
        if self._sub is None:
            try:
                prefix = self._nc.new_inbox() + "."
                self._sub = await self._nc.subscribe(prefix + "*", cb=self._on_reply)
            except SEND_ERRORS as exc:
                for i in range(len(messages)):
                    batch._settle(i, exc)
                return batch
            self._prefix = prefix
        waiting, prefix, publish = self._waiting, self._prefix, self._nc.publish
        n = self._next
        for i, m in enumerate(messages):
            n += 1
            token = str(n)
            batch.tokens[i] = token
            waiting[token] = (batch, i)
            # nats-py mutates the headers dict it is given: always hand it a fresh one.
            extra = m.headers
            headers = {**extra, MSG_ID: m.key} if extra else {MSG_ID: m.key}
            try:
                await publish(m.subject, m.payload, reply=prefix + token, headers=headers)
            except SEND_ERRORS as exc:
                del waiting[token]
                batch._settle(i, exc)
            except BaseException:
                del waiting[token]
                raise
        self._next = n
        if not messages:
            batch.done.set()
        return batch

    def forget(self, batch: AckBatch) -> None:
        """Stop waiting for the replies still missing (their deadline passed)."""
        for token, reply in zip(batch.tokens, batch.replies, strict=True):
            if reply is None:
                self._waiting.pop(token, None)

    @property
    def in_flight(self) -> int:
        """Publishes whose PubAck has not come yet."""
        return len(self._waiting)

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if entry is not None:
            entry[0]._settle(entry[1], msg)
