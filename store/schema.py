"""SQLite schema of the router's store, and its version."""

from __future__ import annotations

SCHEMA_VERSION = 1

DERIVED_TABLES = ("entities", "applied", "parked", "offsets")
"""What a rebuild derives from the input streams: what a reset drops and a snapshot holds."""

PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA foreign_keys=OFF",
    "PRAGMA temp_store=MEMORY",
)

MIGRATIONS = (
    # (table, column, definition): columns added after a table first shipped.
    ("parked", "timestamp_ns", "INTEGER NOT NULL DEFAULT 0"),
)

DDL = (
    """CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID""",
    # Current state of every entity: a per-entity snapshot written with each batch.
    """CREATE TABLE IF NOT EXISTS entities (
        kind TEXT NOT NULL,
        id TEXT NOT NULL,
        state BLOB NOT NULL,
        parked INTEGER NOT NULL DEFAULT 0,
        seq INTEGER NOT NULL,
        PRIMARY KEY (kind, id)
    ) WITHOUT ROWID""",
    # Dedupe records: kept for store.dedupe_retention_s, far longer than JetStream's window.
    # Keyed per entity: a command id reused for another entity is not a duplicate.
    """CREATE TABLE IF NOT EXISTS applied (
        kind TEXT NOT NULL,
        entity TEXT NOT NULL,
        command_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        applied_at REAL NOT NULL,
        PRIMARY KEY (kind, entity, command_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS applied_by_time ON applied (applied_at)",
    # Outbox and effect ledger: one row per idempotency key; 'sent' rows are what a replay
    # must not send again.
    """CREATE TABLE IF NOT EXISTS outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL UNIQUE,
        subject TEXT NOT NULL,
        payload BLOB NOT NULL,
        headers BLOB,
        status TEXT NOT NULL DEFAULT 'pending',
        created_at REAL NOT NULL,
        sent_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (seq) WHERE status = 'pending'",
    # Messages of parked entities: the one that failed first, then those queued behind it.
    """CREATE TABLE IF NOT EXISTS parked (
        kind TEXT NOT NULL,
        id TEXT NOT NULL,
        stream TEXT NOT NULL,
        seq INTEGER NOT NULL,
        command_id TEXT NOT NULL,
        subject TEXT NOT NULL,
        data BLOB NOT NULL,
        headers BLOB,
        reason TEXT NOT NULL,
        failures INTEGER NOT NULL,
        parked_at REAL NOT NULL,
        timestamp_ns INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (kind, id, stream, seq)
    ) WITHOUT ROWID""",
    # Position in each input stream up to which everything is applied and committed.
    """CREATE TABLE IF NOT EXISTS offsets (
        stream TEXT PRIMARY KEY,
        seq INTEGER NOT NULL
    ) WITHOUT ROWID""",
    # Reference-data versions seen on the reference-data stream (version = stream seq), kept
    # so that a restart or a replay applies the data in force without reading the stream.
    """CREATE TABLE IF NOT EXISTS refdata_versions (
        version INTEGER PRIMARY KEY,
        effective_from_ns INTEGER NOT NULL,
        data BLOB NOT NULL
    )""",
    # Every attempt at delivering an effect to a downstream system, with its outcome
    # (created, duplicate, transient, failed); attempts count on across redeliveries.
    """CREATE TABLE IF NOT EXISTS downstream_calls (
        effect_key TEXT NOT NULL,
        system TEXT NOT NULL,
        operation TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        error TEXT NOT NULL DEFAULT '',
        reference TEXT NOT NULL DEFAULT '',
        at REAL NOT NULL,
        PRIMARY KEY (effect_key, attempt)
    ) WITHOUT ROWID""",
    # What the ingest stage made of each raw source message (HL7 v2, FHIR): one row per
    # message inside it (an HL7 batch holds several), decoded into commands or rejected.
    """CREATE TABLE IF NOT EXISTS ingest (
        stream TEXT NOT NULL,
        seq INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        format TEXT NOT NULL,
        outcome TEXT NOT NULL,
        kind TEXT NOT NULL DEFAULT '',
        entity TEXT NOT NULL DEFAULT '',
        code TEXT NOT NULL DEFAULT '',
        reason TEXT NOT NULL DEFAULT '',
        commands BLOB,
        at REAL NOT NULL,
        PRIMARY KEY (stream, seq, idx)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS ingest_by_time ON ingest (at)",
)
