"""The simulators' SQLite tables and the rows read from them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

DDL = (
    "CREATE TABLE IF NOT EXISTS records (system TEXT NOT NULL, operation TEXT NOT NULL, "
    "key TEXT NOT NULL, reference TEXT NOT NULL, entity TEXT NOT NULL, data TEXT NOT NULL, "
    "created_at TEXT NOT NULL, attempts INTEGER NOT NULL, last_attempt_at TEXT NOT NULL, "
    "PRIMARY KEY (system, key))",
    "CREATE UNIQUE INDEX IF NOT EXISTS records_reference ON records (system, reference)",
    "CREATE TABLE IF NOT EXISTS sequences (system TEXT NOT NULL, prefix TEXT NOT NULL, "
    "last INTEGER NOT NULL, PRIMARY KEY (system, prefix))",
    "CREATE TABLE IF NOT EXISTS counters (system TEXT NOT NULL, operation TEXT NOT NULL, "
    "name TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (system, operation, name))",
    "CREATE TABLE IF NOT EXISTS claims (appointment_id TEXT PRIMARY KEY, "
    "claim_id TEXT NOT NULL, updates INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS feedback (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "id TEXT NOT NULL UNIQUE, subject TEXT NOT NULL, payload BLOB NOT NULL, sent_at TEXT)",
)
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000")

CounterName = Literal["errors", "refused"]


@dataclass(frozen=True, slots=True)
class FeedbackRow:
    """A command a system sends back to caresync: its id (the Nats-Msg-Id), subject, body."""

    id: str
    subject: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class NewRecord:
    """A request to record: which system and operation, the key, and what to store."""

    system: str
    operation: str
    key: str
    entity: str
    data: str
    """The request's data object, as JSON text."""
    reference_prefix: str
    feedback: Callable[[str], FeedbackRow | None] | None = None
    """Builds the feedback a new record sends to caresync, given its reference."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What recording a request did: a new record, or one more attempt at an existing one."""

    created: bool
    reference: str
    attempts: int
    operation: str
    """Operation of the stored record (differs from the request's when a key is reused)."""


@dataclass(frozen=True, slots=True)
class SimRecord:
    """One record a simulated system holds."""

    system: str
    operation: str
    key: str
    reference: str
    entity: str
    data: str
    """The request's data object, as JSON text."""
    created_at: str
    attempts: int


RECORD_COLUMNS = "system, operation, key, reference, entity, data, created_at, attempts"
