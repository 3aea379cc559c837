"""State snapshots kept in JetStream, so that a rebuild folds only the tail of the streams.

One object per store file in the bucket ``<stream prefix>_SNAPSHOTS`` (a JetStream object
store, with the streams' replicas and storage), named after the input streams the file holds;
putting a new one replaces the last.  Each is a state file (:mod:`caresync.store.state_file`):
the file's derived state at the offsets it names, taken in one read transaction while the
router runs.

A rebuild uses a snapshot only when it is sound for this deployment, and says why not
otherwise: the same input streams (same partitioning), each stream the same one the snapshot
was taken from (its creation time) and holding the snapshot's offset, the same store schema
and the same actor, codec and per-message runtime code (:func:`logic_fingerprint`: a rebuild
after a fix of the actors' logic must fold from the start, so it does).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence, Set
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import nats.errors
import nats.js.errors
import structlog
from anyio.abc import TaskStatus
from nats.js import JetStreamContext, api
from nats.js.object_store import ObjectStore

from caresync.codecs import Subjects
from caresync.config import StreamsConfig
from caresync.router.errors import ProvisioningError
from caresync.store import BatchWrite, PartitionedStore, Store
from caresync.store.schema import SCHEMA_VERSION
from caresync.store.state_file import (
    SnapshotFileError,
    SnapshotInfo,
    read_state_info,
    restore_state_file,
    write_state_file,
)

log = structlog.get_logger("caresync.snapshots")

_CHUNK_BYTES = 512 * 1024
"""Object chunk size (the server's default max_payload is 1 MiB)."""
_TAKE_LIMIT_S = 300.0
"""How long the router's own snapshot may hold up its stop."""
_FETCH_CHUNKS = 32
"""Chunks asked for at once when reading a snapshot."""
_LOGIC: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("caresync.actors", ()),
    ("caresync.codecs", ()),
    # What the runtime decides per message: dedupe, supervision and parking, decoding, rows,
    # which commands are applied with their cause.
    (
        "caresync.router",
        (
            "actor.py",
            "decoding.py",
            "local_fanout.py",
            "outbox_rows.py",
            "replay_fold_apply.py",
        ),
    ),
)
"""The code that derives state from the streams: (package, its modules; () for all)."""
_fingerprint: list[str] = []


def logic_fingerprint() -> str:
    """A hash of the code that derives state from the streams (:data:`_LOGIC`)."""
    if not _fingerprint:
        digest = hashlib.sha256()
        for package, modules in _LOGIC:
            root = resources.files(package)
            for entry in sorted(root.iterdir(), key=lambda e: e.name):
                wanted = entry.name in modules if modules else entry.name.endswith(".py")
                if wanted and entry.is_file():
                    digest.update(entry.name.encode() + b"\0" + entry.read_bytes())
        _fingerprint.append(digest.hexdigest()[:16])
    return _fingerprint[0]


def bucket_name(subjects: Subjects) -> str:
    """The object store bucket of a deployment's snapshots."""
    return f"{subjects.stream_prefix}_SNAPSHOTS"


def object_name(streams: Sequence[str]) -> str:
    """A snapshot's object name: the input streams its file holds."""
    return "+".join(streams)


async def provision_bucket(js: JetStreamContext, subjects: Subjects, cfg: StreamsConfig) -> str:
    """Create the snapshot bucket if it is missing, or give it the configured replicas;
    what was done, in one line ("" if nothing)."""
    name = bucket_name(subjects)
    try:
        info = await js.stream_info(f"OBJ_{name}")
    except nats.js.errors.NotFoundError:
        try:
            await js.create_object_store(
                name,
                config=api.ObjectStoreConfig(
                    description="caresync state snapshots, one per store file (replay rebuild)",
                    storage=api.StorageType.FILE
                    if cfg.storage == "file"
                    else api.StorageType.MEMORY,
                    replicas=cfg.replicas,
                ),
            )
        except nats.js.errors.APIError as exc:
            raise ProvisioningError(f"cannot create object store {name}: {exc}") from exc
        return f"created object store {name}"
    have = info.config.num_replicas or 1
    if have == cfg.replicas:
        return ""
    try:
        await js.update_stream(config=dataclasses.replace(info.config, num_replicas=cfg.replicas))
    except nats.js.errors.APIError as exc:
        raise ProvisioningError(
            f"cannot update object store {name} (replicas {have} -> {cfg.replicas}): {exc}"
        ) from exc
    return f"updated object store {name}: replicas {have} -> {cfg.replicas}"


@dataclass(frozen=True, slots=True)
class Restored:
    """What a rebuild made of one store file's snapshot."""

    streams: tuple[str, ...]
    used: bool
    reason: str = ""
    """Why it was not used (empty when used)."""
    info: SnapshotInfo | None = None
    added_pending: tuple[str, ...] = ()
    """Keys of the effects the snapshot held as pending that the store did not have."""


