"""An in-memory transport with JetStream's semantics that matter to the runtime.

Streams capture subjects by NATS wildcard patterns, number messages from 1, drop a publish
whose Msg-Id the stream has already stored, and consumers read in order from a start
sequence.  For unit tests of the runtime and for deterministic simulations only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from caresync.codecs import Subjects
from caresync.router.provision import stream_specs
from caresync.router.transport import Inbound, Publishable, PublishResult, PublishStatus


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: ``*`` is one token, a trailing ``>`` is one or more tokens."""
    p_tokens = pattern.split(".")
    s_tokens = subject.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (p != "*" and p != s_tokens[i]):
            return False
    return len(p_tokens) == len(s_tokens)


@dataclass
class MemoryStream:
    """One stream: its subjects, messages and the Msg-Ids it has seen."""

    name: str
    subjects: list[str]
    messages: list[Inbound] = field(default_factory=list)
    msg_ids: dict[str, int] = field(default_factory=dict)
    acked_through: dict[str, int] = field(default_factory=dict)


class MemoryTransport:
    """All streams live in this object; ``fail_publish`` injects transient failures."""

    def __init__(self) -> None:
        self.streams: dict[str, MemoryStream] = {}
        self._arrived = anyio.Event()
        self.fail_publish = 0
        """Number of upcoming publishes to answer with RETRY (fault injection)."""

    def add_stream(self, name: str, subjects: Sequence[str]) -> MemoryStream:
        """Create a stream capturing ``subjects``."""
        stream = MemoryStream(name, list(subjects))
        self.streams[name] = stream
        return stream

    def provision(self, subjects: Subjects) -> None:
        """Create every stream a deployment with these subjects has (as ``provision()``)."""
        for spec in stream_specs(subjects):
            self.add_stream(spec.name, spec.subjects)

    def append(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> PublishStatus:
        """Store a message in the stream capturing ``subject`` (synchronous publish)."""
        return self.store(subject, data, headers)[0]

    def store(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> tuple[PublishStatus, str, int]:
        """Like :meth:`append`, also saying which stream stored it at which sequence."""
        for stream in self.streams.values():
            if any(subject_matches(p, subject) for p in stream.subjects):
                msg_id = (headers or {}).get("Nats-Msg-Id")
                seq = len(stream.messages) + 1
                if msg_id is not None:
                    if msg_id in stream.msg_ids:
                        return PublishStatus.DUPLICATE, stream.name, stream.msg_ids[msg_id]
                    stream.msg_ids[msg_id] = seq
                stream.messages.append(
                    Inbound(
                        subject,
                        data,
                        dict(headers) if headers else None,
                        stream.name,
                        seq,
                        timestamp_ns=time.time_ns(),
                    )
                )
                self._arrived.set()
                self._arrived = anyio.Event()
                return PublishStatus.STORED, stream.name, seq
        return PublishStatus.FAILED, "", 0

    async def wait_arrival(self) -> None:
        """Wait until any stream receives a message."""
        await self._arrived.wait()

    # -- Transport protocol -------------------------------------------------------------------
    async def open_consumer(self, stream: str, name: str, start_seq: int) -> MemoryConsumer:
        """A consumer reading ``stream`` from ``start_seq``."""
        return MemoryConsumer(self, self.streams[stream], name, start_seq)

    async def open_reader(
        self, stream: str, start_seq: int, *, headers_only: bool = False
    ) -> MemoryConsumer:
        """A reader for replays (``headers_only`` changes nothing here)."""
        return MemoryConsumer(self, self.streams[stream], "", start_seq)

    async def last_seq(self, stream: str) -> int:
        """Last sequence of ``stream``."""
        return len(self.streams[stream].messages)

    async def first_seq(self, stream: str) -> int:
        """First sequence of ``stream`` (nothing is ever removed here)."""
        return 1 if stream in self.streams else 0

    async def publish(
        self, messages: Sequence[Publishable], timeout_s: float
    ) -> list[PublishResult]:
        """Store each message, honouring Msg-Id dedupe and injected failures."""
        results = []
        for m in messages:
            if self.fail_publish > 0:
                self.fail_publish -= 1
                results.append(PublishResult(m.key, PublishStatus.RETRY, "injected failure"))
                continue
            headers = {**(m.headers or {}), "Nats-Msg-Id": m.key}
            status, stream, seq = self.store(m.subject, m.payload, headers)
            error = "" if status is not PublishStatus.FAILED else f"no stream for {m.subject}"
            results.append(PublishResult(m.key, status, error, stream=stream, seq=seq))
        await anyio.lowlevel.checkpoint()
        return results


class MemoryConsumer:
    """Reads a :class:`MemoryStream` in order."""

    def __init__(self, transport: MemoryTransport, stream: MemoryStream, name: str, start: int):
        self._transport = transport
        self._stream = stream
        self._name = name
        self._next = max(start, 1)

    @property
    def stream(self) -> str:
        """Name of the stream read."""
        return self._stream.name

    async def next_batch(self, max_messages: int, timeout_s: float) -> list[Inbound]:
        """Up to ``max_messages`` messages, waiting up to ``timeout_s`` for the first."""
        with anyio.move_on_after(timeout_s):
            while len(self._stream.messages) < self._next:
                await self._transport.wait_arrival()
        batch = self._stream.messages[self._next - 1 : self._next - 1 + max_messages]
        self._next += len(batch)
        await anyio.lowlevel.checkpoint()
        return batch

    async def ack_through(self, message: Inbound) -> None:
        """Record the ack floor."""
        self._stream.acked_through[self._name] = message.seq

    async def close(self) -> None:
        """Nothing to release."""
