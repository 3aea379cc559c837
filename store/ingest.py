"""The ingest log: what became of each raw source message, for verdicts and the CLI.

A raw message (an HL7 v2 message or batch, a FHIR resource or Bundle) becomes zero or more
canonical commands, or a rejection.  Its row is written in the same transaction as the raw
stream's offset, after the commands and dead letters were stored in their streams, so a
restart never decodes a message twice into different outcomes and never loses one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from caresync.store.errors import map_sqlite_error

if TYPE_CHECKING:
    from caresync.store.sqlite import Store


class IngestedCommand(msgspec.Struct, kw_only=True, frozen=True):
    """A canonical command one raw message became, and where it was stored."""

    kind: str
    entity: str
    id: str
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    """The input stream already had this command id (a resend of the same content)."""
    failed: str = ""
    """Why it could not be stored (no stream for its subject), empty when stored."""


class IngestRow(msgspec.Struct, kw_only=True, frozen=True):
    """One message of a raw input: decoded into commands, or rejected with a reason."""

    stream: str
    seq: int
    idx: int
    format: str
    outcome: str
    """``decoded`` or ``rejected``."""
    kind: str = ""
    entity: str = ""
    code: str = ""
    reason: str = ""
    commands: tuple[IngestedCommand, ...] = ()
    at: float = 0.0


_commands_encoder = msgspec.json.Encoder()
_commands_decoder = msgspec.json.Decoder(tuple[IngestedCommand, ...])


class IngestLog:
    """Reads and writes the ``ingest`` table of a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def record(self, rows: Sequence[IngestRow], stream: str, offset: int) -> None:
        """Write the rows of a batch and move the raw stream's offset, in one transaction."""
        conn, lock = self._store.connection, self._store.write_lock
        async with lock:
            try:
                await conn.execute("BEGIN IMMEDIATE")
                try:
                    await conn.executemany(
                        "INSERT OR REPLACE INTO ingest (stream, seq, idx, format, outcome, kind,"
                        " entity, code, reason, commands, at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        [
                            (
                                r.stream,
                                r.seq,
                                r.idx,
                                r.format,
                                r.outcome,
                                r.kind,
                                r.entity,
                                r.code,
                                r.reason,
                                _commands_encoder.encode(r.commands),
                                r.at,
                            )
                            for r in rows
                        ],
                    )
                    await conn.execute(
                        "INSERT INTO offsets (stream, seq) VALUES (?, ?) ON CONFLICT(stream)"
                        " DO UPDATE SET seq = max(seq, excluded.seq)",
                        (stream, offset),
                    )
                    await conn.execute("COMMIT")
                except BaseException:
                    await conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise map_sqlite_error(exc, "recording ingested messages") from exc

    async def rows(self, stream: str, seq: int) -> list[IngestRow]:
        """The rows of one raw message, in order."""
        return await self._select("WHERE stream = ? AND seq = ? ORDER BY idx", (stream, seq))

    async def rejected(self, limit: int = 100) -> list[IngestRow]:
        """The latest rejected messages, newest first."""
        return await self._select(
            "WHERE outcome = 'rejected' ORDER BY at DESC, seq DESC LIMIT ?", (limit,)
        )

    async def prune(self, older_than: float) -> int:
        """Forget rows older than ``older_than`` (epoch seconds)."""
        async with self._store.write_lock:
            try:
                cur = await self._store.connection.execute(
                    "DELETE FROM ingest WHERE at < ?", (older_than,)
                )
                return cur.rowcount
            except sqlite3.Error as exc:
                raise map_sqlite_error(exc, "pruning the ingest log") from exc

    async def _select(self, where: str, params: tuple[object, ...]) -> list[IngestRow]:
        sql = (
            "SELECT stream, seq, idx, format, outcome, kind, entity, code, reason, commands, at"
            f" FROM ingest {where}"
        )
        async with self._store.connection.execute(sql, params) as cur:
            found = await cur.fetchall()
        return [
            IngestRow(
                stream=r[0],
                seq=r[1],
                idx=r[2],
                format=r[3],
                outcome=r[4],
                kind=r[5],
                entity=r[6],
                code=r[7],
                reason=r[8],
                commands=_commands_decoder.decode(r[9]) if r[9] else (),
                at=r[10],
            )
            for r in found
        ]
