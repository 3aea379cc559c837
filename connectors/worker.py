"""Delivers one downstream system's effects in stream order and acknowledges each to its owner.

The worker reads a durable consumer ``connector-<system>`` on the output stream, filtered to
``<prefix>.out.<system>.>``, with explicit acks and ``max_ack_pending = 1``: the server hands
out the next effect only once the previous one is acked, so the order holds across reconnects,
restarts and several router processes sharing the durable.  An effect that fails transiently
stays unacked while it is retried with exponential back-off; a ``+WPI`` (work in progress)
every second while an effect is in hand keeps the server from redelivering it meanwhile, so
the ack wait can be short: when a router dies with an effect in hand, nothing else of that
system is handed out until the server redelivers it (``max_ack_pending = 1``), and a short ack
wait makes that seconds rather than half a minute.  Every
attempt is recorded in the store; the final outcome is sent to the owning actor as a
``downstream_ack`` command (see ``acks.py``), then the message is acked.

Each system has its own worker and consumer, so a system that is down delays only its own
effects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import anyio
import nats.errors
import nats.js.errors
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NatsClient
from nats.js import api

from caresync.codecs import CodecError, ContractError, Envelope, Subjects, decode_envelope
from caresync.codecs.downstream import AckOutcome, DownstreamAck
from caresync.config.schema import ConnectorConfig
from caresync.connectors.acks import ack_message, owner_kind
from caresync.connectors.downstream import Downstream
from caresync.connectors.errors import ConnectorSetupError, PermanentError, TransientError
from caresync.router.jetstream import JetStreamConsumer, JetStreamTransport
from caresync.router.outbox_rows import dead_letter_row
from caresync.router.transport import Inbound, Outbound, PublishStatus
from caresync.store import CallRow, Store, StoreUnavailable

log = structlog.get_logger("caresync.connectors")

RETRY_OF = "Caresync-Retry-Of"
"""Header of an effect published again by ``caresync retry-failed`` (its key)."""
_BATCH = 16
_IDLE_WAIT_S = 1.0
_SHUTDOWN_S = 2.0
_PROGRESS_EVERY_S = 1.0
"""While an effect is in hand, a ``+WPI`` this often (whatever the call or publish is doing)."""
_ACK_WAIT_S = 5.0
"""Redelivery delay: several progress signals long, so that only a dead worker misses it."""
_STORE_RETRY_INITIAL_S = 0.05
_STORE_RETRY_MAX_S = 2.0
_COUNTER = {"created": "delivered", "duplicate": "duplicates", "failed": "failed"}


@dataclass(frozen=True, slots=True)
class ConnectorStats:
    """What one worker has done since it started (counts of effects, not of attempts)."""

    delivered: int = 0
    """Effects the system took (``created``)."""
    duplicates: int = 0
    """Effects the system already had (``duplicate``)."""
    failed: int = 0
    """Effects given up: a permanent error, or ``max_attempts`` transient ones."""
    retries: int = 0
    """Transient failures that were retried."""
    dead_lettered: int = 0
    """Messages on the output subject that are not effect envelopes of this system."""


class ConnectorWorker:
    """Delivers the effects of one downstream system (see the module docstring)."""

    def __init__(
        self,
        nc: NatsClient,
        system: str,
        cfg: ConnectorConfig,
        subjects: Subjects,
        store: Store,
        downstream: Downstream,
        *,
        publish_timeout_s: float = 5.0,
    ) -> None:
        self.system = system
        self._nc = nc
        self._cfg = cfg
        self._subjects = subjects
        self._store = store
        self._downstream = downstream
        self._publish_timeout_s = publish_timeout_s
        self._transport = JetStreamTransport(nc)
        self._stats = ConnectorStats()
        self._done_seq = 0
        self._in_hand: Inbound | None = None
        self._log = log.bind(system=system)

    @property
    def consumer_name(self) -> str:
        """Name of this worker's durable consumer."""
        return f"connector-{self.system}"

    @property
    def ack_wait_s(self) -> float:
        """Redelivery delay of an effect in hand: how long the system's deliveries wait after
        a worker died holding one (progress is signalled every second while it lives)."""
        return _ACK_WAIT_S

    def statistics(self) -> ConnectorStats:
        """A snapshot of the counters."""
        return self._stats

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled; ``task_status.started()`` once the consumer exists."""
        consumer = await self._open_consumer()
        try:
            task_status.started()
            while True:
                for message in await consumer.next_batch(_BATCH, _IDLE_WAIT_S):
                    await self._handle(consumer, message)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_SHUTDOWN_S):
                if self._in_hand is not None:  # hand it back at once rather than after ack_wait
                    await self._signal(self._in_hand, b"-NAK")
                await consumer.close()

    async def _open_consumer(self) -> JetStreamConsumer:
        stream = self._subjects.output_stream
        config = api.ConsumerConfig(
            name=self.consumer_name,
            durable_name=self.consumer_name,
            description=f"caresync connector delivering {self.system} effects in order",
            filter_subject=f"{self._subjects.prefix}.out.{self.system}.>",
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=1,
            max_waiting=64,
        )
        try:
            await self._transport.js.add_consumer(stream, config=config)
        except (nats.js.errors.Error, nats.errors.Error) as exc:
            raise ConnectorSetupError(
                f"cannot create consumer {self.consumer_name} on {stream}: {exc}"
            ) from exc
        consumer = JetStreamConsumer(
            self._nc, stream, self.consumer_name, batch=_BATCH, expires_s=_IDLE_WAIT_S
        )
        await consumer.start()
        return consumer

    async def _handle(self, consumer: JetStreamConsumer, message: Inbound) -> None:
        if message.seq > self._done_seq:  # else a redelivery of one done (its ack was lost)
            self._in_hand = message
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_in_hand, message)
                await self._deliver(message)
                tg.cancel_scope.cancel()
        await consumer.ack_through(message)
        self._done_seq = max(self._done_seq, message.seq)
        self._in_hand = None

    async def _deliver(self, message: Inbound) -> None:
        try:
            effect, _ = decode_envelope(message.data)
            if effect.entity_kind != self.system:
                raise ContractError(
                    f"kind {effect.kind!r} is not an operation of {self.system}",
                    code="kind_mismatch",
                )
        except CodecError as exc:
            await self._dead_letter(message, exc.code, exc.reason)
            return
        # A failed effect sent again (``caresync retry-failed``) is a new round of delivery.
        retried = RETRY_OF in (message.headers or {})
        rounds = _failures(await self._store.calls(effect.id)) if retried else 0
        ack = await self._call(message, effect)
        owner = owner_kind(effect, self.system)
        await self._publish(ack_message(self._subjects, effect, owner, ack, rounds), message)

    async def _call(self, message: Inbound, effect: Envelope) -> DownstreamAck:
        """Call until success, a permanent error or ``max_attempts``; record every attempt."""
        key = effect.id
        # Attempts count on across redeliveries; only a bounded budget needs them up front.
        # An effect sent again after it failed (``caresync retry-failed``) has a fresh budget.
        attempt = _since_failure(await self._store.calls(key)) if self._cfg.max_attempts else 0
        retries = 0
        while True:
            attempt += 1
            if retries:
                await self._signal(message, b"+WPI")
            try:
                delivery = await self._downstream.call(effect.command, key, message.data)
            except PermanentError as exc:
                return await self._finish(effect, "failed", error=str(exc))
            except TransientError as exc:
                error = exc
            except Exception as exc:  # a connector bug must not stop the other systems
                self._log.exception("downstream_call_crashed", effect_key=key)
                error = TransientError(f"{type(exc).__name__}: {exc}")
            else:
                return await self._finish(effect, delivery.outcome, reference=delivery.reference)
            if self._cfg.max_attempts and attempt >= self._cfg.max_attempts:
                reason = f"{error} (gave up after {attempt} attempts)"
                return await self._finish(effect, "failed", error=reason)
            n = await self._record(effect, "transient", error=str(error))
            retries += 1
            self._bump(retries=1)
            delay_s = self._backoff_s(retries, error.retry_after_s)
            self._log.info(
                "downstream_retry", effect_key=key, error=str(error), attempt=n, delay_s=delay_s
            )
            await self._signal(message, b"+WPI")
            await anyio.sleep(delay_s)

    async def _finish(
        self, effect: Envelope, outcome: AckOutcome, *, reference: str = "", error: str = ""
    ) -> DownstreamAck:
        """Record the last attempt and count it; the acknowledgement to send."""
        n = await self._record(effect, outcome, error=error, reference=reference)
        if outcome == "failed":
            self._log.warning("downstream_failed", effect_key=effect.id, error=error, attempts=n)
        self._bump(**{_COUNTER[outcome]: 1})
        return DownstreamAck(
            effect_key=effect.id,
            system=self.system,
            operation=effect.command,
            outcome=outcome,
            reference=reference,
            error=error,
            attempts=n,
        )

    async def _record(
        self, effect: Envelope, outcome: str, *, error: str = "", reference: str = ""
    ) -> int:
        """Record one attempt; a store that is locked or full is waited out with back-off
        (the effect stays in hand, unacked), as the router's own commits are."""
        delay_s = _STORE_RETRY_INITIAL_S
        while True:
            try:
                return await self._store.record_call(
                    effect.id,
                    self.system,
                    effect.command,
                    outcome,
                    error=error,
                    reference=reference,
                )
            except StoreUnavailable as exc:
                self._log.warning(
                    "store_unavailable", effect_key=effect.id, error=str(exc), retry_in_s=delay_s
                )
                await anyio.sleep(delay_s)
                delay_s = min(delay_s * 2, _STORE_RETRY_MAX_S)

    def _backoff_s(self, retries: int, retry_after_s: float | None) -> float:
        cfg = self._cfg
        delay_ms = min(cfg.backoff_initial_ms * 2.0 ** min(retries - 1, 30), cfg.backoff_max_ms)
        if retry_after_s is not None:
            delay_ms = min(max(delay_ms, retry_after_s * 1000), cfg.backoff_max_ms)
        return delay_ms / 1000

    async def _publish(self, out: Outbound, message: Inbound) -> None:
        """Publish with a PubAck, retrying transient failures with back-off (same Msg-Id)."""
        retries = 0
        while True:
            [result] = await self._transport.publish([out], self._publish_timeout_s)
            if result.status in (PublishStatus.STORED, PublishStatus.DUPLICATE):
                return
            if result.status is PublishStatus.FAILED:
                self._log.error("connector_publish_failed", subject=out.subject, error=result.error)
                return
            retries += 1
            self._log.warning("connector_publish_retry", subject=out.subject, error=result.error)
            await self._signal(message, b"+WPI")
            await anyio.sleep(self._backoff_s(retries, None))

    async def _dead_letter(self, message: Inbound, code: str, reason: str) -> None:
        row = dead_letter_row(self._subjects, message, code, reason)
        self._log.warning("effect_dead_lettered", subject=message.subject, code=code, reason=reason)
        await self._publish(Outbound(row.key, row.subject, row.payload, row.headers), message)
        self._bump(dead_lettered=1)

    async def _keep_in_hand(self, message: Inbound) -> None:
        while True:
            await anyio.sleep(_PROGRESS_EVERY_S)
            await self._signal(message, b"+WPI")

    async def _signal(self, message: Inbound, body: bytes) -> None:
        # Progress (+WPI) and hand-back (-NAK) are hints: if one is lost, the server
        # redelivers after ack_wait and the idempotency key makes the repeat harmless.
        if not message.reply or self._nc.is_closed:
            return
        try:
            await self._nc.publish(message.reply, body)
        except nats.errors.Error:
            pass

    def _bump(self, **deltas: int) -> None:
        s = self._stats
        self._stats = replace(s, **{name: getattr(s, name) + n for name, n in deltas.items()})


def _since_failure(calls: list[CallRow]) -> int:
    """Attempts made since the effect last failed for good (all of them if it never did)."""
    count = 0
    for call in calls:
        count = 0 if call.outcome == "failed" else count + 1
    return count


def _failures(calls: list[CallRow]) -> int:
    """How many times the effect failed for good."""
    return sum(1 for call in calls if call.outcome == "failed")
