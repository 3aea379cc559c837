"""Publishes outbox rows with ``Nats-Msg-Id`` = idempotency key, retrying transient failures.

Confirmations are not written at once: they are collected as marks and committed with the
next batch's transaction (a crash before that only means a re-send, which the Msg-Id and the
receiver's dedupe absorb).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import structlog

from caresync.router.transport import Publishable, PublishStatus, Transport
from caresync.store import BatchWrite, OutboxRow, PendingEffect

log = structlog.get_logger("caresync.publisher")


@dataclass(slots=True)
class PublisherStats:
    """Counters since start."""

    published: int = 0
    duplicates: int = 0
    retries: int = 0
    failed: int = 0


@dataclass
class Publisher:
    """Sends effects for every worker of one router."""

    transport: Transport
    timeout_s: float = 5.0
    retry_initial_s: float = 0.05
    retry_max_s: float = 5.0
    max_in_flight: int = 2000
    """Publishes awaiting their PubAck at once (the outbox window)."""
    stats: PublisherStats = field(default_factory=PublisherStats)
    _sent: list[tuple[str, float]] = field(default_factory=list)
    _failed: list[tuple[str, str]] = field(default_factory=list)
    _ranges: list[tuple[int, int, float]] = field(default_factory=list)

    def has_marks(self) -> bool:
        """Whether confirmations wait to be committed."""
        return bool(self._sent or self._ranges or self._failed)

    def take_marks(self) -> BatchWrite:
        """The confirmations gathered since the last call, as a write to commit."""
        write = BatchWrite(sent=self._sent, sent_ranges=self._ranges, failed=self._failed)
        self._sent, self._ranges, self._failed = [], [], []
        return write

    async def send(
        self,
        rows: Sequence[OutboxRow | PendingEffect],
        seq_range: tuple[int, int] | None = None,
    ) -> None:
        """Publish ``rows`` until each is stored, a duplicate, or failed for good.

        With ``seq_range`` (the outbox seqs the batch inserted), the confirmation is one range
        mark instead of one mark per row.
        """
        window = self.max_in_flight
        per_key = seq_range is None
        for i in range(0, len(rows), window):
            await self._send_chunk(rows[i : i + window], per_key)
        if seq_range is not None:
            self._ranges.append((seq_range[0], seq_range[1], time.time()))

    async def _send_chunk(self, todo: Sequence[Publishable], per_key: bool) -> None:
        delay_s = self.retry_initial_s
        while todo:
            results = await self.transport.publish(todo, self.timeout_s)
            now = time.time()
            retry: list[Publishable] = []
            for message, result in zip(todo, results, strict=True):
                if result.status is PublishStatus.STORED:
                    self.stats.published += 1
                    if per_key:
                        self._sent.append((result.key, now))
                elif result.status is PublishStatus.DUPLICATE:
                    self.stats.duplicates += 1
                    if per_key:
                        self._sent.append((result.key, now))
                elif result.status is PublishStatus.RETRY:
                    retry.append(message)
                else:
                    self.stats.failed += 1
                    self._failed.append((result.key, result.error))
                    log.error(
                        "effect_failed", key=result.key, subject=message.subject, error=result.error
                    )
            if retry:
                self.stats.retries += len(retry)
                log.warning(
                    "publish_retry",
                    count=len(retry),
                    error=next(r.error for r in results if r.status is PublishStatus.RETRY),
                    retry_in_s=delay_s,
                )
                await anyio.sleep(delay_s)
                delay_s = min(delay_s * 2, self.retry_max_s)
            todo = retry
