"""Reading a fault deployment's stores, read-only (the router may be writing meanwhile): the
router's SQLite store (states, ledgers, progress) and the simulators' own records.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from caresync.actors import default_registry
from caresync.actors.ledger import Ledger
from caresync.bench.faults_deploy import SYSTEMS
from caresync.store import read_only_union


def read_only(path: Path) -> closing[sqlite3.Connection]:
    """A read-only connection (every partition file of a store), closed at the end of its
    ``with`` block."""
    return closing(read_only_union(path))


_registry = default_registry()
_state_decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {
    name: msgspec.msgpack.Decoder(kind.state_type) for name, kind in _registry.kinds.items()
}


def read_states(db_path: Path, kinds: Sequence[str] | None = None) -> dict[tuple[str, str], Any]:
    """Every entity's committed state (of ``kinds``), decoded."""
    sql = "SELECT kind, id, state FROM entities"
    args: tuple[str, ...] = ()
    if kinds is not None:
        sql += f" WHERE kind IN ({','.join('?' * len(kinds))})"
        args = tuple(kinds)
    with read_only(db_path) as conn:
        rows = conn.execute(sql, args).fetchall()
    return {(kind, id_): _state_decoders[kind].decode(raw) for kind, id_, raw in rows}


LEDGER_OWNERS: dict[str, str] = {
    "billing": "billing",
    "supply": "supply",
    "erp": "erp",
    "purchasing": "erp",
}
"""Actor kinds that keep a sync ledger, to the system it is with (purchasing: ERP's POs)."""


def ledgers(states: Mapping[tuple[str, str], Any]) -> dict[str, list[tuple[str, Ledger]]]:
    """Per system, (kind/entity, ledger) of every sync ledger its owning actors keep."""
    out: dict[str, list[tuple[str, Ledger]]] = {s: [] for s in SYSTEMS}
    for (kind, id_), state in states.items():
        system = LEDGER_OWNERS.get(kind)
        if system is not None:
            out[system].append((f"{kind}/{id_}", state.ledger))
    return out


def open_keys(db_path: Path) -> dict[str, int]:
    """Per system, effects sent and not yet acknowledged (pending keys of every ledger)."""
    found = ledgers(read_states(db_path, tuple(LEDGER_OWNERS)))
    return {s: sum(len(ledger.pending) for _, ledger in entries) for s, entries in found.items()}


@dataclass(frozen=True, slots=True)
class SimRecord:
    """One record a simulated system holds (its own row)."""

    system: str
    operation: str
    key: str
    reference: str
    attempts: int
    data: dict[str, Any]


def sim_records(sim_db: Path) -> list[SimRecord]:
    """Everything the simulators hold, oldest first."""
    if not sim_db.exists():
        return []
    with read_only(sim_db) as conn:
        rows = conn.execute(
            "SELECT system, operation, key, reference, attempts, data FROM records ORDER BY rowid"
        ).fetchall()
    return [SimRecord(s, o, k, r, int(a), json.loads(d)) for s, o, k, r, a, d in rows]


def progress(db_path: Path) -> int:
    """Commands applied plus downstream calls recorded: grows as the deployment works."""
    if not db_path.exists():
        return 0
    try:
        with read_only(db_path) as conn:
            applied = conn.execute("SELECT count(*) FROM applied").fetchone()[0]
            calls = conn.execute("SELECT count(*) FROM downstream_calls").fetchone()[0]
    except sqlite3.Error:
        return 0
    return int(applied) + int(calls)
