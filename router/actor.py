"""A live entity: one mailbox, one task, strict order, supervision with back-off.

The actor runs its kind's pure ``decide``/``evolve`` for each delivery in mailbox order.  If
they raise, the actor is restarted from its last good state after an exponential back-off;
after ``max_failures`` the message is parked with the reason and the entity holds back every
later message until it is released.  Other entities are unaffected: each has its own task.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import structlog

from caresync.actors.contract import Accepted, Effect, EntityKind, Rejected
from caresync.router.decoding import Prepared

log = structlog.get_logger("caresync.actor")


# -- outcomes ---------------------------------------------------------------------------------
class Applied(msgspec.Struct, frozen=True, gc=False):
    """The command was accepted; the state after it and the effects to send."""

    state: Any
    events: tuple[Any, ...]
    effects: tuple[Effect, ...]


class Refused(msgspec.Struct, frozen=True, gc=False):
    """``decide`` rejected the command (a business rule), with its reason."""

    reason: str
    code: str


class Parked(msgspec.Struct, frozen=True, gc=False):
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
    error: Exception | None = None
    """What the handler raised when :meth:`EntityActor.offer` applied it at once: the actor's
    task supervises from there (this was the first attempt)."""
    effect_rows: list[Any] | None = None
    """The outbox rows of its effects, when the worker built them while applying the local
    ones (:mod:`caresync.router.local_fanout`)."""


class BatchTracker:
    """Counts the deliveries of one batch still being handled."""

    def __init__(self) -> None:
        self._pending = 0
        self._done = anyio.Event()

    def add(self) -> None:
        """One more delivery to wait for."""
        if self._pending == 0 and self._done.is_set():
            self._done = anyio.Event()  # waited for once already: wait afresh
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


class EntityActor:
    """The live actor of one entity; its task is started by the partition worker.

    The dispatcher applies a delivery at once when the actor is idle (:meth:`offer`); else it
    goes to the mailbox, a plain deque with a wake-up event that exists only while the task
    waits: a whole batch's deliveries for an entity are queued and its task woken once.
    The batch window bounds what can be queued, and the dispatcher never waits on a mailbox,
    so an entity in back-off cannot hold up the others.
    """

    __slots__ = (
        "_busy",
        "_closed",
        "_mailbox",
        "_started",
        "_wakeup",
        "batch_no",
        "entity",
        "kind",
        "last_used",
        "load_error",
        "parked",
        "start_task",
        "state",
        "supervision",
    )

    def __init__(
        self,
        kind: EntityKind[Any, Any],
        entity: str,
        state: Any,
        parked: bool,
        supervision: Supervision,
    ) -> None:
        self.kind = kind
        self.entity = entity
        self.state = state
        self.parked = parked
        self.supervision = supervision
        self.last_used = time.monotonic()
        self.batch_no = 0
        """The last batch that used it (set by the worker; passivation waits for its commit)."""
        self.load_error = ""
        """Set when the stored state could not be read: every message parks with this reason."""
        self._mailbox: deque[Delivery] = deque()
        self._wakeup: anyio.Event | None = None
        self._closed = False
        self._busy = False
        self._started = False
        self.start_task: Callable[[EntityActor], None] | None = None
        """Starts :meth:`run` as a task; called when a first delivery has to be queued (most
        actors are only ever offered deliveries when idle, and never need a task)."""

    def deliver(self, delivery: Delivery) -> None:
        """Queue a delivery (never blocks)."""
        self.last_used = time.monotonic()
        delivery.batch.add()
        self._mailbox.append(delivery)
        if self._wakeup is not None:
            self._wakeup.set()
        elif not self._started:
            self._started = True
            if self.start_task is None:
                raise RuntimeError(f"actor {self.kind.name}:{self.entity} has no task starter")
            self.start_task(self)

    def offer(self, delivery: Delivery) -> None:
        """Apply at once when nothing is queued or being handled here (the common case: no
        task switch, no wake-up), else queue behind what is.  A handler that raises leaves
        the delivery to the task, which supervises it as a first failure."""
        if self._mailbox or self._busy:
            self.deliver(delivery)
            return
        self.last_used = time.monotonic()
        outcome = self._try(delivery.prepared)
        if isinstance(outcome, Exception):
            delivery.error = outcome
            self.deliver(delivery)
        else:
            delivery.outcome = outcome

    def close(self) -> None:
        """Passivate: the task ends once the mailbox is empty."""
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def run(self) -> None:
        """Handle deliveries in order until passivated."""
        mailbox = self._mailbox
        while True:
            while not mailbox:
                if self._closed:
                    return
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
                self._wakeup = None
            delivery = mailbox.popleft()
            self._busy = True
            try:
                outcome = (
                    delivery.error if delivery.error is not None else self._try(delivery.prepared)
                )
                if isinstance(outcome, Exception):
                    outcome = await self._supervise(delivery.prepared, outcome)
                delivery.outcome = outcome
            finally:
                self._busy = False
                delivery.batch.done()

    def _log(self, prepared: Prepared) -> structlog.typing.FilteringBoundLogger:
        # Bound only on the paths that log: binding per message costs more than applying it.
        command = prepared.command
        bound: structlog.typing.FilteringBoundLogger = log.bind(
            entity=f"{self.kind.name}:{self.entity}",
            command_id=command.id,
            correlation_id=command.correlation_id,
        )
        return bound

    def _try(self, prepared: Prepared) -> Outcome | Exception:
        """Apply once; the exception if the handler raised (the caller supervises)."""
        if self.parked:
            return Parked(reason="entity is parked", failures=0, behind=True)
        if self.load_error:
            self.parked = True
            self._log(prepared).error("entity_parked", reason=self.load_error)
            return Parked(reason=self.load_error, failures=1, behind=False)
        try:
            return self._apply(prepared)
        except Exception as exc:
            return exc

    def _apply(self, prepared: Prepared) -> Outcome:
        decision = self.kind.decide(self.state, prepared.command)
        if isinstance(decision, Rejected):
            self._log(prepared).info("command_rejected", reason=decision.reason)
            return Refused(decision.reason, decision.code)
        if not isinstance(decision, Accepted):
            raise TypeError(f"decide returned {type(decision).__name__}")
        state = self.kind.apply(self.state, decision.events)
        self.state = state
        return Applied(state, tuple(decision.events), tuple(decision.effects))

    async def _supervise(self, prepared: Prepared, error: Exception) -> Outcome:
        """The handler raised ``error``: restart with back-off, park after ``max_failures``."""
        logger = self._log(prepared)
        failures = 1
        while True:
            reason = f"{type(error).__name__}: {error}"
            if failures >= self.supervision.max_failures:
                self.parked = True
                logger.error(
                    "entity_parked",
                    reason=reason,
                    failures=failures,
                    traceback="".join(traceback.format_exception(error, limit=5)),
                )
                return Parked(reason=reason, failures=failures, behind=False)
            delay_s = self.supervision.backoff_s(failures)
            logger.warning("actor_restarting", reason=reason, failures=failures, delay_s=delay_s)
            await anyio.sleep(delay_s)
            try:
                return self._apply(prepared)
            except Exception as exc:
                error = exc
                failures += 1
