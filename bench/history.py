"""A large history for ``bench replay`` and ``bench entities``: commands made in chunks of
keys, published with their command id as ``Nats-Msg-Id``, and the wait until the router has
applied everything its input streams hold.

The commands are :mod:`caresync.bench.workload`'s (book, reschedule..., complete or cancel),
without re-sends: every published command is a distinct source event.  A million of them do
not fit comfortably in the driver at once, so they are built and published ``keys_per_chunk``
appointment keys at a time (keys ``c<chunk>-appt-<i>``); per-key order holds because a key
lives in one chunk only.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import Process
from nats.js import JetStreamContext, api

from caresync.bench.deployment import say
from caresync.bench.fanout import BenchError
from caresync.bench.workload import build_workload
from caresync.codecs import Subjects

KEYS_PER_CHUNK = 10_000
PUBLISH_DEADLINE_S = 120.0
"""How long one chunk's PubAcks may take (``publish_async`` futures never time out)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """The commands of a few thousand keys, in send order: (subject, command id, data)."""

    messages: list[tuple[str, str, bytes]]
    keys: int
    kinds: Counter[str]


def command_chunks(
    n: int, m: int, *, seed: int, subjects: Subjects, keys_per_chunk: int = KEYS_PER_CHUNK
) -> Iterator[Chunk]:
    """``n`` commands over ``m`` appointment keys, ``keys_per_chunk`` keys at a time.

    Each chunk gets its share of ``n`` in proportion to its keys; with ``n == m`` every key
    gets exactly one command, its booking.
    """
    if n < 1 or m < 1:
        raise ValueError("n and m must be positive")
    for c, first in enumerate(range(0, m, keys_per_chunk)):
        keys = min(keys_per_chunk, m - first)
        count = n * (first + keys) // m - n * first // m
        if count == 0:
            continue
        w = build_workload(
            count, keys, dup_rate=0.0, seed=seed + c, prefix=f"c{c}-", subjects=subjects
        )
        yield Chunk(
            [(cmd.subject, cmd.command_id, cmd.data) for cmd in w.commands],
            w.keys,
            Counter(cmd.name for cmd in w.commands),
        )


def split_at(chunks: Iterator[Chunk], at: int) -> tuple[Iterator[Chunk], Iterator[Chunk]]:
    """The first ``at`` commands, and then the others (read the first iterator first).

    A chunk cut in two gives its key and kind counts to its first part: the sums stay true.
    """
    rest: list[Chunk] = []

    def head() -> Iterator[Chunk]:
        seen = 0
        for chunk in chunks:
            if seen + len(chunk.messages) <= at:
                seen += len(chunk.messages)
                yield chunk
                continue
            cut = at - seen
            yield Chunk(chunk.messages[:cut], chunk.keys, chunk.kinds)
            rest.append(Chunk(chunk.messages[cut:], 0, Counter()))
            return

    def tail() -> Iterator[Chunk]:
        yield from rest
        yield from chunks

    return head(), tail()


@dataclass(slots=True)
class Published:
    """What :func:`publish_chunks` sent."""

    messages: int = 0
    keys: int = 0
    duplicates: int = 0
    """PubAcks that came back ``duplicate`` (none expected: every Msg-Id is new)."""
    elapsed_s: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)

    def __add__(self, other: Published) -> Published:
        return Published(
            self.messages + other.messages,
            self.keys + other.keys,
            self.duplicates + other.duplicates,
            self.elapsed_s + other.elapsed_s,
            self.kinds + other.kinds,
        )


async def publish_chunks(js: JetStreamContext, chunks: Iterator[Chunk]) -> Published:
    """``publish_async`` every command with ``Nats-Msg-Id`` = command id, chunk by chunk,
    waiting for each chunk's PubAcks before the next is built."""
    out = Published()
    started = time.monotonic()
    said = started
    for chunk in chunks:
        # A fresh headers dict per call: nats-py mutates the one it is given.
        futures = [
            await js.publish_async(subject, data, headers={"Nats-Msg-Id": command_id})
            for subject, command_id, data in chunk.messages
        ]
        with anyio.fail_after(PUBLISH_DEADLINE_S):
            for future in futures:
                ack = await future
                out.duplicates += bool(ack.duplicate)
        out.messages += len(chunk.messages)
        out.keys += chunk.keys
        out.kinds.update(chunk.kinds)
        if time.monotonic() - said > 10:
            said = time.monotonic()
            say(f"published {out.messages:,} commands ({out.keys:,} keys)")
    out.elapsed_s = time.monotonic() - started
    return out


