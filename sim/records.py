"""The simulated systems' own records, in one SQLite file (aiosqlite, WAL).

Each system keeps what it was asked to create, keyed by the caller's idempotency key the way a
real ERP keys by external reference: a repeated key adds an attempt to the existing record and
never a second one.  References are numbered per system and kind (``PO-000001``).  Feedback
the systems send back to caresync goes through an outbox committed with the record that
caused it, so that a PO acknowledgement is never lost when NATS is unreachable.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite
import anyio

from caresync.sim.errors import SimUnavailable
from caresync.sim.schema import (
    DDL,
    PRAGMAS,
    RECORD_COLUMNS,
    CounterName,
    FeedbackRow,
    NewRecord,
    Outcome,
    SimRecord,
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Records:
    """One SQLite database; use as ``async with await Records.open(path) as records``."""

    def __init__(
        self, conn: aiosqlite.Connection, path: Path, last: dict[tuple[str, str], int]
    ) -> None:
        self._conn = conn
        self.path = path
        self._lock = anyio.Lock()  # one connection: transactions must not interleave
        # Reference numbers are allocated in memory (one statement per request, not three)
        # and saved with the transaction that used them; a rollback restores them.
        self._last = last

    @classmethod
    async def open(cls, path: Path) -> Records:
        """Open (creating if needed) the database at ``path``; raises SimUnavailable."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = await aiosqlite.connect(path, isolation_level=None)
            for stmt in (*PRAGMAS, *DDL):
                await conn.execute(stmt)
            async with conn.execute("SELECT system, prefix, last FROM sequences") as cur:
                last = {(str(r[0]), str(r[1])): int(r[2]) for r in await cur.fetchall()}
        except sqlite3.Error as exc:
            raise SimUnavailable(f"opening simulator records {path}: {exc}") from exc
        return cls(conn, path, last)

    async def close(self) -> None:
        """Close the database (idempotent)."""
        await self._conn.close()

    async def __aenter__(self) -> Records:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.close()

    @asynccontextmanager
    async def _tx(self, what: str) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            before = dict(self._last)
            try:
                await self._conn.execute("BEGIN IMMEDIATE")
                yield self._conn
                await self._save_sequences(before)
                await self._conn.execute("COMMIT")
            except BaseException as exc:
                self._last = before
                with anyio.CancelScope(shield=True):
                    if self._conn.in_transaction:
                        try:
                            await self._conn.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass  # the connection reports the original error below
                if isinstance(exc, sqlite3.Error):
                    raise SimUnavailable(f"{what}: {exc}") from exc
                raise

    async def _save_sequences(self, before: dict[tuple[str, str], int]) -> None:
        changed = [(s, p, n) for (s, p), n in self._last.items() if before.get((s, p)) != n]
        if changed:
            await self._conn.executemany(
                "INSERT INTO sequences (system, prefix, last) VALUES (?, ?, ?) "
                "ON CONFLICT (system, prefix) DO UPDATE SET last = excluded.last",
                changed,
            )

    async def _fetch(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            async with self._conn.execute(sql, args) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise SimUnavailable(f"reading simulator records: {exc}") from exc

    def _proposed(self, system: str, prefix: str) -> str:
        return f"{prefix}-{self._last.get((system, prefix), 0) + 1:06d}"

    def _allocate(self, system: str, prefix: str) -> str:
        reference = self._proposed(system, prefix)
        self._last[(system, prefix)] = self._last.get((system, prefix), 0) + 1
        return reference

    async def record(self, request: NewRecord) -> Outcome:
        """:meth:`record_many` of one request."""
        return (await self.record_many([request]))[0]

    async def record_many(self, requests: Sequence[NewRecord]) -> list[Outcome]:
        """Record each request in order, in one transaction: a new record, or one more attempt.

        A key already held for the same operation is a duplicate (attempts + 1); a key held
        for another operation is left untouched and its record returned.  ``feedback`` of a
        request is called only for a new record; its row is queued in the outbox in the same
        transaction.  Raises SimUnavailable on database errors (nothing is recorded then).
        """
        outcomes: list[Outcome] = []
        if not requests:
            return outcomes
        async with self._tx("recording requests") as conn:
            for r in requests:
                proposed, now = self._proposed(r.system, r.reference_prefix), _now()
                async with conn.execute(
                    f"INSERT INTO records ({RECORD_COLUMNS}, last_attempt_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?) ON CONFLICT (system, key) DO UPDATE "
                    "SET attempts = attempts + 1, last_attempt_at = excluded.last_attempt_at "
                    "WHERE operation = excluded.operation RETURNING reference, attempts",
                    (r.system, r.operation, r.key, proposed, r.entity, r.data, now, now),
                ) as cur:
                    row = await cur.fetchone()
                if row is None:  # the key belongs to another operation
                    async with conn.execute(
                        "SELECT reference, attempts, operation FROM records "
                        "WHERE system = ? AND key = ?",
                        (r.system, r.key),
                    ) as cur:
                        other = await cur.fetchone()
                    assert other is not None
                    outcomes.append(Outcome(False, str(other[0]), int(other[1]), str(other[2])))
                    continue
                created = int(row[1]) == 1 and str(row[0]) == proposed
                if created:
                    self._allocate(r.system, r.reference_prefix)
                    feedback = r.feedback(proposed) if r.feedback is not None else None
                    if feedback is not None:
                        await self._queue(conn, feedback)
                outcomes.append(Outcome(created, str(row[0]), int(row[1]), r.operation))
        return outcomes

    async def count(self, system: str, operation: str, counter: CounterName, n: int = 1) -> None:
        """Add ``n`` to a counter (errors returned, requests refused while down)."""
        await self.count_many([(system, operation, counter, n)])

    async def count_many(self, counts: Sequence[tuple[str, str, CounterName, int]]) -> None:
        """Add to several counters, each ``(system, operation, counter, n)``, at once."""
        if not counts:
            return
        async with self._tx("counting") as conn:
            await conn.executemany(
                "INSERT INTO counters (system, operation, name, n) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (system, operation, name) DO UPDATE SET n = n + excluded.n",
                counts,
            )

    async def select(self, system: str, operation: str | None = None) -> list[SimRecord]:
        """Every record of ``system`` (optionally of one operation), oldest first."""
        sql = f"SELECT {RECORD_COLUMNS} FROM records WHERE system = ?"
        args: tuple[str, ...] = (system,)
        if operation is not None:
            sql, args = sql + " AND operation = ?", (system, operation)
        rows = await self._fetch(sql + " ORDER BY rowid", args)
        return [SimRecord(*row) for row in rows]

    async def find(self, system: str, operation: str, field: str, value: str) -> SimRecord | None:
        """The record whose reference, or data field ``field``, equals ``value``."""
        rows = await self._fetch(
            f"SELECT {RECORD_COLUMNS} FROM records WHERE system = ? AND operation = ? "
            "AND (reference = ? OR json_extract(data, ?) = ?) ORDER BY rowid LIMIT 1",
            (system, operation, value, f"$.{field}", value),
        )
        return SimRecord(*rows[0]) if rows else None

    async def knows(self, system: str, field: str, value: str) -> bool:
        """Whether any record of ``system`` has data field ``field`` equal to ``value``."""
        rows = await self._fetch(
            "SELECT 1 FROM records WHERE system = ? AND json_extract(data, ?) = ? LIMIT 1",
            (system, f"$.{field}", value),
        )
        return bool(rows)

    async def update_claim(
        self, appointment_id: str, build: Callable[[str, int], FeedbackRow]
    ) -> FeedbackRow:
        """Number one more claim status update; ``build(claim_id, n)`` makes its feedback."""
        async with self._tx("updating a claim") as conn:
            async with conn.execute(
                "UPDATE claims SET updates = updates + 1 WHERE appointment_id = ? "
                "RETURNING claim_id, updates",
                (appointment_id,),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                claim_id, n = self._allocate("billing", "CLM"), 1
                await conn.execute(
                    "INSERT INTO claims VALUES (?, ?, 1)", (appointment_id, claim_id)
                )
            else:
                claim_id, n = str(row[0]), int(row[1])
            out = build(claim_id, n)
            await self._queue(conn, out)
            return out

    async def queue_feedback(self, row: FeedbackRow) -> None:
        """Put a feedback command in the outbox (a known id is left as it is)."""
        async with self._tx("queueing feedback") as conn:
            await self._queue(conn, row)

    @staticmethod
    async def _queue(conn: aiosqlite.Connection, row: FeedbackRow) -> None:
        await conn.execute(
            "INSERT OR IGNORE INTO feedback (id, subject, payload) VALUES (?, ?, ?)",
            (row.id, row.subject, row.payload),
        )

    async def pending_feedback(self, limit: int) -> list[FeedbackRow]:
        """Up to ``limit`` unsent feedback rows, in the order they were queued."""
        rows = await self._fetch(
            "SELECT id, subject, payload FROM feedback WHERE sent_at IS NULL ORDER BY seq LIMIT ?",
            (limit,),
        )
        return [FeedbackRow(str(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    async def mark_sent(self, feedback_id: str) -> None:
        """Record that the feedback ``feedback_id`` was stored by JetStream."""
        async with self._tx("marking feedback sent") as conn:
            await conn.execute(
                "UPDATE feedback SET sent_at = ? WHERE id = ?", (_now(), feedback_id)
            )

    async def is_sent(self, feedback_id: str) -> bool:
        """Whether the feedback ``feedback_id`` has been sent."""
        rows = await self._fetch("SELECT sent_at FROM feedback WHERE id = ?", (feedback_id,))
        return bool(rows) and rows[0][0] is not None

    async def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per system and operation: ``created``, ``duplicates``, ``errors``, ``refused``."""
        out: dict[str, dict[str, dict[str, int]]] = {}

        def slot(system: str, operation: str) -> dict[str, int]:
            ops = out.setdefault(system, {})
            return ops.setdefault(
                operation, {"created": 0, "duplicates": 0, "errors": 0, "refused": 0}
            )

        for system, operation, created, duplicates in await self._fetch(
            "SELECT system, operation, COUNT(*), SUM(attempts - 1) FROM records "
            "GROUP BY system, operation"
        ):
            slot(system, operation).update(created=int(created), duplicates=int(duplicates))
        for system, operation, name, n in await self._fetch(
            "SELECT system, operation, name, n FROM counters"
        ):
            slot(system, operation)[name] = int(n)
        return out

    async def feedback_counts(self) -> dict[str, int]:
        """How many feedback commands were sent and how many wait in the outbox."""
        rows = await self._fetch("SELECT COUNT(sent_at), COUNT(*) - COUNT(sent_at) FROM feedback")
        return {"sent": int(rows[0][0]), "pending": int(rows[0][1])}
