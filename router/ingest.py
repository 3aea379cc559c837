"""The ingest stage: raw HL7 v2 and FHIR messages become canonical commands on the input log.

Source systems publish raw messages to ``<prefix>.raw.<format>`` (stream ``<P>_RAW``); this
stage reads that stream in order, decodes each message with the pure codecs
(:mod:`caresync.codecs.raw`), and publishes

- each canonical command to ``<prefix>.in.<kind>.<entity>`` with ``Nats-Msg-Id`` = its
  content-derived id, so the actors see it exactly as a canonical JSON command: same
  verdicts, same dedupe, same per-entity order;
- each rejected message, raw bytes untouched, to ``<prefix>.dlq.<code>`` with the reason.

Then it records what became of every message (the ingest log, for verdicts and the CLI) with
the raw stream's offset in one transaction, and only then acknowledges.  A crash anywhere
re-decodes the same bytes into the same ids: re-publishing them is absorbed by JetStream's
duplicate window and the actors' dedupe, so nothing is lost and nothing applied twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from caresync.codecs import (
    CodecError,
    Subjects,
    encode_envelope,
    make_envelope,
    validate_envelope,
)
from caresync.codecs.raw import RawItem, decode_raw
from caresync.codecs.source import SourceCommand, SourceError
from caresync.config import Config
from caresync.router.outbox_rows import dead_letter_row
from caresync.router.transport import (
    Inbound,
    InputConsumer,
    Outbound,
    PublishResult,
    PublishStatus,
    Transport,
)
from caresync.store import IngestedCommand, IngestRow, Store

log = structlog.get_logger("caresync.ingest")

H_FRAME_ERROR = "Caresync-Frame-Error"
"""Set by a sender whose framing found the message broken (MLLP frame without its end)."""
H_INDEX = "Caresync-Index"
H_FORMAT = "Caresync-Format"
CONSUMER = "ingest"


@dataclass(frozen=True, slots=True)
class IngestSettings:
    """The knobs of the ingest stage (``[ingest]``)."""

    timezone: tzinfo = UTC
    max_message_bytes: int = 1 << 20
    batch_size: int = 200
    pull_timeout_s: float = 1.0
    publish_timeout_s: float = 5.0
    retry_initial_s: float = 0.05
    retry_max_s: float = 5.0

    @classmethod
    def from_config(cls, cfg: Config) -> IngestSettings:
        """Settings from a validated configuration."""
        name = cfg.ingest.hl7_timezone
        return cls(
            timezone=UTC if name == "UTC" else ZoneInfo(name),
            max_message_bytes=cfg.ingest.max_message_bytes,
            batch_size=cfg.ingest.batch_size,
            pull_timeout_s=cfg.router.pull_expires_ms / 1000,
            publish_timeout_s=cfg.outbox.publish_timeout_s,
            retry_initial_s=cfg.outbox.retry_backoff_initial_ms / 1000,
            retry_max_s=cfg.outbox.retry_backoff_max_ms / 1000,
        )


@dataclass(slots=True)
class IngestStats:
    """Counters since start."""

    messages: int = 0
    commands: int = 0
    rejected: int = 0
    last_seq: int = 0


class IngestWorker:
    """Decodes the raw stream into commands and dead letters, in order, until stopped."""

    def __init__(
        self,
        transport: Transport,
        store: Store,
        subjects: Subjects,
        settings: IngestSettings | None = None,
    ) -> None:
        self._transport = transport
        self._store = store
        self._subjects = subjects
        self._settings = settings or IngestSettings()
        self._stop = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self.stats = IngestStats()

    @property
    def stream(self) -> str:
        """The raw stream this stage reads."""
        return self._subjects.raw_stream

    def stop(self) -> None:
        """Finish the batch in hand, then return from :meth:`run`."""
        self._stop.set()
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume the raw stream from the committed offset until :meth:`stop`."""
        offset = await self._store.offset(self.stream)
        self.stats.last_seq = offset
        consumer = await self._transport.open_consumer(self.stream, CONSUMER, offset + 1)
        log.info("ingest_started", stream=self.stream, from_seq=offset + 1)
        task_status.started()
        try:
            while not self._stop.is_set():
                batch: list[Inbound] = []
                with anyio.CancelScope() as scope:
                    self._scope = scope
                    batch = await consumer.next_batch(
                        self._settings.batch_size, self._settings.pull_timeout_s
                    )
                self._scope = None
                # Redeliveries of what is already committed are dropped (order is by offset).
                batch = [m for m in batch if m.seq > self.stats.last_seq]
                if batch:
                    with anyio.CancelScope(shield=True):
                        await self._process(consumer, batch)
        finally:
            with anyio.CancelScope(shield=True):
                await consumer.close()
        log.info("ingest_stopped", stream=self.stream, last_seq=self.stats.last_seq)

    async def _process(self, consumer: InputConsumer, batch: list[Inbound]) -> None:
        rows: list[IngestRow] = []
        outbound: list[Outbound] = []
        placed: list[tuple[int, int]] = []  # (row index, outbound index) of each command
        now = time.time()
        for message in batch:
            fmt = self._subjects.raw_format(message.subject)
            for item in self._decode(fmt, message):
                if item.error is not None:
                    rows.append(_rejected_row(message, fmt, item, item.error, now))
                    outbound.append(self._dead_letter(message, fmt, item, item.error))
                    self.stats.rejected += 1
                    continue
                try:
                    built = [self._command(message, c) for c in item.commands]
                except CodecError as exc:
                    error = SourceError(exc.reason, code=exc.code, kind=item.kind)
                    rows.append(_rejected_row(message, fmt, item, error, now))
                    outbound.append(self._dead_letter(message, fmt, item, error))
                    self.stats.rejected += 1
                    continue
                row_index = len(rows)
                rows.append(
                    IngestRow(
                        stream=message.stream,
                        seq=message.seq,
                        idx=item.index,
                        format=fmt,
                        outcome="decoded",
                        kind=item.kind,
                        entity=item.entity,
                        commands=tuple(
                            IngestedCommand(kind=c.kind, entity=c.entity, id=c.id)
                            for c in item.commands
                        ),
                        at=now,
                    )
                )
                for out in built:
                    placed.append((row_index, len(outbound)))
                    outbound.append(out)
                self.stats.commands += len(built)
        results = await self._publish(outbound)
        for row_index, out_index in placed:
            rows[row_index] = _with_result(rows[row_index], results[out_index])
        await self._commit(rows, batch[-1].seq)
        await consumer.ack_through(batch[-1])
        self.stats.messages += len(batch)
        self.stats.last_seq = batch[-1].seq

    def _decode(self, fmt: str, message: Inbound) -> list[RawItem]:
        headers = message.headers or {}
        try:
            return decode_raw(
                fmt,
                message.data,
                frame_error=headers.get(H_FRAME_ERROR, ""),
                default_tz=self._settings.timezone,
                max_bytes=self._settings.max_message_bytes,
            )
        except Exception as exc:  # a codec bug must never take the router down
            log.exception("ingest_decoder_failed", seq=message.seq, format=fmt)
            error = SourceError(
                f"the {fmt or 'raw'} decoder failed on this message ({type(exc).__name__}: "
                f"{exc}); it is kept in dead letters for a fixed decoder",
                code="decoder_failed",
            )
            return [RawItem(0, message.data, error=error)]

    def _command(self, message: Inbound, command: SourceCommand) -> Outbound:
        entity_kind = command.kind.partition(".")[0]
        at = command.occurred_at or datetime.fromtimestamp(message.timestamp_ns / 1e9, UTC)
        envelope = make_envelope(
            id=command.id,
            kind=command.kind,
            entity=command.entity,
            payload=command.payload,
            occurred_at=at,
            source=command.source,
        )
        validate_envelope(envelope)
        subject = self._subjects.command(entity_kind, command.entity)  # SubjectError if bad
        return Outbound(key=command.id, subject=subject, payload=encode_envelope(envelope))

    def _dead_letter(
        self, message: Inbound, fmt: str, item: RawItem, error: SourceError
    ) -> Outbound:
        row = dead_letter_row(
            self._subjects,
            message,
            error.code,
            error.reason,
            kind=error.kind or item.kind,
            entity=error.entity,
        )
        headers = {**(row.headers or {}), H_INDEX: str(item.index), H_FORMAT: fmt}
        # One letter per message of the payload: its own bytes, its own key.
        return Outbound(f"{row.key}:{item.index}", row.subject, item.data, headers)

    async def _publish(self, outbound: list[Outbound]) -> list[PublishResult]:
        """Publish until every message is stored, a duplicate, or refused for good."""
        results: list[PublishResult | None] = [None] * len(outbound)
        todo = list(range(len(outbound)))
        delay = self._settings.retry_initial_s
        while todo:
            sent = await self._transport.publish(
                [outbound[i] for i in todo], self._settings.publish_timeout_s
            )
            retry = []
            for i, result in zip(todo, sent, strict=True):
                if result.status is PublishStatus.RETRY:
                    retry.append(i)
                else:
                    results[i] = result
            if retry:
                log.warning("ingest_publish_retry", count=len(retry), delay_s=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self._settings.retry_max_s)
            todo = retry
        return [r for r in results if r is not None]

    async def _commit(self, rows: list[IngestRow], offset: int) -> None:
        delay = self._settings.retry_initial_s
        while True:
            try:
                await self._store.ingest.record(rows, self.stream, offset)
                return
            except Exception as exc:  # the store is busy or full: retry, never ack unrecorded
                log.warning("ingest_commit_retry", error=str(exc), delay_s=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, self._settings.retry_max_s)


def _rejected_row(
    message: Inbound, fmt: str, item: RawItem, error: SourceError, now: float
) -> IngestRow:
    return IngestRow(
        stream=message.stream,
        seq=message.seq,
        idx=item.index,
        format=fmt,
        outcome="rejected",
        kind=error.kind or item.kind,
        entity=error.entity,
        code=error.code,
        reason=error.reason,
        at=now,
    )


def _with_result(row: IngestRow, result: PublishResult) -> IngestRow:
    """Fill in where the command with the result's key was stored."""
    commands = tuple(
        (
            IngestedCommand(
                kind=c.kind,
                entity=c.entity,
                id=c.id,
                stream=result.stream,
                seq=result.seq,
                duplicate=result.status is PublishStatus.DUPLICATE,
                failed=result.error if result.status is PublishStatus.FAILED else "",
            )
            if c.id == result.key
            else c
        )
        for c in row.commands
    )
    return msgspec.structs.replace(row, commands=commands)