def _internal_filter(subjects: Subjects, partition: int) -> str:
    if subjects.partitions == 1:
        return f"{subjects.prefix}.int.>"
    return f"{subjects.prefix}.part.{partition}.int.>"


async def _acked_through(js: JetStreamContext, subjects: Subjects) -> tuple[int, int]:
    """(messages acked by the router, messages in the input streams), over every partition."""
    acked = last = 0
    for p in range(subjects.partitions):
        stream = subjects.input_stream(p)
        info = await js.stream_info(stream)
        consumer = await js.consumer_info(stream, subjects.consumer_name(p))
        last += int(info.state.last_seq or 0)
        floor = consumer.ack_floor
        acked += int(floor.stream_seq or 0) if floor is not None else 0
    return acked, last


async def wait_idle(
    js: JetStreamContext,
    subjects: Subjects,
    process: Process,
    *,
    deadline_s: float,
    settle_s: float = 0.5,
) -> float:
    """Until the router has acked every message of its input streams and no new one came for
    ``settle_s``; returns the ``time.monotonic()`` at which it first had.

    The router acks a batch only once it is committed and its fan-out is published, so the
    ack floor at the streams' end means the whole history (fan-out included) is applied.
    """
    deadline = time.monotonic() + deadline_s
    said = time.monotonic()
    while True:
        acked, last = await _acked_through(js, subjects)
        if acked >= last:
            done = time.monotonic()
            await anyio.sleep(settle_s)
            if await _acked_through(js, subjects) == (acked, last):
                return done
            continue
        if process.returncode is not None:
            raise BenchError(f"router exited with {process.returncode} at seq {acked} of {last}")
        if time.monotonic() > deadline:
            raise BenchError(f"router not idle within {deadline_s:g} s: acked {acked} of {last}")
        if time.monotonic() - said > 15:
            said = time.monotonic()
            say(f"router has applied {acked:,} of {last:,} input messages")
        await anyio.sleep(0.2)


@dataclass(frozen=True, slots=True)
class StreamCounts:
    """Messages in the input streams (source commands and internal fan-out) and the others."""

    input_messages: int
    internal_messages: int
    """Internal commands in the input streams: those for another partition than their cause's."""
    output_messages: int
    dead_letters: int
    local_records: int = 0
    """Internal commands applied with their cause, recorded on the local stream."""

    @property
    def commands(self) -> int:
        """Every command of the history: the input messages and the local records (a rebuild
        reads the first and derives the others from their causes)."""
        return self.input_messages + self.local_records

    @property
    def source_messages(self) -> int:
        """Input-stream messages that came from outside (commands, stock commands)."""
        return self.input_messages - self.internal_messages


async def _count(js: JetStreamContext, stream: str, subject_filter: str) -> int:
    """Messages of ``stream`` on ``subject_filter``, from a throw-away consumer's pending."""
    info = await js.add_consumer(
        stream,
        config=api.ConsumerConfig(
            filter_subject=subject_filter,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
        ),
    )
    try:
        return int(info.num_pending or 0)
    finally:
        await js.delete_consumer(stream, info.name)


async def stream_counts(js: JetStreamContext, subjects: Subjects) -> StreamCounts:
    """How the deployment's streams are made up."""
    total = internal = 0
    for p in range(subjects.partitions):
        stream = subjects.input_stream(p)
        total += int((await js.stream_info(stream)).state.messages or 0)
        internal += await _count(js, stream, _internal_filter(subjects, p))
    output = int((await js.stream_info(subjects.output_stream)).state.messages or 0)
    dead = int((await js.stream_info(subjects.dead_letter_stream)).state.messages or 0)
    local = int((await js.stream_info(subjects.local_stream)).state.messages or 0)
    return StreamCounts(total, internal, output, dead, local)


def kinds_text(kinds: Counter[str], order: Sequence[str]) -> str:
    """``book 1,000, reschedule 8,000`` in the workload's order of kinds."""
    return ", ".join(f"{k} {kinds[k]:,}" for k in order if kinds[k])
