"""Reads of one store file on the caller's own thread, for the pipeline's batches.

A batch reads its dedupe records and entity snapshots in one query each; the commands an actor
sends to entities of the same partition are applied in the same batch, right after their cause
(see :mod:`caresync.router.local_fanout`), so their targets can only be read once the cause is
applied, and their dedupe records once the batch is.  These are indexed lookups of a few
microseconds per key: done at once on the event loop's thread they cost less than a hand-off to
the store's reader thread and back, and add nothing to a batch's latency.  A rebuild's fold
looks up the targets of local commands one by one (:meth:`PointReader.entity`,
:meth:`PointReader.applied`) while entities may be only in the store.

The connection is read-only and sees what is committed (WAL); the caller keeps what it has
applied and not yet committed in memory, as it does for the batch reads.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from caresync.store.errors import map_sqlite_error
from caresync.store.records import EntityRow
from caresync.store.sqlite import applied_query, entities_query, key_chunks


class PointReader:
    """Synchronous lookups of one entity snapshot or one dedupe record."""

    def __init__(self, path: Path) -> None:
        try:
            self._conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
            self._conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, f"opening {path} for point reads") from exc

    def entity(self, kind: str, id: str) -> EntityRow | None:
        """The snapshot of one entity, or None if it has none."""
        try:
            row = self._conn.execute(
                "SELECT state, parked, seq FROM entities WHERE kind = ? AND id = ?", (kind, id)
            ).fetchone()
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "loading an entity") from exc
        if row is None:
            return None
        return EntityRow(kind, id, row[0], bool(row[1]), row[2])

    def applied(self, kind: str, entity: str, command_id: str) -> bool:
        """Whether the command already reached an outcome at that entity (a dedupe record)."""
        try:
            row = self._conn.execute(
                "SELECT 1 FROM applied WHERE kind = ? AND entity = ? AND command_id = ?",
                (kind, entity, command_id),
            ).fetchone()
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "reading a dedupe record") from exc
        return row is not None

    def load_entities(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], EntityRow]:
        """Snapshots of the given (kind, id) keys that exist (``Store.load_entities``)."""
        found: dict[tuple[str, str], EntityRow] = {}
        try:
            for n, params in key_chunks(keys):
                for kind, id_, state, parked, seq in self._conn.execute(entities_query(n), params):
                    found[(kind, id_)] = EntityRow(kind, id_, state, bool(parked), seq)
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "loading entities") from exc
        return found

    def applied_among(self, keys: Sequence[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
        """The keys among ``keys`` that have a dedupe record (``Store.applied_among``)."""
        seen: set[tuple[str, str, str]] = set()
        try:
            for n, params in key_chunks(keys):
                seen.update((k, e, c) for k, e, c in self._conn.execute(applied_query(n), params))
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, "reading dedupe records") from exc
        return seen

    def close(self) -> None:
        """Release the connection."""
        self._conn.close()
