"""Point reads of one store file on the caller's own thread, for the middle of a batch.

The pipeline reads what a batch needs from the store before applying it, in one query per
table on the store's reader thread.  A command that an actor sends to another entity of the
same partition is applied in the same batch, right after its cause (see
:mod:`caresync.router.local_fanout`), so its target's snapshot (and, in a rebuild, its dedupe
record) can only be read once the cause is applied: one indexed lookup each, a few
microseconds, which costs less done at once on the event loop's thread than handed to another
thread and awaited.

The connection is read-only and sees what is committed (WAL); the caller keeps what it has
applied and not yet committed in memory, as it does for the batch reads.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from caresync.store.errors import map_sqlite_error
from caresync.store.records import EntityRow


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

    def close(self) -> None:
        """Release the connection."""
        self._conn.close()
