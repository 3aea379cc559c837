"""Publishing the systems' feedback to caresync: the outbox in the records, drained in order.

Each row is published to JetStream with its id as ``Nats-Msg-Id`` and marked sent after the
PubAck, so a crash or an outage between the two only re-sends what the stream (and the
router's dedupe) then drops.  While NATS or the input stream is unavailable the publisher
backs off and tries again; the records never lose a row.
"""

from __future__ import annotations

import anyio
import nats.errors
import structlog
from anyio.abc import TaskStatus
from nats.js import JetStreamContext

from caresync.sim.errors import SimError
from caresync.sim.records import Records

log = structlog.get_logger("caresync.sim")

_BATCH = 100
_PUBLISH_TIMEOUT_S = 2.0
_BACKOFF_INITIAL_S = 0.2
_BACKOFF_MAX_S = 5.0


class FeedbackPublisher:
    """Drains the feedback outbox of one :class:`Records` to JetStream until cancelled."""

    def __init__(self, js: JetStreamContext, records: Records) -> None:
        self._js = js
        self._records = records
        self._wake = anyio.Event()
        self._sent = anyio.Event()

    def wake(self) -> None:
        """Tell the publisher a row was queued (does not block)."""
        self._wake.set()

    async def wait_sent(self, feedback_id: str, timeout_s: float) -> bool:
        """Wait until ``feedback_id`` is sent; False if it is still queued after ``timeout_s``."""
        with anyio.move_on_after(timeout_s):
            while True:
                sent = self._sent
                if await self._records.is_sent(feedback_id):
                    return True
                await sent.wait()
        return False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish queued rows as they come; back off while publishing fails."""
        task_status.started()
        backoff_s = _BACKOFF_INITIAL_S
        while True:
            self._wake = anyio.Event()  # before reading: a row queued meanwhile wakes us again
            try:
                drained = await self._drain()
            except SimError as exc:
                log.warning("sim_feedback_store_failed", error=str(exc))
                drained = False
            if drained:
                backoff_s = _BACKOFF_INITIAL_S
                await self._wake.wait()
            else:
                with anyio.move_on_after(backoff_s):
                    await self._wake.wait()
                backoff_s = min(backoff_s * 2, _BACKOFF_MAX_S)

    async def _drain(self) -> bool:
        """Publish every pending row; False when publishing failed (retry after a back-off)."""
        while rows := await self._records.pending_feedback(_BATCH):
            for row in rows:
                try:
                    await self._js.publish(
                        row.subject,
                        row.payload,
                        timeout=_PUBLISH_TIMEOUT_S,
                        headers={"Nats-Msg-Id": row.id},
                    )
                except nats.errors.Error as exc:
                    log.warning(
                        "sim_feedback_publish_failed",
                        id=row.id,
                        subject=row.subject,
                        error=str(exc) or type(exc).__name__,
                    )
                    return False
                await self._records.mark_sent(row.id)
                log.info("sim_feedback_sent", id=row.id, subject=row.subject)
                self._sent.set()
                self._sent = anyio.Event()
        return True
