"""The router's durable store: entity snapshots, dedupe, outbox, parking and offsets."""

from __future__ import annotations

from caresync.store.errors import StoreError, StoreSchemaError, StoreUnavailable
from caresync.store.ingest import IngestedCommand, IngestLog, IngestRow
from caresync.store.partitioned import (
    PartitionedStore,
    StoreLayoutError,
    partition_files,
    partition_path,
    read_only_union,
)
from caresync.store.records import (
    AppliedRow,
    BatchWrite,
    EntityRow,
    OutboxRow,
    ParkedRow,
    PendingEffect,
)
from caresync.store.sqlite import CallRow, Store

__all__ = [
    "AppliedRow",
    "BatchWrite",
    "CallRow",
    "EntityRow",
    "IngestLog",
    "IngestRow",
    "IngestedCommand",
    "OutboxRow",
    "ParkedRow",
    "PartitionedStore",
    "PendingEffect",
    "Store",
    "StoreError",
    "StoreLayoutError",
    "StoreSchemaError",
    "StoreUnavailable",
    "partition_files",
    "partition_path",
    "read_only_union",
]
