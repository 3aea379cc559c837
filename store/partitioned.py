"""The router's store as one SQLite file per partition.

Partition 0 lives in the main file, which also holds what is not partitioned (reference data,
the ingest log, the downstream calls); partition p > 0 lives in ``<stem>.p<p><suffix>`` beside
it.  Each partition's pipeline thus commits to a file of its own: router processes (and the
partitions of one process) never wait for one another's write lock.  A deployment with one
partition has one file, as before.

Readers that do not know an entity's partition (views, verdicts, status) ask every file: a
point lookup per file, and an entity is only ever in one of them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar

from caresync.store.errors import StoreError
from caresync.store.ingest import IngestLog
from caresync.store.records import EntityRow, ParkedRow
from caresync.store.sqlite import DEFAULT_CACHE_MB, Store

T = TypeVar("T")

LAYOUT_KEY = "partition_files"
"""Meta key of the main file: how many partitions the files were written for."""


class StoreLayoutError(StoreError):
    """Raised when the files on disk were written for another partitioning."""


def partition_path(main: Path, partition: int) -> Path:
    """The file of one partition: the main file for partition 0."""
    if partition == 0:
        return main
    return main.with_name(f"{main.stem}.p{partition}{main.suffix}")


class PartitionedStore:
    """The main store and the store of each partition this process has opened.

    ``streams`` names each partition's input stream: its offset is kept in that partition's
    file (any other stream's, such as the raw ingest stream's, in the main file).  Several
    partitions may share one :class:`Store` (:meth:`single`, used by tests and tools that run
    every partition over one file).
    """

    def __init__(self, main: Store, partitions: Mapping[int, Store], streams: Sequence[str]):
        self.main = main
        self._partitions = dict(partitions)
        self._streams = {name: p for p, name in enumerate(streams)}
        self._owned: list[Store] = []
        """Stores this object opened, closed by :meth:`close`."""

    @classmethod
    def single(cls, store: Store, streams: Sequence[str]) -> PartitionedStore:
        """Every partition in one file (the caller keeps ownership of ``store``)."""
        return cls(store, dict.fromkeys(range(len(streams)), store), streams)

    @classmethod
    def of_store(cls, store: Store | PartitionedStore, streams: Sequence[str]) -> PartitionedStore:
        """``store`` as it is if partitioned, else every partition in its one file."""
        return store if isinstance(store, PartitionedStore) else cls.single(store, streams)

    @classmethod
    async def open(
        cls,
        path: Path,
        streams: Sequence[str],
        *,
        partitions: Iterable[int] | None = None,
        synchronous: Literal["normal", "full"] = "normal",
        busy_timeout_ms: int = 5000,
        cache_mb: int = DEFAULT_CACHE_MB,
        adopt: bool = False,
    ) -> PartitionedStore:
        """Open the main file and the files of ``partitions`` (default all).

        Refuses files written for another number of partitions, or a main file that holds
        partitions of a deployment from before one file per partition, unless ``adopt`` (a
        rebuild, which resets every partition's state and then owns the layout).
        """
        main = await Store.open(
            path, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms, cache_mb=cache_mb
        )
        out = cls(main, {}, streams)
        out._owned.append(main)
        try:
            await out._check_layout(adopt)
            for p in range(len(streams)) if partitions is None else partitions:
                if p == 0:
                    out._partitions[0] = main
                    continue
                store = await Store.open(
                    partition_path(path, p),
                    synchronous=synchronous,
                    busy_timeout_ms=busy_timeout_ms,
                    cache_mb=cache_mb,
                )
                out._owned.append(store)
                out._partitions[p] = store
        except BaseException:
            await out.close()
            raise
        return out

    async def _check_layout(self, adopt: bool) -> None:
        n = len(self._streams)
        recorded = await self.main.meta(LAYOUT_KEY)
        if recorded is not None and int(recorded) == n:
            return
        if not adopt:
            if recorded is not None:
                raise StoreLayoutError(
                    f"store {self.main.path} was written for {recorded} partition(s), the "
                    f"configuration has streams.partitions = {n}"
                )
            stray = [s for s, p in self._streams.items() if p > 0 and await self.main.offset(s)]
            if stray:
                raise StoreLayoutError(
                    f"store {self.main.path} holds the state of partitions other than 0 "
                    f"({', '.join(stray)}): it predates one file per partition; "
                    "run `caresync replay rebuild` to rebuild it into that layout"
                )
        await self.main.set_meta(LAYOUT_KEY, str(n))

    async def close(self) -> None:
        """Close the files this object opened."""
        owned, self._owned = self._owned, []
        for store in reversed(owned):
            await store.close()

    async def __aenter__(self) -> PartitionedStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- which file ----------------------------------------------------------------------------
    def of(self, partition: int) -> Store:
        """The store of one partition (KeyError if this process did not open it)."""
        return self._partitions[partition]

    def for_stream(self, stream: str) -> Store:
        """The store that keeps ``stream``'s offset: its partition's, else the main one."""
        p = self._streams.get(stream)
        return self.main if p is None else self._partitions[p]

    def distinct(self, partitions: Iterable[int] | None = None) -> list[Store]:
        """Each file once (of ``partitions``, default every open one), in partition order."""
        chosen = sorted(self._partitions) if partitions is None else sorted(partitions)
        out: list[Store] = []
        for p in chosen:
            store = self._partitions[p]
            if all(store is not s for s in out):
                out.append(store)
        return out

    def _all(self) -> list[Store]:
        stores = self.distinct()
        return stores if any(s is self.main for s in stores) else [self.main, *stores]

    # -- shared tables (main file) --------------------------------------------------------------
    @property
    def ingest(self) -> IngestLog:
        """What became of raw source messages (main file)."""
        return self.main.ingest

    # -- reads across files ---------------------------------------------------------------------
    async def _first(self, read: Callable[[Store], Awaitable[T | None]]) -> T | None:
        """What the first file to have it answers (an entity is only ever in one file)."""
        for store in self._all():
            found = await read(store)
            if found is not None:
                return found
        return None

    async def offset(self, stream: str) -> int:
        """Highest sequence of ``stream`` applied and committed (0 if none)."""
        return await self.for_stream(stream).offset(stream)

    async def load_entities(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], EntityRow]:
        """Snapshots of the given (kind, id) keys that exist, from every partition."""
        found: dict[tuple[str, str], EntityRow] = {}
        for store in self._all():
            found |= await store.load_entities([k for k in keys if k not in found])
        return found

    async def entity(self, kind: str, id: str) -> EntityRow | None:
        """The snapshot of one entity, from whichever partition holds it."""
        return await self._first(lambda store: store.entity(kind, id))

    async def entities(self, kind: str | None = None) -> list[EntityRow]:
        """All snapshots (of one kind), ordered by kind and id."""
        rows = [row for store in self._all() for row in await store.entities(kind)]
        return sorted(rows, key=lambda r: (r.kind, r.id))

    async def ids_ending(self, kind: str, suffix: str, limit: int = 10) -> list[str]:
        """Ids of ``kind`` ending with ``suffix``, over every partition."""
        found: list[str] = []
        for store in self._all():
            found += await store.ids_ending(kind, suffix, limit - len(found))
            if len(found) >= limit:
                break
        return found

    async def parked(self, kind: str | None = None, id: str | None = None) -> list[ParkedRow]:
        """Parked messages of every partition, in the order they will be released."""
        rows = [row for store in self._all() for row in await store.parked(kind, id)]
        return sorted(rows, key=lambda r: (r.kind, r.id, r.stream, r.seq))

    async def applied_record(
        self, kind: str, entity: str, command_id: str
    ) -> tuple[str, str, int] | None:
        """(outcome, reason, stream seq) of a command of one entity, or None."""
        return await self._first(lambda store: store.applied_record(kind, entity, command_id))

    async def outbox_headers(self, key: str) -> dict[str, str] | None:
        """Headers of one outbox row, or None if no partition has it."""
        return await self._first(lambda store: store.outbox_headers(key))

    async def outbox_row(self, key: str) -> tuple[str, bytes] | None:
        """(subject, payload) of one outbox row, or None if no partition has it."""
        return await self._first(lambda store: store.outbox_row(key))

    async def counts(self, partitions: Iterable[int] | None = None) -> dict[str, int]:
        """Row counts summed over the files (of ``partitions`` only, if given)."""
        total: dict[str, int] = {}
        for store in self._all() if partitions is None else self.distinct(partitions):
            for name, n in (await store.counts()).items():
                total[name] = total.get(name, 0) + n
        return total

    async def reset_state(self) -> None:
        """Drop derived state in every file (``replay rebuild``)."""
        for store in self._all():
            await store.reset_state()


PARTITIONED_TABLES = ("entities", "applied", "outbox", "parked", "offsets")


def partition_files(main: Path) -> list[Path]:
    """The main file and every partition file beside it, in partition order."""
    found: list[tuple[int, Path]] = []
    for path in main.parent.glob(f"{main.stem}.p*{main.suffix}"):
        number = path.name[len(main.stem) + 2 : len(path.name) - len(main.suffix)]
        if number.isdigit():
            found.append((int(number), path))
    return [main, *(path for _, path in sorted(found))]


def read_only_union(main: Path, *, timeout_s: float = 10.0) -> sqlite3.Connection:
    """A read-only connection to a store, its partition files attached: a query of the
    partitioned tables (unqualified) reads every partition, through temporary views.

    For tools and benchmarks that read a stopped (or running) router's store with plain
    SQL; at most SQLite's limit of attached files (10).
    """
    conn = sqlite3.connect(f"file:{main}?mode=ro", uri=True, timeout=timeout_s)
    try:
        schemas = ["main"]
        for p, path in enumerate(partition_files(main)[1:], start=1):
            conn.execute("ATTACH DATABASE ? AS ?", (f"file:{path}?mode=ro", f"p{p}"))
            schemas.append(f"p{p}")
        if len(schemas) > 1:
            for table in PARTITIONED_TABLES:
                union = " UNION ALL ".join(f"SELECT * FROM {s}.{table}" for s in schemas)
                conn.execute(f"CREATE TEMP VIEW {table} AS {union}")
    except BaseException:
        conn.close()
        raise
    return conn
