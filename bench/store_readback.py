"""Read a stopped router's SQLite store (read-only): what it holds, and a digest of its state."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from caresync.store import read_only_union


def _connect(db_path: Path) -> sqlite3.Connection:
    return read_only_union(db_path)  # every partition file of the store


def entities_by_kind(db_path: Path) -> dict[str, int]:
    """Entity snapshots per kind."""
    conn = _connect(db_path)
    try:
        rows = conn.execute("SELECT kind, count(*) FROM entities GROUP BY kind ORDER BY kind")
        return {str(kind): int(count) for kind, count in rows}
    finally:
        conn.close()


def applied_commands(db_path: Path, kind: str, outcome: str = "accepted") -> int:
    """Dedupe records of ``kind`` with ``outcome`` (one per applied command)."""
    conn = _connect(db_path)
    try:
        row = conn.execute(
            "SELECT count(*) FROM applied WHERE kind = ? AND outcome = ?", (kind, outcome)
        ).fetchone()
        return int(row[0])
    finally:
        conn.close()


def outbox_by_status(db_path: Path) -> dict[str, int]:
    """Outbox rows per status (``sent``, ``pending``, ``failed``)."""
    conn = _connect(db_path)
    try:
        rows = conn.execute("SELECT status, count(*) FROM outbox GROUP BY status ORDER BY status")
        return {str(status): int(count) for status, count in rows}
    finally:
        conn.close()


def state_digest(db_path: Path) -> str:
    """A digest of every entity's (kind, id, state, parked), in key order.

    The stream seq of the last message applied is left out: it is not state.
    """
    h = hashlib.blake2b(digest_size=16)
    conn = _connect(db_path)
    try:
        cur = conn.execute("SELECT kind, id, state, parked FROM entities ORDER BY kind, id")
        while rows := cur.fetchmany(10_000):
            for kind, entity, state, parked in rows:
                h.update(f"{kind}\0{entity}\0{parked}\0{len(state)}\0".encode())
                h.update(state)
    finally:
        conn.close()
    return h.hexdigest()


def snapshot_sizes(db_path: Path) -> dict[str, dict[str, int]]:
    """Per kind: entities, mean and largest snapshot, all snapshots together (bytes).

    A snapshot is rewritten whole in every batch that touches its entity, so large ones
    (aggregates such as a facility's ERP demand) set the cost of a batch.
    """
    conn = _connect(db_path)
    try:
        rows = conn.execute(
            "SELECT kind, count(*), avg(length(state)), max(length(state)), sum(length(state)) "
            "FROM entities GROUP BY kind ORDER BY kind"
        )
        return {
            str(kind): {"count": int(n), "mean": int(mean), "max": int(top), "total": int(total)}
            for kind, n, mean, top, total in rows
        }
    finally:
        conn.close()


def sizes_text(sizes: dict[str, dict[str, int]]) -> str:
    """``erp 20 x 1.4 MB (max 1.5 MB)...``, largest total first."""
    ordered = sorted(sizes.items(), key=lambda kv: -kv[1]["total"])
    return "; ".join(
        f"{kind} {s['count']:,} x {_bytes(s['mean'])} (max {_bytes(s['max'])})"
        for kind, s in ordered
    )


def _bytes(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KB"
    return f"{n} B"
