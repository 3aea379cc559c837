"""The JetStream transport: continuous pull consumers and publishes with PubAcks.

``fetch()`` is not used: nats-py makes an asyncio task per message inside it and tops out at
20-40k msgs/s.  The consumer here keeps about two batches of pull requests outstanding on the
JetStream API directly and reads the replies from one inbox subscription.  That subscription
uses nats-py's ``cb=`` only to append to our own buffer, a callback that cannot fail, because
iterating ``sub.messages`` also costs a task per message.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence

import anyio
import nats
import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from caresync.router.pubacks import PubAcks
from caresync.router.transport import Inbound, Publishable, PublishResult, PublishStatus

log = structlog.get_logger("caresync.jetstream")

_NO_RESPONDERS = "503"
_API_RETRY_INITIAL_S = 0.1
_API_RETRY_MAX_S = 2.0
_API_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
)
"""JetStream API failures that pass once the server (or its meta leader) is back."""


async def connect(url: str, *, name: str, connect_timeout_s: float) -> NatsClient:
    """Connect with endless reconnects; connection events are logged, never swallowed."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", error=str(exc) or type(exc).__name__)

    client: list[NatsClient] = []

    async def on_disconnect() -> None:
        # nats-py calls this on our own close() too: only an unexpected loss is a warning.
        if client and client[0].is_closed:
            log.info("nats_closed", url=url)
        else:
            log.warning("nats_disconnected", url=url)

    async def on_reconnect() -> None:
        log.info("nats_reconnected", url=url)

    # A cluster is given as "nats://a:4222,nats://b:4222": nats-py wants a list.
    servers = [u.strip() for u in url.split(",") if u.strip()]
    nc = await nats.connect(
        servers,
        name=name,
        connect_timeout=connect_timeout_s,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        pending_size=8 * 1024 * 1024,
    )
    client.append(nc)
    return nc


def _position(reply: str) -> tuple[int, int]:
    """(stream sequence, stream timestamp in ns) of a delivered message, from its ack subject:
    $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending> (9 tokens), or
    $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>... (12+ tokens).  The
    timestamp is 0 if it is not there."""
    tokens = reply.split(".")
    at = 5 if len(tokens) == 9 else 7
    try:
        timestamp_ns = int(tokens[at + 2])
    except (IndexError, ValueError):
        timestamp_ns = 0
    return int(tokens[at]), timestamp_ns


