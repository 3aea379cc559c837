"""Configuration schema: one frozen msgspec Struct per TOML section.

Every field has a default that works for the embedded single-node mode, so an
empty file (or no file at all) is a valid configuration. Field descriptions
live in ``Meta(description=...)`` so the commented default TOML document is
generated from this module and cannot drift from it.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "Config",
    "ConnectorConfig",
    "DownstreamConfig",
    "IngestConfig",
    "LogConfig",
    "NatsConfig",
    "OutboxConfig",
    "RouterConfig",
    "SnapshotsConfig",
    "StoreConfig",
    "StreamsConfig",
    "SupervisionConfig",
]

# NATS subject tokens: no wildcards (`*`, `>`), whitespace or empty tokens.
SUBJECT_PREFIX_PATTERN = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"
# Stream names may not contain `.`, wildcards or whitespace either.
STREAM_PREFIX_PATTERN = r"^[A-Za-z0-9_-]+$"
# "Name: value", the name an HTTP token (RFC 9110), or empty for none.
AUTH_HEADER_PATTERN = r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+:.*)?$"


class NatsConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Connection to the NATS server."""

    url: Annotated[
        str,
        Meta(description='Server URL; "" means the embedded server started by `caresync up`'),
    ] = ""
    connect_timeout_s: Annotated[
        float, Meta(gt=0, description="Timeout for establishing the connection")
    ] = 5.0
    name: Annotated[str, Meta(description="Client connection name shown by the server")] = (
        "caresync-router"
    )


class StreamsConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """JetStream streams and subjects."""

    subject_prefix: Annotated[
        str,
        Meta(
            pattern=SUBJECT_PREFIX_PATTERN,
            description="First subject token(s): letters, digits, _ and -, tokens joined by dots",
        ),
    ] = "cs"
    stream_prefix: Annotated[
        str,
        Meta(
            pattern=STREAM_PREFIX_PATTERN,
            description="Prefix of every JetStream stream name: letters, digits, _ and -",
        ),
    ] = "CARESYNC"
    partitions: Annotated[
        int, Meta(ge=1, le=64, description="Number of partition streams/consumers")
    ] = 1
    replicas: Annotated[int, Meta(ge=1, le=5, description="JetStream replicas per stream")] = 1
    storage: Annotated[Literal["file", "memory"], Meta(description="JetStream storage backend")] = (
        "file"
    )
    duplicate_window_s: Annotated[
        float, Meta(gt=0, description="JetStream duplicate-detection window")
    ] = 120.0
    max_age_s: Annotated[
        float, Meta(ge=0, description="Maximum message age; 0 keeps messages forever")
    ] = 0.0


class RouterConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Consuming, batching and actor lifecycle."""

    batch_size: Annotated[
        int,
        Meta(
            ge=1,
            le=10_000,
            description="Messages fetched per pull request: at most this many are applied "
            "and committed together (fewer when fewer are waiting)",
        ),
    ] = 2000
    batch_max_commands: Annotated[
        int,
        Meta(
            ge=1,
            le=1_000_000,
            description="About how many commands a batch applies at most, counting the local "
            "commands each input brings with it: after a batch that fanned out more, the next "
            "one takes fewer inputs (this bounds the router's memory)",
        ),
    ] = 4000
    pull_expires_ms: Annotated[
        int, Meta(gt=0, description="How long a pull request waits for messages")
    ] = 1000
    batches_in_flight: Annotated[
        int,
        Meta(
            ge=1,
            le=8,
            description="Batches in the pull stage's hands, per partition (1: each batch is "
            "pulled when the apply stage asks for it; more are pulled ahead, and messages wait "
            "longer)",
        ),
    ] = 1
    processes: Annotated[
        int,
        Meta(
            ge=1,
            le=16,
            description="Router processes sharing the partitions (partition p runs in process"
            " p % processes); at most streams.partitions",
        ),
    ] = 1
    ack_wait_s: Annotated[
        float, Meta(gt=0, description="Redelivery delay for unacknowledged messages")
    ] = 60.0
    max_live_actors: Annotated[
        int,
        Meta(
            ge=1,
            description="Actors kept in memory before passivating the oldest (~6.5 KB each)",
        ),
    ] = 10_000
    idle_passivate_s: Annotated[
        float, Meta(gt=0, description="Idle time after which an actor is passivated")
    ] = 60.0
    shutdown_timeout_s: Annotated[
        float, Meta(gt=0, description="Grace period for draining on shutdown")
    ] = 8.0


class SupervisionConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Restart policy for failing actors."""

    max_failures: Annotated[
        int, Meta(ge=1, description="Consecutive failures before a message is dead-lettered")
    ] = 5
    backoff_initial_ms: Annotated[float, Meta(gt=0, description="First restart backoff delay")] = (
        10.0
    )
    backoff_max_ms: Annotated[float, Meta(gt=0, description="Upper bound for restart backoff")] = (
        2000.0
    )


class StoreConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """SQLite state store."""

    path: Annotated[
        str, Meta(min_length=1, description="Database file; relative paths are under the data dir")
    ] = "caresync.db"
    synchronous: Annotated[
        Literal["normal", "full"], Meta(description="SQLite PRAGMA synchronous")
    ] = "normal"
    dedupe_retention_s: Annotated[
        float,
        Meta(gt=0, description="How long processed message ids are remembered for dedupe"),
    ] = 604_800.0
    outbox_retention_s: Annotated[
        float,
        Meta(gt=0, description="How long effects confirmed sent stay in the outbox table"),
    ] = 86_400.0
    busy_timeout_ms: Annotated[
        int, Meta(gt=0, description="SQLite busy timeout when the database is locked")
    ] = 5000
    cache_mb: Annotated[
        int,
        Meta(
            ge=1,
            le=65_536,
            description="SQLite page cache of the connection that commits, per store file "
            "(MiB; filled as pages are used)",
        ),
    ] = 32


class SnapshotsConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """State snapshots in JetStream, from which ``replay rebuild`` starts (then folds the tail)."""

    every_s: Annotated[
        float,
        Meta(ge=0, description="How often the router snapshots its state; 0 turns it off"),
    ] = 900.0
    min_messages: Annotated[
        int,
        Meta(ge=1, description="Messages applied since the last snapshot before another is due"),
    ] = 10_000


class OutboxConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Transactional outbox publisher."""

    publish_timeout_s: Annotated[
        float, Meta(gt=0, description="Timeout for one JetStream publish acknowledgement")
    ] = 5.0
    max_in_flight: Annotated[
        int, Meta(ge=1, description="Unacknowledged publishes allowed at once")
    ] = 2000
    retry_backoff_initial_ms: Annotated[
        float, Meta(gt=0, description="First retry delay after a failed publish")
    ] = 50.0
    retry_backoff_max_ms: Annotated[
        float, Meta(gt=0, description="Upper bound for publish retry delay")
    ] = 5000.0


class IngestConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Raw source messages (HL7 v2, FHIR R4): decoding on the router, and the MLLP listener."""

    hl7_timezone: Annotated[
        str,
        Meta(
            min_length=1,
            description="IANA time zone of HL7 timestamps sent without an offset (e.g. "
            "America/Chicago); the senders' local time",
        ),
    ] = "UTC"
    max_message_bytes: Annotated[
        int, Meta(ge=1024, description="Largest raw message accepted; larger is rejected")
    ] = 1 << 20
    batch_size: Annotated[
        int, Meta(ge=1, le=10_000, description="Raw messages decoded per batch")
    ] = 200
    verdict_timeout_s: Annotated[
        float,
        Meta(
            gt=0,
            description="How long the MLLP listener waits for the router's verdict before "
            "answering AE (the message is stored; a resend is a duplicate)",
        ),
    ] = 10.0


class LogConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Logging."""

    level: Annotated[
        Literal["debug", "info", "warning", "error"], Meta(description="Minimum log level")
    ] = "info"
    format: Annotated[
        Literal["json", "console"], Meta(description="json for machines, console for humans")
    ] = "json"


class ConnectorConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How one downstream system is reached, and how failed calls are retried."""

    transport: Annotated[
        Literal["nats", "http"],
        Meta(description="nats: request/reply on NATS; http: POST with httpx"),
    ] = "nats"
    subject_prefix: Annotated[
        str,
        Meta(
            pattern=SUBJECT_PREFIX_PATTERN,
            description="NATS: requests go to <subject_prefix>.<system>.<operation>",
        ),
    ] = "sim"
    url: Annotated[
        str, Meta(description="HTTP: base URL; each call is a POST to <url>/<operation>")
    ] = ""
    auth_header: Annotated[
        str,
        Meta(
            pattern=AUTH_HEADER_PATTERN,
            description='HTTP: header sent with every call, "Name: value" ("" for none)',
        ),
    ] = ""
    timeout_s: Annotated[float, Meta(gt=0, description="Timeout of one call")] = 5.0
    max_attempts: Annotated[
        int, Meta(ge=0, description="Attempts before an effect fails; 0 retries forever")
    ] = 0
    backoff_initial_ms: Annotated[
        float, Meta(gt=0, description="Delay before the first retry of a transient failure")
    ] = 100.0
    backoff_max_ms: Annotated[
        float, Meta(gt=0, description="Upper bound for the retry delay (it doubles each time)")
    ] = 10_000.0
    enabled: Annotated[
        bool, Meta(description="Deliver this system's effects from this process")
    ] = True
    transient_http_statuses: Annotated[
        list[Annotated[int, Meta(ge=100, le=599)]],
        Meta(
            description="HTTP: statuses that are retried (the system may pass); any other "
            "error status fails the effect at once"
        ),
    ] = msgspec.field(default_factory=lambda: [408, 425, 429, 500, 502, 503, 504])
    retry_on_timeout: Annotated[
        bool,
        Meta(
            description="Retry a call that got no answer in time (safe: the idempotency key "
            "makes a repeat a duplicate); false fails the effect at once"
        ),
    ] = True


class DownstreamConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Connectors to the downstream systems, one table per system."""

    billing: Annotated[ConnectorConfig, Meta(description="The billing system")] = msgspec.field(
        default_factory=ConnectorConfig
    )
    erp: Annotated[ConnectorConfig, Meta(description="The ERP")] = msgspec.field(
        default_factory=ConnectorConfig
    )
    supply: Annotated[
        ConnectorConfig, Meta(description="The materials-management (supply) system")
    ] = msgspec.field(default_factory=ConnectorConfig)


class Config(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The whole caresync configuration; one attribute per TOML section."""

    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    streams: StreamsConfig = msgspec.field(default_factory=StreamsConfig)
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)
    supervision: SupervisionConfig = msgspec.field(default_factory=SupervisionConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    outbox: OutboxConfig = msgspec.field(default_factory=OutboxConfig)
    snapshots: SnapshotsConfig = msgspec.field(default_factory=SnapshotsConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    downstream: DownstreamConfig = msgspec.field(default_factory=DownstreamConfig)
