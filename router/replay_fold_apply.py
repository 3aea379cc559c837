"""One command of a rebuild's fold (:mod:`.replay_fold`): the outcome the live actor would reach.

The same steps as :class:`caresync.router.actor.EntityActor` and the partition worker's
bookkeeping, without a task, a mailbox or a clock: dedupe per entity by command id, a parked
entity parks what comes after, ``decide`` then ``evolve`` for the rest; a handler that raises
is tried ``supervision.max_failures`` times in all, as the actor's restarts would (without the
back-off sleeps: handlers are pure), then its message and its entity are parked.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Any

import structlog

from caresync.actors.contract import Accepted, Command, EntityKind, Rejected
from caresync.codecs import Subjects
from caresync.router.actor import Applied, Outcome, Parked, Refused, Supervision
from caresync.router.decoding import Prepared
from caresync.router.local_fanout import LocalFanout, Tree
from caresync.router.outbox_rows import dead_letter_row, effect_row, parked_row
from caresync.router.worker_stats import WorkerStats
from caresync.store import AppliedRow, BatchWrite, OutboxRow

log = structlog.get_logger("caresync.actor")

EntityKey = tuple[str, str]
"""(kind, entity id)."""
DedupeKey = tuple[str, str, str]
"""(kind, entity id, command id)."""


@dataclass(slots=True)
class FoldEntity:
    """One entity's state during a fold (what the live actor holds)."""

    state: Any
    parked: bool = False
    load_error: str = ""
    """Set when the stored state could not be read (``state`` is then its raw bytes)."""
    seq: int = 0
    """The last message that changed it (or parked it)."""


