"""Reading a deployment's streams for replays: an entity's history, where a subject is
stored (partitions map it), which effect keys the streams already hold, and the reference data.

Readers are ephemeral, filtered, unacknowledged consumers (headers only where the bodies are not
needed), deleted when done; nothing here writes to a stream or to the store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

import anyio
import nats.errors
import nats.js.errors
import structlog
from nats.js import api

from caresync.codecs import CodecError, Subjects
from caresync.codecs.errors import DecodeError
from caresync.codecs.refdata import decode_refdata_set
from caresync.router.errors import RouterError
from caresync.router.jetstream import JetStreamConsumer, JetStreamTransport
from caresync.router.refdata import RefDataCatalog
from caresync.router.transport import Inbound
from caresync.store import Store

log = structlog.get_logger("caresync.replay")

# Effects are stored after their cause; the margin covers clocks of different stream leaders.
_CLOCK_MARGIN_NS = 60 * 1_000_000_000
_BATCH = 500


class Progress(Protocol):
    """Where a replay reports how many messages it has to read and has read."""

    def expect(self, messages: int) -> None:
        """``messages`` more to read (negative: fewer than announced)."""
        ...

    def advance(self, messages: int) -> None:
        """``messages`` more read."""
        ...


class EntityStreams:
    """The streams of one deployment, as replays read them."""

    def __init__(
        self, transport: JetStreamTransport, subjects: Subjects, *, stall_timeout_s: float = 30.0
    ) -> None:
        self._transport = transport
        self._subjects = subjects
        self._stall_timeout_s = stall_timeout_s
        self._partitions: dict[tuple[str, str], int | None] = {}

    async def sent(self, wanted: dict[str, str], since_ns: int, anchored: set[str]) -> set[str]:
        """Which of ``wanted`` (key to subject) are Msg-Ids on their subject in the streams.

        An effect is stored after the message that caused it, so a stream is read from the
        first re-applied message's time on, unless it may hold a key that is not ``anchored``
        to a re-applied command (a purchase order is keyed by its threshold crossing, which an
        earlier command may have caused): that stream is read from its start.
        """
        filters: dict[str, set[str]] = {}
        from_start: set[str] = set()
        for key, subject in wanted.items():
            for where in await self._places(subject):
                filters.setdefault(where[0], set()).add(where[1])
                if key not in anchored:
                    from_start.add(where[0])
        found: set[str] = set()
        for stream, subjects in filters.items():
            start_ns = 0
            if since_ns and stream not in from_start:
                start_ns = max(0, since_ns - _CLOCK_MARGIN_NS)
            for m in await self.read(
                stream, sorted(subjects), start_ns=start_ns, headers_only=True
            ):
                msg_id = (m.headers or {}).get("Nats-Msg-Id", "")
                if msg_id in wanted:
                    found.add(msg_id)
        return found

    async def _places(self, subject: str) -> list[tuple[str, str]]:
        """Where a message on ``subject`` may be: an internal command is in its partition's
        input stream, or, applied with its cause, recorded in the local stream."""
        where = await self.stored_at(subject)
        places = [] if where is None else [where]
        s = self._subjects
        try:
            address = s.parse_address(subject)
        except CodecError:
            return places
        if address.internal:
            places.append((s.local_stream, s.local_record(address.kind, address.entity)))
        return places

    async def stored_at(self, subject: str) -> tuple[str, str] | None:
        """The stream that stores ``subject``, and the subject as stored (partitions map it)."""
        s = self._subjects
        head = f"{s.prefix}."
        if not subject.startswith(head):
            return None
        rest = subject[len(head) :]
        role = rest.split(".", 1)[0]
        if role in ("in", "int"):
            if s.partitions == 1:
                return s.input_stream(0), subject
            parts = rest.split(".")
            if len(parts) != 3:
                return None
            partition = await self.partition(parts[1], parts[2])
            if partition is None:
                return None
            return s.input_stream(partition), f"{s.prefix}.part.{partition}.{rest}"
        if role == "out":
            return s.output_stream, subject
        if role == "loc":
            return s.local_stream, subject
        if role == "dlq":
            return s.dead_letter_stream, subject
        return None

    def entity_filter(self, partition: int, kind: str, token: str) -> str:
        s = self._subjects
        if s.partitions == 1:
            return f"{s.prefix}.*.{kind}.{token}"
        return f"{s.prefix}.part.{partition}.*.{kind}.{token}"

    async def partition(self, kind: str, token: str) -> int | None:
        """The partition holding messages of an entity (None if no partition has any).

        Asked of the streams rather than computed, so it does not depend on reproducing the
        server's partition hash.
        """
        if self._subjects.partitions == 1:
            return 0
        key = (kind, token)
        if key not in self._partitions:
            self._partitions[key] = None
            for p in range(self._subjects.partitions):
                info = await self._transport.js.stream_info(
                    self._subjects.input_stream(p),
                    subjects_filter=self.entity_filter(p, kind, token),
                )
                if info.state.subjects:
                    self._partitions[key] = p
                    break
        return self._partitions[key]

    async def read(
        self,
        stream: str,
        filters: list[str],
        *,
        start_ns: int = 0,
        headers_only: bool = False,
        stop: Callable[[Inbound], bool] | None = None,
        progress: Progress | None = None,
    ) -> list[Inbound]:
        """Messages of ``stream`` on ``filters`` (all if empty) from ``start_ns`` (or the first),
        in order, until the first for which ``stop`` is true (excluded) or the end."""
        js = self._transport.js
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_TIME if start_ns else api.DeliverPolicy.ALL,
            opt_start_time=datetime.fromtimestamp(start_ns / 1e9, UTC) if start_ns else None,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
            headers_only=headers_only or None,
            inactive_threshold=30.0,
            mem_storage=True,
        )
        info = await js.add_consumer(stream, config=config)
        expected = int(info.num_pending or 0)
        out: list[Inbound] = []
        reader = JetStreamConsumer(
            self._transport.nc, stream, info.name, batch=_BATCH, expires_s=1.0, ack=False
        )
        if progress is not None:
            progress.expect(expected)
        seen = 0
        try:
            await reader.start()
            stalled_since = time.monotonic()
            while seen < expected:
                batch = await reader.next_batch(_BATCH, 1.0)
                if not batch:
                    if time.monotonic() - stalled_since > self._stall_timeout_s:
                        raise RouterError(
                            f"reading {stream} stalled after {seen} of {expected} messages"
                        )
                    continue
                stalled_since = time.monotonic()
                done = False
                for m in batch:
                    if stop is not None and stop(m):
                        done = True
                        break
                    out.append(m)
                seen += len(batch)
                if progress is not None:
                    progress.advance(len(batch))
                if done:
                    break
        finally:
            if progress is not None and seen < expected:
                progress.expect(min(seen, expected) - expected)
            with anyio.CancelScope(shield=True):
                await reader.close()
                try:
                    await js.delete_consumer(stream, info.name)
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    log.debug("replay_reader_delete_failed", stream=stream, error=repr(exc))
        return out


async def read_catalog(
    transport: JetStreamTransport,
    store: Store,
    subjects: Subjects,
    *,
    stall_timeout_s: float = 30.0,
) -> RefDataCatalog:
    """Every reference-data version, from the store and the refdata stream; writes nothing.

    (The router's follower also keeps the versions it reads; a dry run must not.)
    """
    catalog = RefDataCatalog()
    await catalog.restore(store)
    stream = subjects.refdata_stream
    last = await transport.last_seq(stream)
    if last <= catalog.latest_version:
        return catalog
    reader = await transport.open_reader(stream, catalog.latest_version + 1)
    try:
        seen = catalog.latest_version
        stalled_since = time.monotonic()
        while seen < last:
            batch = await reader.next_batch(64, 1.0)
            if not batch:
                if time.monotonic() - stalled_since > stall_timeout_s:
                    raise RouterError(f"reading {stream} stalled at seq {seen} of {last}")
                continue
            stalled_since = time.monotonic()
            for m in batch:
                seen = max(seen, m.seq)
                try:
                    dataset = decode_refdata_set(m.data)
                except DecodeError as exc:
                    log.error("refdata_message_unreadable", seq=m.seq, error=exc.reason)
                    continue
                catalog.add(m.seq, m.timestamp_ns or _loaded_at_ns(dataset.loaded_at), dataset)
    finally:
        await reader.close()
    return catalog


def _loaded_at_ns(loaded_at: datetime) -> int:
    return (loaded_at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000