def file_streams(
    stores: PartitionedStore, subjects: Subjects, partitions: Sequence[int]
) -> list[tuple[Store, list[str]]]:
    """Each distinct file of ``partitions`` with the input streams it holds."""
    out: list[tuple[Store, list[str]]] = []
    for p in partitions:
        store = stores.of(p)
        for seen, streams in out:
            if seen is store:
                streams.append(subjects.input_stream(p))
                break
        else:
            out.append((store, [subjects.input_stream(p)]))
    return out


class Snapshots:
    """Takes snapshots of store files into the bucket, and restores them."""

    def __init__(self, js: JetStreamContext, subjects: Subjects) -> None:
        self._js = js
        self.subjects = subjects
        self._bucket: ObjectStore | None = None

    async def bucket(self) -> ObjectStore:
        if self._bucket is None:
            self._bucket = await self._js.object_store(bucket_name(self.subjects))
        return self._bucket

    async def _infos(self, streams: Sequence[str]) -> dict[str, api.StreamInfo]:
        return {stream: await self._js.stream_info(stream) for stream in streams}

    @staticmethod
    def _identities(infos: dict[str, api.StreamInfo]) -> dict[str, str]:
        """Each stream's creation time: a stream deleted and made again is another log."""
        return {
            f"created.{stream}": info.created.isoformat() if info.created else ""
            for stream, info in infos.items()
        }

    async def take(self, path: Path, streams: Sequence[str]) -> SnapshotInfo:
        """Snapshot the store file at ``path`` now and put it in the bucket (replacing the
        last one); the router may be running."""
        extra = self._identities(await self._infos(streams))
        bucket = await self.bucket()
        with tempfile.TemporaryDirectory(prefix="snapshot-", dir=path.parent) as tmp:
            dest = Path(tmp) / "state.db"
            info = await anyio.to_thread.run_sync(
                lambda: write_state_file(
                    path, dest, streams=streams, logic=logic_fingerprint(), extra=extra
                )
            )
            with dest.open("rb") as data:
                await bucket.put(
                    object_name(streams),
                    data,
                    meta=api.ObjectMeta(
                        description="state at "
                        + ", ".join(f"{s} seq {seq}" for s, seq in info.offsets.items()),
                        options=api.ObjectMetaOptions(max_chunk_size=_CHUNK_BYTES),
                    ),
                )
        log.info("snapshot_taken", streams=list(streams), offsets=info.offsets, rows=info.rows)
        return info

    async def listing(self, files: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
        """What the bucket holds for each file (given by its streams), for status output."""
        out: list[dict[str, Any]] = []
        try:
            bucket = await self.bucket()
        except nats.js.errors.BucketNotFoundError:
            return [{"streams": list(streams), "taken": False} for streams in files]
        for streams in files:
            try:
                info = await bucket.get_info(object_name(streams))
            except nats.js.errors.ObjectNotFoundError:
                out.append({"streams": list(streams), "taken": False})
                continue
            out.append(
                {
                    "streams": list(streams),
                    "taken": True,
                    "taken_at": info.mtime or "",
                    "bytes": int(info.size or 0),
                    "description": info.description or "",
                }
            )
        return out

    async def restore(self, store: Store, streams: Sequence[str]) -> Restored:
        """Put the file's snapshot into ``store`` if it is sound here; say why not otherwise.

        Restoring replaces the derived state (as a reset would); when the snapshot is not
        used, the store is left as it was.
        """
        name = object_name(streams)
        try:
            bucket = await self.bucket()
        except nats.js.errors.BucketNotFoundError:
            return Restored(tuple(streams), False, f"no bucket {bucket_name(self.subjects)}")
        with tempfile.TemporaryDirectory(prefix="snapshot-", dir=store.path.parent) as tmp:
            path = Path(tmp) / "state.db"
            try:
                with path.open("wb") as out:
                    await self._fetch(bucket, name, out)
            except nats.js.errors.ObjectNotFoundError:
                return Restored(tuple(streams), False, f"no snapshot {name!r} in the bucket")
            except SnapshotFileError as exc:
                return Restored(tuple(streams), False, str(exc))
            try:
                info = await anyio.to_thread.run_sync(read_state_info, path)
            except SnapshotFileError as exc:
                return Restored(tuple(streams), False, str(exc))
            reason = await self._unsound(info, streams)
            if reason:
                return Restored(tuple(streams), False, reason, info)
            added = await restore_state_file(store, path)
        log.info("snapshot_restored", streams=list(streams), offsets=info.offsets, rows=info.rows)
        return Restored(tuple(streams), True, "", info, tuple(added))

    async def _fetch(self, bucket: ObjectStore, name: str, out: BinaryIO) -> None:
        """Write the object's chunks to ``out``, checking their count, size and digest.

        A pull consumer on the object's chunk subject: nats-py's own ``get`` reads through an
        ordered push consumer at about 16 MB/s here, this at several hundred.
        """
        info = await bucket.get_info(name)
        chunks, size = int(info.chunks or 0), int(info.size or 0)
        digest = hashlib.sha256()
        got = read = 0
        if chunks:
            sub = await self._js.pull_subscribe(
                f"$O.{bucket_name(self.subjects)}.C.{info.nuid}",
                stream=f"OBJ_{bucket_name(self.subjects)}",
                config=api.ConsumerConfig(
                    ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True
                ),
            )
            try:
                while read < chunks:
                    for msg in await sub.fetch(min(_FETCH_CHUNKS, chunks - read), timeout=10.0):
                        digest.update(msg.data)
                        out.write(msg.data)
                        got += len(msg.data)
                        read += 1
            except nats.errors.TimeoutError as exc:
                raise SnapshotFileError(
                    f"snapshot {name!r}: chunk {read + 1} of {chunks} did not come"
                ) from exc
            finally:
                await sub.unsubscribe()
        want = (info.digest or "").removeprefix("SHA-256=")
        if got != size or base64.urlsafe_b64encode(digest.digest()).decode() != want:
            raise SnapshotFileError(f"snapshot {name!r} fails its size or digest check")

    async def _unsound(self, info: SnapshotInfo, streams: Sequence[str]) -> str:
        if tuple(info.streams) != tuple(streams):
            return f"snapshot holds streams {list(info.streams)}, the file {list(streams)}"
        if info.schema_version != SCHEMA_VERSION:
            return f"snapshot has store schema {info.schema_version}, this is {SCHEMA_VERSION}"
        if info.logic != logic_fingerprint():
            return (
                f"snapshot was taken by other actor or codec code ({info.logic}, this is "
                f"{logic_fingerprint()}): folding from the start applies this code to all of it"
            )
        infos = await self._infos(streams)
        identities = self._identities(infos)
        for stream in streams:
            if info.extra.get(f"created.{stream}") != identities[f"created.{stream}"]:
                return f"stream {stream} was created again after the snapshot"
            state = infos[stream].state
            offset = info.offsets.get(stream, 0)
            if offset > state.last_seq:
                return (
                    f"snapshot is at {stream} seq {offset}, past the stream's last {state.last_seq}"
                )
            if offset < state.last_seq and state.first_seq > offset + 1:
                # Its tail is gone (limits, a purge): what the snapshot lacks cannot be folded.
                return (
                    f"stream {stream} no longer holds seq {offset + 1} past the snapshot (its "
                    f"first is {state.first_seq})"
                )
        return ""


async def restore_all(
    snapshots: Snapshots,
    stores: PartitionedStore,
    subjects: Subjects,
    already_sent: Callable[[], Awaitable[Set[str]]],
    partitions: Sequence[int] | None = None,
) -> list[Restored]:
    """Restore each file's snapshot (of ``partitions``, default all); files without a sound
    one are reset instead.

    ``already_sent`` (an async callable giving the Msg-Ids in the streams) is asked only if a
    snapshot brought pending effects the store did not have; those the streams hold are then
    recorded as sent, so that the next start does not send them again.
    """
    results: list[Restored] = []
    mine = range(subjects.partitions) if partitions is None else partitions
    for store, streams in file_streams(stores, subjects, mine):
        result = await snapshots.restore(store, streams)
        if not result.used:
            log.info("snapshot_not_used", streams=streams, reason=result.reason)
            await store.reset_state()
        elif result.added_pending:
            sent, now = await already_sent(), time.time()
            confirmed = [(key, now) for key in result.added_pending if key in sent]
            if confirmed:
                await store.commit(BatchWrite(sent=confirmed))
        results.append(result)
    return results


class SnapshotTask:
    """Takes a snapshot of each of this process's files now and then (``snapshots`` config).

    Due every ``every_s`` once ``min_messages`` more were applied; a failed one is logged and
    tried again at the next round, the pipeline goes on either way.
    """

    def __init__(
        self,
        snapshots: Snapshots,
        files: Sequence[tuple[Store, Sequence[str]]],
        *,
        every_s: float,
        min_messages: int,
    ) -> None:
        self._snapshots = snapshots
        self._files = list(files)
        self._every_s = every_s
        self._min_messages = min_messages
        self._taken: dict[str, int] = {}
        """Per stream, the offset of the last snapshot taken (0 at start)."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self._every_s <= 0:
            return
        while True:
            await anyio.sleep(self._every_s)
            await self.round()

    async def round(self) -> int:
        """Snapshot the files that are due; returns how many were taken."""
        taken = 0
        for store, streams in self._files:
            try:
                offsets = {s: await store.offset(s) for s in streams}
                moved = sum(offsets[s] - self._taken.get(s, 0) for s in streams)
                if moved < self._min_messages:
                    continue
                started = time.monotonic()
                # Shielded (bounded): a snapshot cut off while its chunks are being put
                # would leave them behind in the bucket, orphaned.
                with anyio.CancelScope(shield=True), anyio.fail_after(_TAKE_LIMIT_S):
                    info = await self._snapshots.take(store.path, streams)
            except Exception as exc:  # best effort: the pipeline goes on regardless
                log.warning("snapshot_failed", streams=list(streams), error=repr(exc))
                continue
            self._taken.update(info.offsets)
            taken += 1
            log.info("snapshot_round", streams=list(streams), took_s=time.monotonic() - started)
        return taken