class FoldApply:
    """Applies commands to in-memory entities; rows go to the write and :attr:`outbox`."""

    def __init__(
        self,
        subjects: Subjects,
        supervision: Supervision,
        in_outbox: Set[str] = frozenset(),
        fanout: LocalFanout | None = None,
    ) -> None:
        self._subjects = subjects
        self._fanout = fanout
        """Applies the commands for entities of the same partition with their cause, as the
        pipeline does (None: every effect only becomes an outbox row)."""
        self.lookup_entity: Callable[[EntityKey], FoldEntity | None] | None = None
        """Reads an entity that may be only in the store (set while it may be)."""
        self.lookup_applied: Callable[[DedupeKey], bool] | None = None
        """Reads a dedupe record that may be only in the store (set while it may be)."""
        self._supervision = supervision
        self._in_outbox = in_outbox
        """Keys of rows the outbox has: the store would keep them as they are."""
        self.entities: dict[EntityKey, FoldEntity] = {}
        self.dirty: dict[EntityKey, FoldEntity] = {}
        """Entities changed since the last commit: their snapshots go into the next one."""
        self.applied: set[DedupeKey] = set()
        """Commands that reached ``accepted`` or ``rejected`` (the dedupe records)."""
        self.window_seen: set[DedupeKey] = set()
        """Commands of the current window (a batch of the pipeline), parked ones included."""
        self.outbox: list[OutboxRow] = []
        """The current window's effects and rejections, in message order."""
        self.stats = WorkerStats()

    def apply(
        self, p: Prepared, write: BatchWrite, now: float, tree: Tree | None = None
    ) -> Outcome | None:
        """Decide one command and record its outcome as the pipeline's replay does; then the
        local commands it sends (``tree`` is their root's, for those).  None for a duplicate."""
        command, kind = p.command, p.kind
        name, entity = kind.name, command.entity
        dedupe = (name, entity, command.id)
        if (
            dedupe in self.applied
            or dedupe in self.window_seen
            or (tree is not None and self._stored_applied(dedupe))
        ):
            self.stats.duplicates += 1
            return None
        self.window_seen.add(dedupe)
        if tree is not None:
            self.stats.local += 1
        key = (name, entity)
        target = self.entities.get(key)
        if target is None and tree is not None and self.lookup_entity is not None:
            target = self.lookup_entity(key)
            if target is not None:
                self.entities[key] = target
        if target is None:
            target = self.entities[key] = FoldEntity(kind.initial(entity))
        seq = p.message.seq
        if target.parked:
            parked = Parked("entity is parked", 0, behind=True)
            self._park(p, write, parked, now)
            return parked
        if target.load_error:
            target.parked = True
            self._log(p).error("entity_parked", reason=target.load_error)
            outcome: Outcome = Parked(target.load_error, 1, behind=False)
        else:
            tried = self._try(kind, target, command)
            outcome = self._supervise(p, target, tried) if isinstance(tried, Exception) else tried
        if isinstance(outcome, Applied):
            self.stats.accepted += 1
            self.applied.add(dedupe)
            write.applied.append(AppliedRow(command.id, name, entity, seq, "accepted", "", now))
            if self._fanout is None or not outcome.effects:
                subjects, known = self._subjects, self._in_outbox
                self.outbox.extend(
                    effect_row(subjects, name, command, e)
                    for e in outcome.effects
                    if e.key not in known
                )
        elif isinstance(outcome, Refused):
            self.stats.rejected += 1
            self.applied.add(dedupe)
            self._log(p).info("command_rejected", reason=outcome.reason)
            write.applied.append(
                AppliedRow(command.id, name, entity, seq, "rejected", outcome.reason, now)
            )
            self.outbox.append(
                dead_letter_row(
                    self._subjects,
                    p.message,
                    outcome.code,
                    outcome.reason,
                    kind=f"{name}.{command.name}",
                    entity=entity,
                )
            )
            return outcome
        else:
            self._park(p, write, outcome, now)
        target.seq = seq
        self.dirty[key] = target
        if isinstance(outcome, Applied) and self._fanout is not None and outcome.effects:
            self._fan_out(p, outcome, write, now, tree or Tree(p.message))
        return outcome

    def _fan_out(
        self, cause: Prepared, outcome: Applied, write: BatchWrite, now: float, tree: Tree
    ) -> None:
        """The effects' rows, and the local commands applied depth first, in the pipeline's
        order: the cause's rows come before those of the commands it applied."""
        assert self._fanout is not None
        at, known = len(self.outbox), self._in_outbox
        rows = []
        for effect in outcome.effects:
            row, local = self._fanout.local(cause.kind.name, cause.command, effect, tree)
            if row.key not in known:
                rows.append(row)
            if local is not None and isinstance(self.apply(local, write, now, tree), Parked):
                tree.parked.add(local.key)
        self.outbox[at:at] = rows

    def _stored_applied(self, dedupe: DedupeKey) -> bool:
        return self.lookup_applied is not None and self.lookup_applied(dedupe)

    @staticmethod
    def _try(
        kind: EntityKind[Any, Any], target: FoldEntity, command: Command[Any]
    ) -> Applied | Refused | Exception:
        """``decide`` then ``evolve`` once (``EntityActor._apply``); the exception if one raised."""
        try:
            decision = kind.decide(target.state, command)
            if isinstance(decision, Rejected):
                return Refused(decision.reason, decision.code)
            if not isinstance(decision, Accepted):
                raise TypeError(f"decide returned {type(decision).__name__}")
            state = kind.apply(target.state, decision.events)
        except Exception as exc:
            return exc
        target.state = state
        return Applied(state, tuple(decision.events), tuple(decision.effects))

    def _supervise(self, p: Prepared, target: FoldEntity, error: Exception) -> Outcome:
        """The restarts of ``EntityActor._supervise``: retry, park after ``max_failures``."""
        logger = self._log(p)
        failures = 1
        while True:
            reason = f"{type(error).__name__}: {error}"
            if failures >= self._supervision.max_failures:
                target.parked = True
                logger.error(
                    "entity_parked",
                    reason=reason,
                    failures=failures,
                    traceback="".join(traceback.format_exception(error, limit=5)),
                )
                return Parked(reason=reason, failures=failures, behind=False)
            logger.warning("actor_restarting", reason=reason, failures=failures, delay_s=0.0)
            tried = self._try(p.kind, target, p.command)
            if not isinstance(tried, Exception):
                return tried
            error = tried
            failures += 1

    def _park(self, p: Prepared, write: BatchWrite, outcome: Parked, now: float) -> None:
        msg, command = p.message, p.command
        self.stats.parked += 1
        write.parked.append(
            parked_row(p.kind.name, msg, command, outcome.reason, outcome.failures, now)
        )

    def _log(self, p: Prepared) -> structlog.typing.FilteringBoundLogger:
        command = p.command
        bound: structlog.typing.FilteringBoundLogger = log.bind(
            entity=f"{p.kind.name}:{command.entity}",
            command_id=command.id,
            correlation_id=command.correlation_id,
        )
        return bound