class JetStreamConsumer:
    """A continuous pull consumer on one stream (see the module docstring)."""

    def __init__(
        self,
        nc: NatsClient,
        stream: str,
        consumer: str,
        *,
        batch: int,
        expires_s: float,
        ack: bool = True,
    ) -> None:
        self._nc = nc
        self._stream = stream
        self._consumer = consumer
        self._batch = batch
        self._expires_s = expires_s
        self._ack = ack
        self._inbox = nc.new_inbox()
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._buf: deque[Msg] = deque()
        self._wake = asyncio.Event()
        self._sub: Subscription | None = None
        self._outstanding = 0
        self._last_activity = 0.0

    @property
    def stream(self) -> str:
        """Name of the stream read."""
        return self._stream

    async def start(self) -> None:
        """Subscribe to the reply inbox (no request is sent until the first batch is asked)."""

        async def on_msg(msg: Msg) -> None:
            self._buf.append(msg)
            self._wake.set()

        self._sub = await self._nc.subscribe(
            self._inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    async def _request(self, count: int) -> None:
        body = orjson.dumps({"batch": count, "expires": int(self._expires_s * 1e9)})
        await self._nc.publish(self._next_subject, body, reply=self._inbox)
        self._outstanding += count
        self._last_activity = time.monotonic()

    async def _top_up(self) -> None:
        # Requests that neither delivered nor expired within their lifetime were lost
        # (reconnect, consumer leader change): forget them and ask again.
        if self._outstanding and time.monotonic() - self._last_activity > self._expires_s + 2.0:
            self._outstanding = 0
        if self._outstanding <= self._batch and not self._nc.is_closed:
            await self._request(self._batch)

    async def next_batch(self, max_messages: int, timeout_s: float) -> list[Inbound]:
        """Up to ``max_messages`` messages; empty if none arrived within ``timeout_s``."""
        out: list[Inbound] = []
        deadline = time.monotonic() + timeout_s
        while not out:
            await self._top_up()
            if not self._buf:
                self._wake.clear()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                with anyio.move_on_after(min(remaining, self._expires_s)):
                    await self._wake.wait()
            while self._buf and len(out) < max_messages:
                self._take(self._buf.popleft(), out)
        return out

    def _take(self, msg: Msg, out: list[Inbound]) -> None:
        self._last_activity = time.monotonic()
        headers = msg.headers
        if headers and api.Header.STATUS in headers and not msg.data:
            self._on_status(headers)
            return
        self._outstanding = max(0, self._outstanding - 1)
        seq, timestamp_ns = _position(msg.reply)
        out.append(
            Inbound(msg.subject, msg.data, headers, self._stream, seq, msg.reply, timestamp_ns)
        )

    def _on_status(self, headers: dict[str, str]) -> None:
        status = headers.get(api.Header.STATUS, "")
        if status == "408":  # request expired: the server tells how many it did not deliver
            left = int(headers.get("Nats-Pending-Messages", "0") or 0)
            self._outstanding = max(0, self._outstanding - left)
        elif status in ("404", "409"):
            # 409: consumer deleted, leadership change, too many waiting requests...
            if status == "409":
                log.info(
                    "pull_request_ended", stream=self._stream, reason=headers.get("Description")
                )
            self._outstanding = 0
        # 100 (idle heartbeat) needs nothing.

    async def ack_through(self, message: Inbound) -> None:
        """Ack the message; with AckPolicy.ALL that acks every earlier one too."""
        if self._ack and message.reply and not self._nc.is_closed:
            await self._nc.publish(message.reply, b"")

    async def close(self) -> None:
        """Unsubscribe; outstanding requests expire on the server by themselves."""
        if self._sub is not None and not self._nc.is_closed:
            try:
                await self._sub.unsubscribe()
            except nats.errors.ConnectionClosedError:
                pass
        self._sub = None


class JetStreamTransport:
    """The :class:`~caresync.router.transport.Transport` over one NATS connection."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        batch: int = 500,
        expires_s: float = 1.0,
        ack_wait_s: float = 60.0,
        max_ack_pending: int = 10_000,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self._pubacks = PubAcks(nc)
        self._batch = batch
        self._expires_s = expires_s
        self._ack_wait_s = ack_wait_s
        self._max_ack_pending = max_ack_pending

    async def open_consumer(self, stream: str, name: str, start_seq: int) -> JetStreamConsumer:
        """(Re)create the durable ``name`` at ``start_seq`` and start reading.

        The store, not the server, knows what was applied: the consumer is recreated at the
        store's offset on every start, so that nothing applied is read twice and nothing is
        read out of order after a crash.
        """
        try:
            await self.js.delete_consumer(stream, name)
        except nats.js.errors.NotFoundError:
            pass
        config = api.ConsumerConfig(
            durable_name=name,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE
            if start_seq > 1
            else api.DeliverPolicy.ALL,
            opt_start_seq=start_seq if start_seq > 1 else None,
            ack_policy=api.AckPolicy.ALL,
            ack_wait=self._ack_wait_s,
            max_deliver=-1,
            max_ack_pending=self._max_ack_pending,
            max_waiting=512,
        )
        await self.js.add_consumer(stream, config=config)
        consumer = JetStreamConsumer(
            self.nc, stream, name, batch=self._batch, expires_s=self._expires_s
        )
        await consumer.start()
        return consumer

    async def open_reader(
        self, stream: str, start_seq: int, *, headers_only: bool = False
    ) -> JetStreamConsumer:
        """An ephemeral, unacknowledged pull consumer from ``start_seq`` (for replays)."""
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE
            if start_seq > 1
            else api.DeliverPolicy.ALL,
            opt_start_seq=start_seq if start_seq > 1 else None,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
            headers_only=headers_only or None,
        )
        info = await self.js.add_consumer(stream, config=config)
        reader = JetStreamConsumer(
            self.nc, stream, info.name, batch=self._batch, expires_s=self._expires_s, ack=False
        )
        await reader.start()
        return reader

    async def last_seq(self, stream: str) -> int:
        """The stream's last sequence now.

        No answer in time, or a 503 (the server restarting, a leader election), is asked
        again with back-off for as long as the connection lives: the router asks before every
        batch, and a request lost with a server must not stop it.  Other errors, and any error
        once the connection is closed, are raised.
        """
        return int((await self._state(stream)).last_seq)

    async def first_seq(self, stream: str) -> int:
        """The first sequence the stream still holds (asked as :meth:`last_seq` is)."""
        return int((await self._state(stream)).first_seq)

    async def _state(self, stream: str) -> api.StreamState:
        delay_s = _API_RETRY_INITIAL_S
        while True:
            try:
                info = await self.js.stream_info(stream)
                return info.state
            except _API_TRANSIENT as exc:
                if self.nc.is_closed:
                    raise
                log.warning(
                    "jetstream_api_retry", stream=stream, error=_describe(exc), retry_in_s=delay_s
                )
            await anyio.sleep(delay_s)
            delay_s = min(delay_s * 2, _API_RETRY_MAX_S)

    @property
    def in_flight(self) -> int:
        """Publishes whose PubAck has not come (nor been given up on) yet."""
        return self._pubacks.in_flight

    async def publish(
        self, messages: Sequence[Publishable], timeout_s: float
    ) -> list[PublishResult]:
        """Publish every message, then wait for the PubAcks up to ``timeout_s``.

        After a disconnect a PubAck never comes, hence the deadline; what did not resolve in
        time is RETRY and is sent again with the same Msg-Id.
        """
        batch = await self._pubacks.publish(messages)
        if batch.remaining:
            with anyio.move_on_after(timeout_s):
                await batch.done.wait()
            if batch.remaining:
                self._pubacks.forget(batch)
        return [_result(m.key, reply) for m, reply in zip(messages, batch.replies, strict=True)]


def _result(key: str, reply: Msg | BaseException | None) -> PublishResult:
    """What a PubAck (or the failure to send, or no reply) says of one publish."""
    if reply is None:
        return PublishResult(key, PublishStatus.RETRY, "no PubAck in time")
    if isinstance(reply, nats.errors.MaxPayloadError | nats.errors.BadSubjectError):
        return PublishResult(key, PublishStatus.FAILED, _describe(reply))
    if isinstance(reply, BaseException):
        return PublishResult(key, PublishStatus.RETRY, _describe(reply))
    if reply.headers and reply.headers.get(api.Header.STATUS) == _NO_RESPONDERS:
        # 503 "no responders": no stream answered, transient during a leader election.
        return PublishResult(key, PublishStatus.RETRY, "no response from stream")
    try:
        ack = orjson.loads(reply.data)
    except orjson.JSONDecodeError as exc:
        return PublishResult(key, PublishStatus.RETRY, f"unreadable PubAck: {exc}")
    if not isinstance(ack, dict):
        return PublishResult(key, PublishStatus.RETRY, "unreadable PubAck: not an object")
    error = ack.get("error")
    if error is not None:
        # 503 (unavailable) and 408 (timed out) pass once the server is back: sent again.
        # Anything else (too big, wrong expectation...) will fail the same way: given up.
        details = error if isinstance(error, dict) else {"description": str(error)}
        code = details.get("code")
        status = PublishStatus.RETRY if code in (503, 408) else PublishStatus.FAILED
        text = f"{details.get('description', 'error')} (code {code}, {details.get('err_code')})"
        return PublishResult(key, status, text)
    status = PublishStatus.DUPLICATE if ack.get("duplicate") else PublishStatus.STORED
    return PublishResult(key, status, stream=ack.get("stream", ""), seq=ack.get("seq", 0))


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
