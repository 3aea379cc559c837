"""A live entity: one mailbox, one task, strict order, supervision with back-off.

The actor runs its kind's pure ``decide``/``evolve`` for each delivery in mailbox order.  If
they raise, the actor is restarted from its last good state after an exponential back-off;
after ``max_failures`` the message is parked with the reason and the entity holds back every
later message until it is released.  Other entities are unaffected: each has its own task.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from caresync.actors.contract import Accepted, Effect, EntityKind, Rejected
from caresync.router.decoding import Prepared

log = structlog.get_logger("caresync.actor")


# -- outcomes ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Applied:
    """The command was accepted; the state after it and the effects to send."""

    state: Any
    events: tuple[Any, ...]
    effects: tuple[Effect, ...]


@dataclass(frozen=True, slots=True)
class Refused:
    """``decide`` rejected the command (a business rule), with its reason."""

    reason: str
    code: str


@dataclass(frozen=True, slots=True)
class Parked:
    """The entity is parked: this message waits for an operator.

    ``behind`` is false for the message whose handler failed, true for those queued after it.
    """

    reason: str
    failures: int
    behind: bool


Outcome = Applied | Refused | Parked


@dataclass(slots=True)
class Delivery:
    """One command handed to an actor; the actor fills in ``outcome`` and signals ``batch``."""

    prepared: Prepared
    batch: BatchTracker
    outcome: Outcome | None = None


class BatchTracker:
    """Counts the deliveries of one batch still being handled."""

    def __init__(self) -> None:
        self._pending = 0
        self._done = anyio.Event()

    def add(self) -> None:
        """One more delivery to wait for."""
        self._pending += 1

    def done(self) -> None:
        """One delivery finished."""
        self._pending -= 1
        if self._pending == 0:
            self._done.set()

    async def wait(self) -> None:
        """Wait until every delivery added has finished."""
        if self._pending:
            await self._done.wait()


@dataclass(frozen=True, slots=True)
class Supervision:
    """How an actor whose handler raises is restarted."""

    max_failures: int = 5
    backoff_initial_s: float = 0.01
    backoff_max_s: float = 2.0

    def backoff_s(self, failures: int) -> float:
        """Delay before attempt ``failures + 1``: doubling from the initial delay, capped."""
        return float(min(self.backoff_max_s, self.backoff_initial_s * 2 ** (failures - 1)))


@dataclass(eq=False)
class EntityActor:
    """The live actor of one entity; its task is started by the partition worker."""

    kind: EntityKind[Any, Any]
    entity: str
    state: Any
    parked: bool
    supervision: Supervision
    last_used: float = field(default_factory=time.monotonic)
    load_error: str = ""
    """Set when the stored state could not be read: every message parks with this reason."""
    _send: MemoryObjectSendStream[Delivery] = field(init=False, repr=False)
    _receive: MemoryObjectReceiveStream[Delivery] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The batch window bounds what can be queued here: the dispatcher never waits on a
        # mailbox, so one entity in back-off cannot hold up the others.
        self._send, self._receive = anyio.create_memory_object_stream[Delivery](
            max_buffer_size=float("inf")
        )

    def deliver(self, delivery: Delivery) -> None:
        """Queue a delivery (never blocks)."""
        self.last_used = time.monotonic()
        delivery.batch.add()
        self._send.send_nowait(delivery)

    def close(self) -> None:
        """Passivate: the task ends once the mailbox is empty."""
        self._send.close()

    async def run(self) -> None:
        """Handle deliveries in order until passivated."""
        async with self._receive:
            async for delivery in self._receive:
                try:
                    delivery.outcome = await self._handle(delivery.prepared)
                finally:
                    delivery.batch.done()

    async def _handle(self, prepared: Prepared) -> Outcome:
        if self.parked:
            return Parked(reason="entity is parked", failures=0, behind=True)
        if self.load_error:
            self.parked = True
            log.error(
                "entity_parked", entity=f"{self.kind.name}:{self.entity}", reason=self.load_error
            )
            return Parked(reason=self.load_error, failures=1, behind=False)
        command = prepared.command
        failures = 0
        with structlog.contextvars.bound_contextvars(
            entity=f"{self.kind.name}:{self.entity}",
            command_id=command.id,
            correlation_id=command.correlation_id,
        ):
            while True:
                try:
                    decision = self.kind.decide(self.state, command)
                    if isinstance(decision, Rejected):
                        log.info("command_rejected", reason=decision.reason)
                        return Refused(decision.reason, decision.code)
                    if not isinstance(decision, Accepted):
                        raise TypeError(f"decide returned {type(decision).__name__}")
                    state = self.kind.apply(self.state, decision.events)
                except Exception as exc:
                    failures += 1
                    reason = f"{type(exc).__name__}: {exc}"
                    if failures >= self.supervision.max_failures:
                        self.parked = True
                        log.error(
                            "entity_parked",
                            reason=reason,
                            failures=failures,
                            traceback=traceback.format_exc(limit=5),
                        )
                        return Parked(reason=reason, failures=failures, behind=False)
                    delay_s = self.supervision.backoff_s(failures)
                    log.warning(
                        "actor_restarting", reason=reason, failures=failures, delay_s=delay_s
                    )
                    await anyio.sleep(delay_s)
                    continue
                self.state = state
                return Applied(state, tuple(decision.events), tuple(decision.effects))
