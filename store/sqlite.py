"""The router's store on SQLite (aiosqlite, WAL): snapshots, dedupe, outbox, parking, offsets."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import aiosqlite
import anyio
import orjson

from caresync.store.batch_write import write_batch
from caresync.store.errors import StoreError, StoreSchemaError, map_sqlite_error
from caresync.store.ingest import IngestLog
from caresync.store.records import BatchWrite, EntityRow, ParkedRow, PendingEffect
from caresync.store.schema import DDL, DERIVED_TABLES, MIGRATIONS, PRAGMAS, SCHEMA_VERSION

_CHUNK = 512
"""Keys per read statement (SQLite's default limit on host parameters is 32766 in current
builds: well below)."""


def key_chunks(keys: Sequence[tuple[str, ...]]) -> Iterator[tuple[int, list[str]]]:
    """``keys`` in statements of a power-of-two number of keys (up to :data:`_CHUNK`), the
    last key repeated to fill one: (keys in the statement, its parameters).

    So a read's SQL text is one of ten per query, and each stays prepared in the connection's
    statement cache: preparing one for a few hundred keys costs ~0.4 ms, ~1 us per key, as
    much as the lookups (a batch of 500 keys with a varying count: 3.2 against 2.4 us per
    key).  A key repeated is found twice: the callers keep results in a set or a dict.
    """
    for i in range(0, len(keys), _CHUNK):
        chunk = list(keys[i : i + _CHUNK])
        n = 1 << (len(chunk) - 1).bit_length()
        chunk += [chunk[-1]] * (n - len(chunk))
        yield n, [part for key in chunk for part in key]


def _load_headers(raw: bytes | None) -> dict[str, str] | None:
    return orjson.loads(raw) if raw else None


# Both hot-path reads join a VALUES list of keys with CROSS JOIN, which keeps the keys as the
# outer loop: one primary-key lookup per key.  A row-value ``IN (VALUES ...)`` looks the same
# but makes SQLite scan the whole table (measured: throughput fell as the table grew).
def entities_query(n: int) -> str:
    """SQL reading the snapshots of ``n`` (kind, id) keys."""
    values = ",".join("(?, ?)" for _ in range(n))
    return (
        f"WITH k(kind, id) AS (VALUES {values}) "
        "SELECT e.kind, e.id, e.state, e.parked, e.seq FROM k CROSS JOIN entities e "
        "ON e.kind = k.kind AND e.id = k.id"
    )


def applied_query(n: int) -> str:
    """SQL finding which of ``n`` (kind, entity, command id) keys have a dedupe record."""
    values = ",".join("(?, ?, ?)" for _ in range(n))
    return (
        f"WITH k(kind, entity, command_id) AS (VALUES {values}) "
        "SELECT a.kind, a.entity, a.command_id FROM k CROSS JOIN applied a "
        "ON a.kind = k.kind AND a.entity = k.entity AND a.command_id = k.command_id"
    )


@dataclass(frozen=True, slots=True)
class CallRow:
    """One attempt at delivering an effect to a downstream system (see :meth:`Store.calls`)."""

    effect_key: str
    system: str
    operation: str
    attempt: int
    outcome: str
    """``created``, ``duplicate``, ``transient`` (retried) or ``failed`` (given up)."""
    error: str
    reference: str
    at: float
    """When the attempt ended, in epoch seconds."""


DEFAULT_CACHE_MB = 32
"""Page cache of the connection that commits ([store] cache_mb).  SQLite's default is 2 MiB:
a batch's rows land on random pages of the dedupe and outbox indexes, which then had to be
read back into the cache on most inserts.  fanout, 1 process, 2 interleaved pairs: 3,801 /
3,833 against 3,570 / 3,545 commands/s (commit stage 68-75 against 79-80 ms per batch); the
same cache on the point reader too gained nothing more.  Costs up to this much RSS per store
file once the database is that big (100k bookings: idle RSS 131 -> 181 MB with 32 MiB on
both connections)."""

BACKGROUND_AUTOCHECKPOINT_PAGES = 100_000
"""SQLite's own checkpoint threshold (pages of 4 KiB, ~400 MB of log) while a background
checkpointer runs (:meth:`Store.checkpoint`); SQLite's default is 1,000.

