"""The reference-data versions a router knows, and the task that keeps them current.

Every load of reference data is one message on the reference-data stream; its stream sequence
is its version and its stream timestamp the moment it takes effect.  A command is decided with
the version in force at its own stream timestamp (:meth:`RefDataCatalog.at`), so a replay
uses the same data the live router used.

Versions are kept in the store as they arrive: a restart reads them from there and the stream
from the last one kept on.
"""

from __future__ import annotations

import bisect
import math
from datetime import UTC, datetime, timedelta

import anyio
import structlog
from anyio.abc import TaskStatus

from caresync.actors.refdata import RefData
from caresync.codecs.errors import DecodeError
from caresync.codecs.refdata import RefDataSet, decode_refdata_set
from caresync.router.transport import Inbound, InputConsumer, Transport
from caresync.store import Store

log = structlog.get_logger("caresync.refdata")

_EMPTY = RefData.empty()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class RefDataCatalog:
    """Reference-data versions by the time they took effect; starts empty."""

    def __init__(self) -> None:
        self._entries: list[tuple[int, int, RefData]] = []
        """(effective_from_ns, version, data), sorted."""
        self._starts: list[tuple[int, int]] = []
        self._versions: set[int] = set()
        self.followed = 0
        """Highest refdata stream sequence the follower has handled (0 before it runs)."""
        self._advanced: anyio.Event | None = None

    def followed_to(self, seq: int) -> None:
        """The follower has handled the stream through ``seq`` (wakes :meth:`wait_current`)."""
        self.followed = max(self.followed, seq)
        if self._advanced is not None:
            self._advanced.set()
            self._advanced = None

    @property
    def latest_version(self) -> int:
        """The highest version known (0 if none)."""
        return max(self._versions, default=0)

    def versions(self) -> list[tuple[int, int]]:
        """(version, effective_from_ns) of every version known, in order of effect."""
        return [(version, start) for start, version in self._starts]

    def add(self, version: int, effective_from_ns: int, dataset: RefDataSet) -> bool:
        """Know one more version; a version already known is ignored (returns False)."""
        if version in self._versions:
            return False
        key = (effective_from_ns, version)
        at = bisect.bisect_right(self._starts, key)
        self._starts.insert(at, key)
        self._entries.insert(at, (effective_from_ns, version, RefData(dataset, version=version)))
        self._versions.add(version)
        return True

    def at(self, timestamp_ns: int) -> RefData:
        """The version in force at ``timestamp_ns``: the latest that took effect at or before it.

        Before the first version, the empty reference data.
        """
        at = bisect.bisect_right(self._starts, (timestamp_ns, math.inf)) - 1
        return self._entries[at][2] if at >= 0 else _EMPTY

    def latest(self) -> RefData:
        """The version that took effect last (the empty reference data if none)."""
        return self._entries[-1][2] if self._entries else _EMPTY

    async def wait_current(
        self, transport: Transport, stream: str, *, timeout_s: float = 5.0
    ) -> None:
        """Return once every version stored in ``stream`` until now is known.

        The router calls it before deciding a batch: a command stored after a load must be
        decided with that load live as well as in a replay, however late the follower is.
        Past ``timeout_s`` (follower stalled) it logs and returns rather than stop the router.
        """
        target = await transport.last_seq(stream)
        if self.followed >= target:
            return
        with anyio.move_on_after(timeout_s):
            while self.followed < target:
                if self._advanced is None:
                    self._advanced = anyio.Event()
                await self._advanced.wait()
            return
        log.warning("refdata_behind", stream=stream, followed=self.followed, stream_seq=target)

    async def restore(self, store: Store) -> int:
        """Add every version kept in the store; returns how many were new."""
        added = 0
        for version, effective_from_ns, data in await store.refdata_versions():
            try:
                dataset = decode_refdata_set(data)
            except DecodeError as exc:
                log.error("refdata_version_unreadable", version=version, error=exc.reason)
                continue
            added += self.add(version, effective_from_ns, dataset)
        return added

    async def follow(
        self,
        transport: Transport,
        store: Store,
        stream: str,
        *,
        poll_timeout_s: float = 1.0,
        retry_backoff_max_s: float = 5.0,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the catalog current with ``stream`` until cancelled.

        Restores the versions the store keeps, then reads the stream from the next version on,
        keeping and adding each new one.  ``task_status.started()`` is called only once the
        catalog has caught up with the stream's last sequence at start, so a router that waits
        for it never decides with stale reference data.  Errors before that propagate; after
        it, a lost connection is retried with back-off.
        """
        await self.restore(store)
        target = await transport.last_seq(stream)
        if target < self.latest_version:
            # Versions are stream sequences: a stream recreated empty reuses them, and loads
            # numbered at or below what the store kept would be taken for versions already seen.
            log.warning(
                "refdata_stream_behind_store",
                stream=stream,
                stream_last_seq=target,
                store_version=self.latest_version,
            )
        follower = _Follower(self, transport, store, stream, poll_timeout_s)
        self.followed = max(self.followed, follower.seen)
        try:
            while follower.seen < target:
                await follower.step()
            log.info("refdata_caught_up", stream=stream, version=self.latest_version)
            task_status.started()
            backoff_s = 0.1
            while True:
                try:
                    await follower.step()
                    backoff_s = 0.1
                except Exception as exc:  # lost connection, consumer gone, store busy...
                    log.warning("refdata_follow_failed", stream=stream, error=repr(exc))
                    await follower.reset()
                    await anyio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, retry_backoff_max_s)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await follower.reset()


class _Follower:
    """Reads the stream from the catalog's next version; reopens its reader when it stalls."""

    def __init__(
        self,
        catalog: RefDataCatalog,
        transport: Transport,
        store: Store,
        stream: str,
        poll_timeout_s: float,
    ) -> None:
        self._catalog = catalog
        self._transport = transport
        self._store = store
        self._stream = stream
        self._poll_timeout_s = poll_timeout_s
        self._reader: InputConsumer | None = None
        self._idle_polls = 0
        self.seen = catalog.latest_version
        """Highest stream sequence handled (kept, or skipped as unreadable)."""

    async def step(self) -> None:
        """Handle one batch; after a few empty polls, check the stream and reopen if behind."""
        if self._reader is None:
            self._reader = await self._transport.open_reader(self._stream, self.seen + 1)
        batch = await self._reader.next_batch(64, self._poll_timeout_s)
        for message in batch:
            await self._take(message)
        if batch:
            self._idle_polls = 0
            return
        self._idle_polls += 1
        # An ephemeral reader can vanish (server restart, consumer expiry) without a word:
        # when the stream has moved on while we heard nothing, read it again from where we are.
        if self._idle_polls >= 3:
            self._idle_polls = 0
            if await self._transport.last_seq(self._stream) > self.seen:
                await self.reset()

    async def _take(self, message: Inbound) -> None:
        if message.seq <= self.seen:
            return
        try:
            dataset = decode_refdata_set(message.data)
        except DecodeError as exc:
            # Not something `caresync refdata load` sends; skip it rather than stop the router.
            log.error("refdata_message_unreadable", seq=message.seq, error=exc.reason)
            self.seen = message.seq
            self._catalog.followed_to(message.seq)
            return
        effective_from_ns = message.timestamp_ns or _loaded_at_ns(dataset)
        await self._store.save_refdata_version(message.seq, effective_from_ns, message.data)
        if self._catalog.add(message.seq, effective_from_ns, dataset):
            log.info(
                "refdata_version_added",
                version=message.seq,
                effective_from_ns=effective_from_ns,
                **dataset.counts(),
            )
        self.seen = message.seq
        self._catalog.followed_to(message.seq)

    async def reset(self) -> None:
        """Close the reader; the next step opens a new one after the last version seen."""
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                await reader.close()
            except Exception as exc:  # closing a reader on a lost connection
                log.debug("refdata_reader_close_failed", error=repr(exc))


def _loaded_at_ns(dataset: RefDataSet) -> int:
    return (dataset.loaded_at - _EPOCH) // timedelta(microseconds=1) * 1000
