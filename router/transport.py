"""The seam between the runtime and the broker: what the pipeline needs, nothing more.

The JetStream implementation (``jetstream.py``) runs in production and in integration tests;
the in-memory one (``memory_transport.py``) serves unit tests of the runtime and simulations.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Protocol

import msgspec


class Inbound(msgspec.Struct, frozen=True, gc=False):
    """One message read from an input stream."""

    subject: str
    data: bytes
    headers: dict[str, str] | None
    stream: str
    seq: int
    reply: str = ""
    """Ack subject (JetStream); empty when the transport needs none."""
    timestamp_ns: int = 0
    """When the stream stored it, in nanoseconds since the epoch (0 if unknown)."""
    local_n: int = 0
    """For an internal command applied with its cause (``router/local_fanout.py``): it was the
    n-th applied after the message at ``seq``, which it stands for; 0 for a message as read."""


class Outbound(msgspec.Struct, frozen=True, gc=False):
    """One message to publish with ``Nats-Msg-Id`` = ``key`` and wait for its PubAck."""

    key: str
    subject: str
    payload: bytes
    headers: dict[str, str] | None = None


class Publishable(Protocol):
    """A message to publish with ``Nats-Msg-Id`` = ``key`` (an outbox row, an ``Outbound``)."""

    @property
    def key(self) -> str: ...

    @property
    def subject(self) -> str: ...

    @property
    def payload(self) -> bytes: ...

    @property
    def headers(self) -> dict[str, str] | None: ...


class PublishStatus(Enum):
    """What became of one publish."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    """The stream already had this Msg-Id: the effect was sent before."""
    RETRY = "retry"
    """Transient failure (timeout, disconnect, leader election): send again, same Msg-Id."""
    FAILED = "failed"
    """No stream stores the subject, or the server refused it for good."""


class PublishResult(msgspec.Struct, frozen=True, gc=False):
    """Outcome of one publish."""

    key: str
    status: PublishStatus
    error: str = ""
    stream: str = ""
    """The stream that stored it (or had stored it, for a duplicate); empty if unknown."""
    seq: int = 0
    """Its sequence in that stream (the first one's, for a duplicate); 0 if unknown."""


class InputConsumer(Protocol):
    """Reads one partition's input stream in sequence order."""

    @property
    def stream(self) -> str:
        """Name of the stream read."""
        ...

    async def next_batch(self, max_messages: int, timeout_s: float) -> list[Inbound]:
        """Up to ``max_messages`` messages; an empty list if none came within ``timeout_s``."""
        ...

    async def ack_through(self, message: Inbound) -> None:
        """Acknowledge ``message`` and every earlier one of this consumer."""
        ...

    async def close(self) -> None:
        """Stop reading; pending pull requests are abandoned."""
        ...


class Transport(Protocol):
    """Opens consumers and publishes with PubAcks."""

    async def open_consumer(self, stream: str, name: str, start_seq: int) -> InputConsumer:
        """A consumer named ``name`` delivering ``stream`` from ``start_seq`` on."""
        ...

    async def open_reader(
        self, stream: str, start_seq: int, *, headers_only: bool = False
    ) -> InputConsumer:
        """A throw-away reader for replays: no acks, no durable state on the server."""
        ...

    async def last_seq(self, stream: str) -> int:
        """The stream's last sequence number now (0 if empty)."""
        ...

    async def first_seq(self, stream: str) -> int:
        """The first sequence the stream still holds (above 1 once limits or a purge removed
        its oldest messages)."""
        ...

    async def publish(
        self, messages: Sequence[Publishable], timeout_s: float
    ) -> list[PublishResult]:
        """Publish all, wait for their PubAcks up to ``timeout_s``; one result per message."""
        ...