Under a steady load the log grows to it, and the checkpoint SQLite then runs inside a commit
stalls that commit (40-50 ms here: it syncs the log and the database file).  The background
checkpoints copy every frame, but they cannot restart the log: the writer restarts it only
when it starts a transaction with the log entirely copied, and commits go on while a
checkpoint syncs (20-30 ms), so that never happens by itself.  So the threshold is how often
a commit pays for it: at 25,000 pages, every ~0.9 s at 2,100 commands/s (`bench latency
--latency-n 20000`: p99 at 50 % of peak 31.8-37.3 ms, 3 runs); at 100,000, every ~3.6 s
(24.6 ms; mean commit 7.5 ms against ~10).  The price is disk: the log file keeps its
largest size, up to ~400 MB per store file, and a crash's recovery reads it."""


class Store:
    """One SQLite database; use as ``async with await Store.open(path) as store``.

    Every write of a batch goes through :meth:`commit`, one transaction.  Reads used on the
    hot path (:meth:`load_entities`, :meth:`applied_among`) take a whole batch of keys at once.
    """

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        # One connection serves every partition worker: transactions must not interleave.
        self._write_lock = anyio.Lock()
        self._checkpointer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._reader_lock = anyio.Lock()
        self._closed = False

    @property
    def connection(self) -> aiosqlite.Connection:
        """The one connection (for the store's topic modules, such as the ingest log)."""
        return self._conn

    @property
    def write_lock(self) -> anyio.Lock:
        """Held around every write transaction: transactions must not interleave."""
        return self._write_lock

    @property
    def ingest(self) -> IngestLog:
        """What became of raw source messages (HL7 v2, FHIR)."""
        return IngestLog(self)

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        synchronous: Literal["normal", "full"] = "normal",
        busy_timeout_ms: int = 5000,
        cache_mb: int = DEFAULT_CACHE_MB,
    ) -> Store:
        """Open (creating if needed) the database at ``path`` and migrate its schema.

        ``cache_mb`` is the page cache of this connection, the one that commits (see
        :data:`DEFAULT_CACHE_MB`)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = await aiosqlite.connect(path, isolation_level=None)
            for pragma in PRAGMAS:
                await conn.execute(pragma)
            await conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            await conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            await conn.execute(f"PRAGMA cache_size=-{int(cache_mb) * 1024}")
            for stmt in DDL:
                await conn.execute(stmt)
            for table, column, definition in MIGRATIONS:
                async with conn.execute(f"PRAGMA table_info({table})") as cur:
                    columns = {row[1] for row in await cur.fetchall()}
                if column not in columns:
                    await conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, f"opening store {path}") from exc
        store = cls(conn, path)
        try:
            await store._check_version()
        except BaseException:
            await conn.close()
            raise
        return store

    async def _check_version(self) -> None:
        async with self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'") as cur:
            row = await cur.fetchone()
        if row is None:
            await self._conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row[0]) > SCHEMA_VERSION:
            raise StoreSchemaError(
                f"store {self.path} has schema version {row[0]}, this caresync understands "
                f"up to {SCHEMA_VERSION}"
            )

    async def meta(self, key: str) -> str | None:
        """A value of the store's meta table, or None."""
        async with self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        """Set a value of the store's meta table."""
        async with self._write_lock:
            try:
                await self._conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
            except sqlite3.Error as exc:
                raise map_sqlite_error(exc, f"writing {key} to the store's meta table") from exc

    async def close(self) -> None:
        """Close the database (idempotent).  Shielded: a close cut short by a cancellation
        would leave connection threads that keep the process from exiting."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            for extra in (self._checkpointer, self._reader):
                if extra is not None:
                    await extra.close()
            self._checkpointer = self._reader = None
            await self._conn.close()

    async def _side_connection(self, busy_timeout_ms: int) -> aiosqlite.Connection:
        """Another connection to the same file.  Opened shielded from cancellation: a
        connection lost between its creation and its owner would keep its thread (and the
        process) alive."""
        with anyio.CancelScope(shield=True):
            conn = await aiosqlite.connect(self.path, isolation_level=None)
            try:
                await conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            except BaseException:
                await conn.close()
                raise
        return conn

    async def _read_conn(self) -> aiosqlite.Connection:
        """A second connection (and thread) for the hot-path reads, so that the next batch's
        reads do not queue behind this batch's commit on the writer's thread.  It sees only
        committed data (WAL); the worker accounts for the batch being committed."""
        async with self._reader_lock:  # partitions read concurrently: open it once
            if self._reader is None:
                if self._closed:
                    return self._conn  # closed: the caller gets the writer's "closed" error
                self._reader = await self._side_connection(5000)
            return self._reader

    async def checkpoint(self) -> tuple[int, int]:
        """Copy the write-ahead log into the database from a second connection, off the
        commit path; returns (frames in the log, frames copied).

        SQLite's automatic checkpoint runs inside the commit that crosses its threshold and
        syncs the database file there: a stall of the pipeline at random batches.  A PASSIVE
        checkpoint never blocks the writer.  Once this is called, the automatic one is moved
        far out (:data:`BACKGROUND_AUTOCHECKPOINT_PAGES`), a safety net should the caller stop.
        """
        if self._closed:
            return 0, 0
        try:
            if self._checkpointer is None:
                self._checkpointer = await self._side_connection(1000)
                await self._conn.execute(
                    f"PRAGMA wal_autocheckpoint={BACKGROUND_AUTOCHECKPOINT_PAGES}"
                )
            async with self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)") as cur:
                row = await cur.fetchone()
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "checkpointing the write-ahead log") from exc
        if row is None:
            return 0, 0
        return int(row[1]), int(row[2])

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- hot path -----------------------------------------------------------------------------
    async def load_entities(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], EntityRow]:
        """Snapshots of the given (kind, id) keys that exist."""
        found: dict[tuple[str, str], EntityRow] = {}
        try:
            conn = await self._read_conn()
            for n, params in key_chunks(keys):
                async with conn.execute(entities_query(n), params) as cur:
                    for kind, id_, state, parked, seq in await cur.fetchall():
                        found[(kind, id_)] = EntityRow(kind, id_, state, bool(parked), seq)
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "loading entities") from exc
        return found

    async def applied_among(
        self, keys: Sequence[tuple[str, str, str]]
    ) -> set[tuple[str, str, str]]:
        """The (kind, entity, command id) keys among ``keys`` that already reached an outcome."""
        seen: set[tuple[str, str, str]] = set()
        try:
            conn = await self._read_conn()
            for n, params in key_chunks(keys):
                async with conn.execute(applied_query(n), params) as cur:
                    seen.update((k, e, c) for k, e, c in await cur.fetchall())
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "reading dedupe records") from exc
        return seen

    async def commit(self, write: BatchWrite) -> tuple[int, int] | None:
        """Write everything of one batch in one transaction, or nothing (raises StoreError).

        Returns the outbox seq range of the rows this batch inserted (rows whose key was
        already there keep their old seq and status), so that confirming the whole batch later
        is one UPDATE of a range.
        """
        if not write:
            return None
        conn = self._conn
        async with self._write_lock:
            return await self._commit_locked(conn, write)

    async def _commit_locked(
        self, conn: aiosqlite.Connection, write: BatchWrite
    ) -> tuple[int, int] | None:
        run_on_thread: Callable[..., Awaitable[Any]] = conn._execute
        try:
            try:
                # Inside the guard: a cancellation while waiting for the lock must not leave
                # the shared connection in an open transaction.
                await conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                await _rollback(conn)
                raise
            # Then the writes and the commit in one call on the connection's thread (one
            # hand-off instead of one per statement; aiosqlite's ``_execute`` is how its own
            # methods run there, with no public equivalent), shielded: once handed over it
            # commits or rolls back by itself, so the connection never stays in a transaction.
            with anyio.CancelScope(shield=True):
                result: tuple[int, int] | None = await run_on_thread(
                    lambda: write_batch(conn._conn, write)
                )
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "committing a batch") from exc
        return result

    # -- reads for start-up, the CLI and tests ---------------------------------------------------
    async def offset(self, stream: str) -> int:
        """Highest stream sequence applied and committed (0 if none)."""
        async with self._conn.execute("SELECT seq FROM offsets WHERE stream = ?", (stream,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def pending_effects(self, limit: int = 1000, after_seq: int = 0) -> list[PendingEffect]:
        """Outbox rows not yet confirmed, oldest first."""
        async with self._conn.execute(
            "SELECT seq, key, subject, payload, headers, attempts FROM outbox "
            "WHERE status = 'pending' AND seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [
            PendingEffect(seq, key, subject, payload, _load_headers(headers), attempts)
            for seq, key, subject, payload, headers, attempts in rows
        ]

    async def entity(self, kind: str, id: str) -> EntityRow | None:
        """The snapshot of one entity, or None."""
        found = await self.load_entities([(kind, id)])
        return found.get((kind, id))

    async def ids_ending(self, kind: str, suffix: str, limit: int = 10) -> list[str]:
        """Ids of ``kind`` that end with ``suffix`` (a bare id within qualified ones)."""
        escaped = suffix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        sql = "SELECT id FROM entities WHERE kind = ? AND id LIKE ? ESCAPE '\\' LIMIT ?"
        async with self._conn.execute(sql, (kind, "%" + escaped, limit)) as cur:
            return [str(row[0]) for row in await cur.fetchall() if str(row[0]).endswith(suffix)]

    async def entities(self, kind: str | None = None) -> list[EntityRow]:
        """All snapshots (of one kind), ordered by kind and id."""
        sql = "SELECT kind, id, state, parked, seq FROM entities"
        params: tuple[str, ...] = ()
        if kind is not None:
            sql += " WHERE kind = ?"
            params = (kind,)
        async with self._conn.execute(sql + " ORDER BY kind, id", params) as cur:
            rows = await cur.fetchall()
        return [EntityRow(k, i, s, bool(p), q) for k, i, s, p, q in rows]

    async def parked(self, kind: str | None = None, id: str | None = None) -> list[ParkedRow]:
        """Parked messages, in the order they will be released."""
        sql = (
            "SELECT kind, id, stream, seq, command_id, subject, data, headers, reason, failures, "
            "parked_at, timestamp_ns FROM parked"
        )
        params: list[str] = []
        if kind is not None and id is not None:
            sql += " WHERE kind = ? AND id = ?"
            params = [kind, id]
        async with self._conn.execute(sql + " ORDER BY kind, id, stream, seq", params) as cur:
            rows = await cur.fetchall()
        return [
            ParkedRow(k, i, st, sq, c, su, d, _load_headers(h), r, f, at, ts)
            for k, i, st, sq, c, su, d, h, r, f, at, ts in rows
        ]

    async def outcome(self, kind: str, entity: str, command_id: str) -> tuple[str, str] | None:
        """(outcome, reason) recorded for a command of one entity, or None."""
        async with self._conn.execute(
            "SELECT outcome, reason FROM applied WHERE kind = ? AND entity = ? AND command_id = ?",
            (kind, entity, command_id),
        ) as cur:
            row = await cur.fetchone()
        return (str(row[0]), str(row[1])) if row else None

    async def applied_record(
        self, kind: str, entity: str, command_id: str
    ) -> tuple[str, str, int] | None:
        """(outcome, reason, stream seq) of a command of one entity, or None."""
        async with self._conn.execute(
            "SELECT outcome, reason, seq FROM applied "
            "WHERE kind = ? AND entity = ? AND command_id = ?",
            (kind, entity, command_id),
        ) as cur:
            row = await cur.fetchone()
        return (str(row[0]), str(row[1]), int(row[2])) if row else None

    async def outbox_headers(self, key: str) -> dict[str, str] | None:
        """Headers of one outbox row (a dead letter's reason), or None if there is no row."""
        async with self._conn.execute("SELECT headers FROM outbox WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else (_load_headers(row[0]) or {})

    async def counts(self) -> dict[str, int]:
        """Row counts per table and outbox status, for status and health output."""
        out: dict[str, int] = {}
        for name, sql in (
            ("entities", "SELECT count(*) FROM entities"),
            ("parked_entities", "SELECT count(*) FROM entities WHERE parked = 1"),
            ("parked_messages", "SELECT count(*) FROM parked"),
            ("applied", "SELECT count(*) FROM applied"),
            ("outbox_pending", "SELECT count(*) FROM outbox WHERE status = 'pending'"),
            ("outbox_sent", "SELECT count(*) FROM outbox WHERE status = 'sent'"),
            ("outbox_failed", "SELECT count(*) FROM outbox WHERE status = 'failed'"),
        ):
            async with self._conn.execute(sql) as cur:
                row = await cur.fetchone()
            out[name] = int(row[0]) if row else 0
        return out

    # -- maintenance ------------------------------------------------------------------------------
    async def prune_applied(self, older_than: float) -> int:
        """Forget dedupe records older than ``older_than`` (epoch seconds); returns how many."""
        async with self._write_lock:
            try:
                cur = await self._conn.execute(
                    "DELETE FROM applied WHERE applied_at < ?", (older_than,)
                )
                return cur.rowcount
            except sqlite3.Error as exc:
                raise map_sqlite_error(exc, "pruning dedupe records") from exc

    async def prune_outbox(self, older_than: float) -> int:
        """Forget effects confirmed sent before ``older_than`` (epoch seconds).

        Safe because the streams themselves hold what was sent: a rebuild learns it from their
        Msg-Ids, not from this table.

        Rows are numbered (seq) in the order they are written, and a row is sent after it is
        written, so only the rows before the first one written since ``older_than`` are looked
        at: a few thousand each round instead of the whole table under the write lock (2M
        rows: 0.41 -> 0.09 s to forget 5,000).  A row stamped earlier than one before it (the
        clock went back) may wait for a later round; none is forgotten before its time.
        """
        async with self._write_lock:
            try:
                async with self._conn.execute(
                    "SELECT seq FROM outbox WHERE created_at >= ? ORDER BY seq LIMIT 1",
                    (older_than,),
                ) as found:
                    first_recent = await found.fetchone()
                sql, params = (
                    "DELETE FROM outbox WHERE status = 'sent' AND sent_at < ?",
                    [older_than],
                )
                if first_recent is not None:
                    sql, params = f"{sql} AND seq < ?", [older_than, first_recent[0]]
                cur = await self._conn.execute(sql, params)
                return cur.rowcount
            except sqlite3.Error as exc:
                raise map_sqlite_error(exc, "pruning the outbox") from exc

    async def reset_state(self) -> None:
        """Drop derived state (snapshots, dedupe, parking, offsets); keep the outbox.

        Used by ``replay rebuild``, which learns from the streams which effects were already
        sent, and keeps effects still waiting to be sent.
        """
        async with self._write_lock:
            await self._reset_locked()

    async def _reset_locked(self) -> None:
        try:
            await self._conn.execute("BEGIN IMMEDIATE")
            for table in DERIVED_TABLES:
                await self._conn.execute(f"DELETE FROM {table}")
            await self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            await _rollback(self._conn)
            raise map_sqlite_error(exc, "resetting state") from exc

    # -- reference data -----------------------------------------------------------------------
    async def save_refdata_version(self, version: int, effective_from_ns: int, data: bytes) -> None:
        """Keep one reference-data version (its stream seq); saving it again changes nothing.

        :meth:`reset_state` leaves these alone: they are not derived from the input streams.
        """
        async with self._write_lock:
            try:
                await self._conn.execute(
                    "INSERT INTO refdata_versions (version, effective_from_ns, data) "
                    "VALUES (?, ?, ?) ON CONFLICT (version) DO NOTHING",
                    (version, effective_from_ns, data),
                )
            except sqlite3.Error as exc:
                raise map_sqlite_error(exc, "saving a reference-data version") from exc

    async def refdata_versions(self) -> list[tuple[int, int, bytes]]:
        """Every kept reference-data version as (version, effective_from_ns, data), in order."""
        try:
            async with self._conn.execute(
                "SELECT version, effective_from_ns, data FROM refdata_versions ORDER BY version"
            ) as cur:
                rows = await cur.fetchall()
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "reading reference-data versions") from exc
        return [(int(v), int(ts), bytes(d)) for v, ts, d in rows]

    # -- downstream calls ---------------------------------------------------------------------
    async def record_call(
        self,
        effect_key: str,
        system: str,
        operation: str,
        outcome: str,
        *,
        error: str = "",
        reference: str = "",
        at: float | None = None,
    ) -> int:
        """Record one attempt at a downstream call; returns its attempt number (1, 2, ...).

        Numbers continue across redeliveries of the same effect, so the count is the total.
        """
        async with self._write_lock:
            try:
                async with self._conn.execute(
                    "INSERT INTO downstream_calls "
                    "(effect_key, system, operation, attempt, outcome, error, reference, at) "
                    "SELECT ?, ?, ?, coalesce(max(attempt), 0) + 1, ?, ?, ?, ? "
                    "FROM downstream_calls WHERE effect_key = ? RETURNING attempt",
                    (
                        effect_key,
                        system,
                        operation,
                        outcome,
                        error,
                        reference,
                        time.time() if at is None else at,
                        effect_key,
                    ),
                ) as cur:
                    row = await cur.fetchone()
            except sqlite3.Error as exc:
                raise map_sqlite_error(exc, "recording a downstream call") from exc
        return int(row[0]) if row else 0

    async def calls(self, effect_key: str | None = None) -> list[CallRow]:
        """Recorded downstream call attempts (of one effect), by effect key and attempt."""
        sql = (
            "SELECT effect_key, system, operation, attempt, outcome, error, reference, at "
            "FROM downstream_calls"
        )
        params: tuple[str, ...] = ()
        if effect_key is not None:
            sql += " WHERE effect_key = ?"
            params = (effect_key,)
        try:
            async with self._conn.execute(sql + " ORDER BY effect_key, attempt", params) as cur:
                rows = await cur.fetchall()
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "reading downstream calls") from exc
        return [
            CallRow(str(k), str(s), str(o), int(a), str(out), str(e), str(r), float(at))
            for k, s, o, a, out, e, r, at in rows
        ]

    async def failed_effects(self, system: str = "") -> list[CallRow]:
        """The effects whose latest attempt failed for good (of one system, or all)."""
        sql = (
            "SELECT c.effect_key, c.system, c.operation, c.attempt, c.outcome, c.error,"
            " c.reference, c.at FROM downstream_calls c"
            " WHERE c.outcome = 'failed' AND c.attempt = (SELECT max(attempt)"
            " FROM downstream_calls l WHERE l.effect_key = c.effect_key)"
        )
        params: tuple[str, ...] = ()
        if system:
            sql += " AND c.system = ?"
            params = (system,)
        async with self._conn.execute(sql + " ORDER BY c.at", params) as cur:
            rows = await cur.fetchall()
        return [
            CallRow(str(k), str(s), str(o), int(a), str(out), str(e), str(r), float(at))
            for k, s, o, a, out, e, r, at in rows
        ]

    async def outbox_row(self, key: str) -> tuple[str, bytes] | None:
        """Subject and payload of the effect with idempotency key ``key``, while kept."""
        async with self._conn.execute(
            "SELECT subject, payload FROM outbox WHERE key = ?", (key,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else (str(row[0]), bytes(row[1]))

    async def call_counts(self) -> dict[str, dict[str, int]]:
        """Attempts recorded per downstream system and outcome."""
        try:
            async with self._conn.execute(
                "SELECT system, outcome, count(*) FROM downstream_calls GROUP BY system, outcome"
            ) as cur:
                rows = await cur.fetchall()
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "counting downstream calls") from exc
        counts: dict[str, dict[str, int]] = {}
        for system, outcome, n in rows:
            counts.setdefault(str(system), {})[str(outcome)] = int(n)
        return counts


async def _rollback(conn: aiosqlite.Connection) -> None:
    # Shielded: when the commit was cancelled, the rollback must still reach the connection.
    # No transaction open, or the connection is gone: nothing was committed either way.
    with anyio.CancelScope(shield=True), contextlib.suppress(sqlite3.Error, ValueError):
        await conn.execute("ROLLBACK")


__all__ = ["CallRow", "Store", "StoreError"]
