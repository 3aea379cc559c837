"""A state snapshot of one store file: its derived state at one committed offset, as a file.

What a rebuild would fold from the input streams (entity snapshots, dedupe records, parked
messages, offsets) is copied with the outbox rows not yet confirmed sent into a small SQLite
file of the same schema, in one read transaction: every row is as the pipeline committed it
with the offsets stored beside it, whatever the router does meanwhile (WAL readers do not wait
for the writer, nor it for them).  :func:`restore_state_file` puts such a file back into a
store, replacing its derived state; a rebuild then folds only the streams' tail past the
offsets.  :mod:`caresync.router.snapshots` keeps these files in JetStream.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiosqlite
import orjson

from caresync.store.errors import map_sqlite_error
from caresync.store.schema import DDL, DERIVED_TABLES, SCHEMA_VERSION
from caresync.store.sqlite import Store, _rollback

FORMAT = 1
"""Version of the snapshot file's layout."""
_OUTBOX_COLUMNS = "key, subject, payload, headers, status, created_at, sent_at, attempts, error"


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What a snapshot file holds, read from its meta table."""

    streams: tuple[str, ...]
    """The input streams whose state the file holds (those of one store file)."""
    offsets: dict[str, int]
    """Per stream, the last sequence applied in this state (0: nothing yet)."""
    schema_version: int
    logic: str
    """Fingerprint of the code that derived the state (:func:`logic_fingerprint`)."""
    created_at: float
    rows: dict[str, int] = field(default_factory=dict)
    """Row count per table (the outbox: rows not confirmed sent)."""
    extra: dict[str, str] = field(default_factory=dict)
    """What the writer added (the streams' identities, for one)."""
    size: int = 0
    """The file's size in bytes (not kept inside it)."""


def _table_ddl(table: str) -> str:
    for stmt in DDL:
        if stmt.startswith(f"CREATE TABLE IF NOT EXISTS {table} "):
            return stmt
    raise KeyError(table)


def write_state_file(
    store_path: Path,
    dest: Path,
    *,
    streams: Sequence[str],
    logic: str,
    extra: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> SnapshotInfo:
    """Copy the derived state of the store file at ``store_path`` into a new file ``dest``.

    Blocking (plain :mod:`sqlite3`): run it in a worker thread.  The store is opened read-only
    and read in one transaction, so the copy is one commit of the pipeline, offsets included.
    """
    dest.unlink(missing_ok=True)
    conn = sqlite3.connect(f"file:{dest}", uri=True, timeout=timeout_s, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("ATTACH DATABASE ? AS src", (f"file:{store_path}?mode=ro",))
        conn.execute("CREATE TABLE snapshot_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for table in (*DERIVED_TABLES, "outbox"):
            conn.execute(_table_ddl(table))
        conn.execute("BEGIN")
        rows: dict[str, int] = {}
        for table in DERIVED_TABLES:
            columns = _columns(conn, table)
            conn.execute(f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM src.{table}")
            rows[table] = _count(conn, table)
        conn.execute(
            f"INSERT INTO main.outbox ({_OUTBOX_COLUMNS}) SELECT {_OUTBOX_COLUMNS} "
            "FROM src.outbox WHERE status != 'sent' ORDER BY seq"
        )
        rows["outbox"] = _count(conn, "outbox")
        stored = dict(conn.execute("SELECT stream, seq FROM main.offsets").fetchall())
        info = SnapshotInfo(
            streams=tuple(streams),
            offsets={s: int(stored.get(s, 0)) for s in streams},
            schema_version=SCHEMA_VERSION,
            logic=logic,
            created_at=time.time(),
            rows=rows,
            extra=dict(extra or {}),
        )
        meta = {
            "format": str(FORMAT),
            "schema_version": str(info.schema_version),
            "logic": logic,
            "created_at": repr(info.created_at),
            "streams": orjson.dumps(list(info.streams)).decode(),
            "offsets": orjson.dumps(info.offsets).decode(),
            "rows": orjson.dumps(rows).decode(),
            "extra": orjson.dumps(info.extra).decode(),
        }
        conn.executemany("INSERT INTO snapshot_meta (key, value) VALUES (?, ?)", meta.items())
        conn.execute("COMMIT")
        conn.execute("DETACH DATABASE src")
    except BaseException:
        conn.close()
        dest.unlink(missing_ok=True)
        raise
    conn.close()
    return dataclasses.replace(info, size=dest.stat().st_size)


class SnapshotFileError(ValueError):
    """Raised when a file is not a snapshot this caresync can read."""


def read_state_info(path: Path) -> SnapshotInfo:
    """The meta data of a snapshot file; :class:`SnapshotFileError` names what is wrong."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise SnapshotFileError(f"{path} does not open as SQLite: {exc}") from exc
    try:
        meta = dict(conn.execute("SELECT key, value FROM snapshot_meta").fetchall())
        if meta.get("format") != str(FORMAT):
            raise SnapshotFileError(
                f"snapshot format {meta.get('format')!r}, this caresync reads {FORMAT}"
            )
        return SnapshotInfo(
            streams=tuple(orjson.loads(meta["streams"])),
            offsets={str(k): int(v) for k, v in orjson.loads(meta["offsets"]).items()},
            schema_version=int(meta["schema_version"]),
            logic=meta["logic"],
            created_at=float(meta["created_at"]),
            rows={str(k): int(v) for k, v in orjson.loads(meta["rows"]).items()},
            extra={str(k): str(v) for k, v in orjson.loads(meta["extra"]).items()},
            size=path.stat().st_size,
        )
    except (sqlite3.Error, KeyError, ValueError, TypeError, orjson.JSONDecodeError) as exc:
        if isinstance(exc, SnapshotFileError):
            raise
        raise SnapshotFileError(f"{path} is not a caresync state snapshot: {exc}") from exc
    finally:
        conn.close()


async def restore_state_file(store: Store, path: Path) -> list[str]:
    """Replace the store's derived state with the snapshot's, in one transaction.

    The outbox keeps its rows; the snapshot's rows it does not have are added with their
    status.  Returns the keys of the rows added as pending: the caller asks the streams
    whether they were sent after the snapshot (and commits those as sent).
    """
    conn = store.connection
    async with store.write_lock:
        try:
            await conn.execute("ATTACH DATABASE ? AS snap", (str(path),))
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, f"attaching snapshot {path}") from exc
        try:
            await conn.execute("BEGIN IMMEDIATE")
            # Secondary indexes are built after the rows, in one sort: kept up row by row in
            # another order than the key's, they cost 40 % of a restore.
            indexes = _indexes(DERIVED_TABLES)
            for name, _ in indexes:
                await conn.execute(f"DROP INDEX IF EXISTS main.{name}")
            for table in DERIVED_TABLES:
                columns = await _columns_async(conn, table)
                await conn.execute(f"DELETE FROM main.{table}")
                await conn.execute(
                    f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM snap.{table}"
                )
            for _, create in indexes:
                await conn.execute(create)
            async with conn.execute(
                "SELECT key FROM snap.outbox WHERE status = 'pending' "
                "AND key NOT IN (SELECT key FROM main.outbox)"
            ) as cur:
                added = [key for (key,) in await cur.fetchall()]
            await conn.execute(
                f"INSERT INTO main.outbox ({_OUTBOX_COLUMNS}) SELECT {_OUTBOX_COLUMNS} "
                "FROM snap.outbox WHERE key NOT IN (SELECT key FROM main.outbox) ORDER BY seq"
            )
            await conn.execute("COMMIT")
        except sqlite3.Error as exc:
            await _rollback(conn)
            raise map_sqlite_error(exc, f"restoring snapshot {path}") from exc
        finally:
            await conn.execute("DETACH DATABASE snap")
    return added


def _indexes(tables: Sequence[str]) -> list[tuple[str, str]]:
    """(name, CREATE statement) of the schema's secondary indexes on ``tables``."""
    out = []
    for stmt in DDL:
        words = stmt.split()
        if words[:5] == ["CREATE", "INDEX", "IF", "NOT", "EXISTS"] and words[7] in tables:
            out.append((words[5], stmt))
    return out


def _columns(conn: sqlite3.Connection, table: str) -> str:
    return ", ".join(row[1] for row in conn.execute(f"PRAGMA main.table_info({table})"))


async def _columns_async(conn: aiosqlite.Connection, table: str) -> str:
    # The snapshot's columns: a store migrated in place has the same ones, maybe in
    # another order, so they are named.
    async with conn.execute(f"PRAGMA snap.table_info({table})") as cur:
        return ", ".join(row[1] for row in await cur.fetchall())


def _count(conn: sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM main.{table}").fetchone()[0])
