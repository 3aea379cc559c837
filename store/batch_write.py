"""One batch's write, in one transaction, as one synchronous call on the store's connection.

Run on the connection's own thread (:meth:`Store.commit`) once the transaction has begun: the
writes and the commit are one hand-off between the event loop and SQLite instead of one per
statement.  Each hand-off waits for the
event loop, which the router keeps busy applying the next batch; measured with the pipeline at
full load, a batch commit took ~48 ms as a chain of awaited statements against ~10 ms alone.
It also keeps the write lock of the database file for the shortest time, which matters when
several router processes share it.

Rows go in statements of :data:`ROWS_PER_STATEMENT` rows each (the rest one row per
statement): fewer GIL hand-overs between SQLite's thread and the event loop, whose CPU counts
once the router's processes fill the machine (fanout with 2 processes, 5 interleaved pairs:
median 6,410 -> 6,528 commands/s).  The row count is fixed on purpose: a cached statement
keeps its last bound values, and one statement text per batch size once kept up to 128 whole
batches of states alive (1M appointments: idle RSS 200 -> 915 MB).
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import time

import orjson
from msgspec.structs import astuple

from caresync.store.records import BatchWrite


def _dump_headers(headers: dict[str, str] | None) -> bytes | None:
    return orjson.dumps(headers) if headers else None


def write_batch(conn: sqlite3.Connection, write: BatchWrite) -> tuple[int, int] | None:
    """Write everything of one batch in the transaction the caller has begun, and commit it;
    on any error roll it back (sqlite3.Error escapes).

    Returns the outbox seq range of the rows this batch inserted (rows whose key was already
    there keep their old seq and status), so that confirming the whole batch later is one
    UPDATE of a range.
    """
    inserted: tuple[int, int] | None = None
    try:
        if write.entities:
            _insert(
                conn,
                "INSERT INTO entities (kind, id, state, parked, seq) VALUES ",
                "(?, ?, ?, ?, ?)",
                " ON CONFLICT (kind, id) DO UPDATE SET state = excluded.state, "
                "parked = excluded.parked, seq = excluded.seq",
                list(map(astuple, write.entities)),  # the columns' order, parked as 0 / 1
            )
        if write.applied:
            _insert(
                conn,
                "INSERT INTO applied "
                "(command_id, kind, entity, seq, outcome, reason, applied_at) VALUES ",
                "(?, ?, ?, ?, ?, ?, ?)",
                " ON CONFLICT DO NOTHING",
                list(map(astuple, write.applied)),  # the columns' order
            )
        if write.outbox:
            now = time.time()
            before = _last_outbox_seq(conn)
            _insert(
                conn,
                "INSERT INTO outbox "
                "(key, subject, payload, headers, created_at, status, sent_at) VALUES ",
                "(?, ?, ?, ?, ?, ?, ?)",
                " ON CONFLICT (key) DO NOTHING",
                [
                    (
                        o.key,
                        o.subject,
                        o.payload,
                        _dump_headers(o.headers),
                        now,
                        "sent" if o.sent else "pending",
                        now if o.sent else None,
                    )
                    for o in write.outbox
                ],
            )
            after = _last_outbox_seq(conn)
            if after > before:
                inserted = (before + 1, after)
        if write.parked:
            conn.executemany(
                "INSERT INTO parked (kind, id, stream, seq, command_id, subject, "
                "data, headers, reason, failures, parked_at, timestamp_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [
                    (
                        p.kind,
                        p.id,
                        p.stream,
                        p.seq,
                        p.command_id,
                        p.subject,
                        p.data,
                        _dump_headers(p.headers),
                        p.reason,
                        p.failures,
                        p.parked_at,
                        p.timestamp_ns,
                    )
                    for p in write.parked
                ],
            )
        if write.released:
            conn.executemany(
                "DELETE FROM parked WHERE kind = ? AND id = ? AND stream = ? AND seq = ?",
                write.released,
            )
        if write.sent_ranges:
            conn.executemany(
                "UPDATE outbox SET status = 'sent', sent_at = ?, attempts = attempts + 1 "
                "WHERE seq BETWEEN ? AND ? AND status = 'pending'",
                [(at, first, last) for first, last, at in write.sent_ranges],
            )
        if write.sent:
            conn.executemany(
                "UPDATE outbox SET status = 'sent', sent_at = ?, attempts = attempts + 1 "
                "WHERE key = ?",
                [(at, key) for key, at in write.sent],
            )
        if write.failed:
            conn.executemany(
                "UPDATE outbox SET status = 'failed', error = ?, attempts = attempts + 1 "
                "WHERE key = ?",
                [(err, key) for key, err in write.failed],
            )
        if write.offsets:
            conn.executemany(
                "INSERT INTO offsets (stream, seq) VALUES (?, ?) "
                "ON CONFLICT (stream) DO UPDATE SET seq = max(seq, excluded.seq)",
                list(write.offsets.items()),
            )
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return inserted


ROWS_PER_STATEMENT = 32
"""Rows per multi-row INSERT: one statement text per table, so the statement cache keeps at
most this many rows' values bound per table (see the module docstring)."""


def _insert(
    conn: sqlite3.Connection, head: str, row: str, tail: str, rows: list[tuple[object, ...]]
) -> None:
    """``head`` + ``row`` values + ``tail`` for every row: whole statements of
    :data:`ROWS_PER_STATEMENT` rows, then one-row statements for the rest."""
    n = ROWS_PER_STATEMENT
    whole = len(rows) - len(rows) % n if n > 1 else 0
    if whole:
        sql = head + ", ".join([row] * n) + tail
        flat = itertools.chain.from_iterable
        conn.executemany(sql, [tuple(flat(rows[i : i + n])) for i in range(0, whole, n)])
    if whole < len(rows):
        conn.executemany(head + row + tail, rows[whole:])


def _last_outbox_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
    return int(row[0]) if row else 0


def _rollback(conn: sqlite3.Connection) -> None:
    # No transaction open, or the connection is gone: nothing was committed either way.
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")
