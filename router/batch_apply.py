"""Applying one batch: the partition's live actors, in-memory dedupe, local fan-out.

A batch's commands are offered to their actors in stream order, each followed by the local
commands it sends (:mod:`caresync.router.local_fanout`); what they change comes back as one
:class:`~caresync.store.BatchWrite` for the pipeline to commit.  Actors stay live across
batches (up to a cap) and are passivated only once their state is committed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Set
from dataclasses import dataclass, field
from typing import Any

import msgspec
from anyio.abc import TaskGroup

from caresync.actors.contract import EntityKind, Registry
from caresync.codecs import CodecError, Subjects
from caresync.router.actor import (
    Applied,
    BatchTracker,
    Delivery,
    EntityActor,
    Parked,
    Refused,
)
from caresync.router.decoding import CommandDecoder, Prepared
from caresync.router.local_fanout import LocalFanout, Tree
from caresync.router.outbox_rows import (
    dead_letter_row,
    effect_row,
    parked_row,
    undecodable_row,
)
from caresync.router.transport import Inbound
from caresync.router.worker_settings import WorkerSettings
from caresync.router.worker_stats import WorkerStats
from caresync.store import (
    AppliedRow,
    BatchWrite,
    EntityRow,
    OutboxRow,
    ParkedRow,
    Store,
)
from caresync.store.point_reads import PointReader

DedupeKey = tuple[str, str, str]
"""(kind, entity id, command id)."""


class UncommittedKeys:
    """Dedupe keys of batches applied but not yet committed: the store does not have them, so
    a duplicate in the next batch is found here."""

    def __init__(self) -> None:
        self._by_batch: dict[int, list[DedupeKey]] = {}
        self._keys: set[DedupeKey] = set()
        """Every key of ``_by_batch``, plus those of batches committed since the last dedupe
        read began (see :meth:`before_read`)."""
        self._committed: list[list[DedupeKey]] = []
        """Keys of batches committed since then: still in ``_keys``."""

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, batch_no: int, keys: list[DedupeKey]) -> None:
        """The keys a batch applied (it is not committed yet)."""
        self._by_batch[batch_no] = keys
        self._keys.update(keys)

    def committed(self, through: int) -> None:
        """Every batch up to number ``through`` is committed."""
        for no in [n for n in self._by_batch if n <= through]:
            self._committed.append(self._by_batch.pop(no))

    def before_read(self) -> None:
        """Drop the keys of batches committed by now, just before a dedupe read of the store:
        that read sees them.

        Not when the commit lands: a read already running may have begun before it, and
        would see the keys in neither place (a duplicate applied again).  Keys committed
        while a read runs stay in memory until the next one begins.
        """
        for keys in self._committed:
            self._keys.difference_update(keys)
        self._committed.clear()


@dataclass(slots=True)
class _Pass:
    """One pass of applying a batch (a batch is applied again if the store knew a local
    command that memory did not)."""

    loaded: dict[tuple[str, str], EntityRow]
    known: Set[DedupeKey]
    """Local commands the store has: duplicates."""
    tracker: BatchTracker = field(default_factory=BatchTracker)
    deliveries: list[Delivery] = field(default_factory=list)
    seen: set[DedupeKey] = field(default_factory=set)
    derived: set[DedupeKey] = field(default_factory=set)
    """Local commands offered: their dedupe records are looked for once the pass is done."""
    saved: dict[tuple[str, str], tuple[Any, bool, str] | None] = field(default_factory=dict)
    """Each touched actor as it was before (state, parked, load error); None if not live."""
    absent: set[tuple[str, str]] = field(default_factory=set)
    """Entities the store has no snapshot of (read while fanning out)."""


class BatchApplier:
    """The live actors of one partition, and the application of batches to them."""

    def __init__(
        self,
        *,
        stream: str,
        store: Store,
        registry: Registry,
        subjects: Subjects,
        settings: WorkerSettings,
        refdata: Callable[[int], Any] | None = None,
        refdata_barrier: Callable[[], Awaitable[None]] | None = None,
        partition: int = 0,
    ) -> None:
        self.stream = stream
        self._store = store
        self._registry = registry
        self._subjects = subjects
        self._hop_prefix = f"{subjects.prefix}.int."
        self._settings = settings
        self._decoder = CommandDecoder(registry, subjects, refdata)
        self._fanout = LocalFanout(subjects, self._decoder, partition)
        self._refdata_barrier = refdata_barrier
        self._point: PointReader | None = None
        """Opened on first use: the batch's dedupe and entity reads."""
        self._state_decoders = {
            name: msgspec.msgpack.Decoder(kind.state_type) for name, kind in registry.kinds.items()
        }
        self._encoder = msgspec.msgpack.Encoder()
        self._actors: OrderedDict[tuple[str, str], EntityActor] = OrderedDict()
        self.task_group: TaskGroup | None = None
        """Where actors run once a delivery has to wait in a mailbox (set by the pipeline)."""
        self.keys = UncommittedKeys()
        self._batch_no = 0
        self._stats = WorkerStats()

    @property
    def live(self) -> int:
        """Entities with a live actor now."""
        return len(self._actors)

    async def apply(self, batch: list[Inbound], batch_no: int) -> tuple[BatchWrite, WorkerStats]:
        """Run batch number ``batch_no`` through the actors; return everything it changes (not
        yet committed) and its counts (to be added to the worker's once it is committed, so
        that health never reports more than is durable)."""
        write = BatchWrite()
        stats = self._stats = WorkerStats()
        if not batch:
            return write, stats
        self._batch_no = batch_no
        stats.batches = 1
        stats.received = len(batch)
        stats.last_seq = batch[-1].seq
        write.offsets[self.stream] = batch[-1].seq
        now = time.time()
        if self._refdata_barrier is not None:
            await self._refdata_barrier()
        prepared: list[Prepared] = []
        missing: set[tuple[str, str]] = set()
        for message in batch:
            try:
                p = self._decoder.prepare(message)
            except CodecError as exc:
                stats.dead_lettered += 1
                write.outbox.append(undecodable_row(self._subjects, message, exc))
                continue
            prepared.append(p)
            if p.key not in self._actors:
                missing.add(p.key)
        if not prepared:
            return write, stats
        self.keys.before_read()
        # Read at once on this thread: a hand-off to the store's reader thread and back costs
        # more than these indexed lookups (and adds to the latency of every batch).
        reader = self._point_reader()
        done_before = reader.applied_among(
            [(p.kind.name, p.command.entity, p.command.id) for p in prepared]
        )
        loaded = reader.load_entities(list(missing)) if missing else {}
        # Local commands are deduped against memory as they are applied, against the store in
        # one read once the batch is applied: one that the store has (rare: a key that does not
        # follow from its cause's) undoes the batch, which is applied again knowing it.
        known: set[DedupeKey] = set()
        duplicates = stats.duplicates
        while True:
            run = _Pass(loaded, known)
            await self._apply_in_order(prepared, done_before, run)
            found = reader.applied_among(list(run.derived)) if run.derived else set()
            if not found:
                break
            known |= found
            self._undo(run)
            stats.duplicates = duplicates
        touched: dict[tuple[str, str], tuple[EntityActor, int]] = {}
        for d in run.deliveries:
            self._record(d, write, touched, now)
        for (kind, entity), (actor, seq) in touched.items():
            raw = actor.state if actor.load_error else self._encoder.encode(actor.state)
            write.entities.append(EntityRow(kind, entity, raw, actor.parked, seq))
        self.keys.add(batch_no, [(a.kind, a.entity, a.command_id) for a in write.applied])
        write.outbox = self._hops_first(write.outbox)
        return write, stats

    def _hops_first(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        """``rows`` with the commands for other partitions first, each group in its order.

        They are the ones another partition waits for: published first, they reach it while
        the rest of the batch (local records, downstream effects, dead letters) is published.
        The order of the rows of one subject is unchanged, so per-entity order holds."""
        hop = self._hop_prefix
        hops = [row for row in rows if row.subject.startswith(hop)]
        if not hops or len(hops) == len(rows):
            return rows
        return hops + [row for row in rows if not row.subject.startswith(hop)]

    async def _apply_in_order(
        self, prepared: list[Prepared], done_before: Set[DedupeKey], run: _Pass
    ) -> None:
        """Offer each command to its actor in stream order, each followed by the local
        commands it sends (:mod:`caresync.router.local_fanout`)."""
        for p in prepared:
            dedupe_key = (p.kind.name, p.command.entity, p.command.id)
            if dedupe_key in done_before or dedupe_key in run.seen or dedupe_key in self.keys:
                self._stats.duplicates += 1
                continue
            run.seen.add(dedupe_key)
            delivery = await self._offer(p, run)
            if isinstance(delivery.outcome, Applied) and delivery.outcome.effects:
                await self._fan_out(delivery, Tree(p.message), run)
        await run.tracker.wait()

    async def _offer(self, p: Prepared, run: _Pass) -> Delivery:
        """Hand one command to its actor; wait for its outcome if its handler raised (the
        supervision decides before the next command, so that the local commands it may send
        keep their place)."""
        key = p.key
        if key not in run.saved:
            live = self._actors.get(key)
            run.saved[key] = None if live is None else (live.state, live.parked, live.load_error)
        delivery = Delivery(p, run.tracker)
        self._actor(p.kind, p.command.entity, run.loaded).offer(delivery)
        run.deliveries.append(delivery)
        if delivery.outcome is None:
            await run.tracker.wait()
        return delivery

    async def _fan_out(self, cause: Delivery, tree: Tree, run: _Pass) -> None:
        """Build the outbox rows of an applied command's effects, and apply those for entities
        of this partition right away, depth first."""
        assert isinstance(cause.outcome, Applied)
        p = cause.prepared
        rows: list[OutboxRow] = []
        cause.effect_rows = rows
        effects = cause.outcome.effects
        # The targets not live nor read yet, in one query: absent ones are new entities.
        wanted = [
            key
            for key in self._fanout.targets(effects)
            if key not in self._actors and key not in run.loaded and key not in run.absent
        ]
        if wanted:
            found = self._point_reader().load_entities(wanted)
            run.loaded.update(found)
            run.absent.update(key for key in wanted if key not in found)
        for effect in effects:
            row, local = self._fanout.local(p.kind.name, p.command, effect, tree)
            rows.append(row)
            if local is None:
                continue
            dedupe_key = (local.kind.name, local.command.entity, local.command.id)
            if dedupe_key in run.seen or dedupe_key in self.keys or dedupe_key in run.known:
                self._stats.duplicates += 1
                continue
            run.seen.add(dedupe_key)
            run.derived.add(dedupe_key)
            key = local.key
            delivery = await self._offer(local, run)
            if isinstance(delivery.outcome, Parked):
                tree.parked.add(key)
            elif isinstance(delivery.outcome, Applied) and delivery.outcome.effects:
                await self._fan_out(delivery, tree, run)

    def _undo(self, run: _Pass) -> None:
        """Put every actor the pass touched back as it was before it."""
        for key, before in run.saved.items():
            actor = self._actors.get(key)
            if actor is None:
                continue
            if before is None:  # made by this pass: made again from the store next time
                del self._actors[key]
                actor.close()
            else:
                actor.state, actor.parked, actor.load_error = before

    def _point_reader(self) -> PointReader:
        if self._point is None:
            self._point = PointReader(self._store.path)
        return self._point

    def _close_point_reader(self) -> None:
        if self._point is not None:
            self._point.close()
            self._point = None

    def _record(
        self,
        d: Delivery,
        write: BatchWrite,
        touched: dict[tuple[str, str], tuple[EntityActor, int]],
        now: float,
    ) -> None:
        p, outcome, msg = d.prepared, d.outcome, d.prepared.message
        kind, entity, command = p.kind.name, p.command.entity, p.command
        if msg.local_n:
            self._stats.local += 1
        if isinstance(outcome, Applied):
            self._stats.accepted += 1
            write.applied.append(AppliedRow(command.id, kind, entity, msg.seq, "accepted", "", now))
            if d.effect_rows is not None:
                write.outbox.extend(d.effect_rows)
            else:
                write.outbox.extend(
                    effect_row(self._subjects, kind, command, e) for e in outcome.effects
                )
            touched[p.key] = (self._actors[p.key], msg.seq)
        elif isinstance(outcome, Refused):
            self._stats.rejected += 1
            write.applied.append(
                AppliedRow(command.id, kind, entity, msg.seq, "rejected", outcome.reason, now)
            )
            write.outbox.append(
                dead_letter_row(
                    self._subjects,
                    msg,
                    outcome.code,
                    outcome.reason,
                    kind=f"{kind}.{command.name}",
                    entity=entity,
                )
            )
        elif isinstance(outcome, Parked):
            self._stats.parked += 1
            write.parked.append(
                parked_row(kind, msg, command, outcome.reason, outcome.failures, now)
            )
            if not outcome.behind:
                touched[p.key] = (self._actors[p.key], msg.seq)
        else:  # pragma: no cover - every delivery gets an outcome before the tracker fires
            raise RuntimeError(f"delivery of {command.id} finished without an outcome")

    # -- actors ---------------------------------------------------------------------------------
    def _actor(
        self,
        kind: EntityKind[Any, Any],
        entity: str,
        loaded: dict[tuple[str, str], EntityRow],
    ) -> EntityActor:
        key = (kind.name, entity)
        actor = self._actors.get(key)
        if actor is not None:
            self._actors.move_to_end(key)
            actor.batch_no = self._batch_no
            return actor
        stored = loaded.get(key)
        if stored is None:
            actor = EntityActor(
                kind, entity, kind.initial(entity), False, self._settings.supervision
            )
        else:
            try:
                state = self._state_decoders[kind.name].decode(stored.state)
                actor = EntityActor(kind, entity, state, stored.parked, self._settings.supervision)
            except msgspec.DecodeError as exc:
                # Keep the stored bytes as they are, for an operator to inspect or repair.
                actor = EntityActor(kind, entity, stored.state, False, self._settings.supervision)
                actor.load_error = f"stored state does not decode: {exc}"
        actor.batch_no = self._batch_no
        actor.start_task = self._start_actor
        self._actors[key] = actor
        return actor

    def _start_actor(self, actor: EntityActor) -> None:
        """Run an actor's task (once a delivery has to wait in its mailbox)."""
        assert self.task_group is not None, "actors only get deliveries inside the pipeline"
        self.task_group.start_soon(actor.run, name=f"actor {actor.kind.name}:{actor.entity}")

    def passivate(self, committed_no: int) -> int:
        """Drop idle actors, and the least recently used over the cap; never one whose state is
        not committed yet (every batch through ``committed_no`` is; actors are in order of use,
        so the others are all at the end).  Returns how many were dropped."""
        dropped = 0
        cap = self._settings.max_live_actors
        idle_before = time.monotonic() - self._settings.idle_passivate_s
        while self._actors:
            key, actor = next(iter(self._actors.items()))
            if actor.batch_no > committed_no:
                break
            if len(self._actors) <= cap and actor.last_used > idle_before:
                break
            del self._actors[key]
            actor.close()
            dropped += 1
        return dropped

    def close(self) -> None:
        """Stop every actor and the point reader."""
        for actor in self._actors.values():
            actor.close()
        self._actors.clear()
        self._close_point_reader()

    # -- parked entities --------------------------------------------------------------------------
    async def release(
        self, kind: str, entity: str
    ) -> tuple[BatchWrite, WorkerStats, dict[str, Any]]:
        """Re-run a parked entity's parked messages, in order: what it changes, its counts, and
        what became of each message."""
        stats = self._stats = WorkerStats()
        spec = self._registry.get(kind)
        if spec is None:
            return BatchWrite(), stats, {"error": f"unknown entity kind {kind!r}"}
        key = (kind, entity)
        rows = await self._store.parked(kind, entity)
        stored = await self._store.entity(kind, entity)
        if not rows and (stored is None or not stored.parked):
            return BatchWrite(), stats, {"error": f"{kind} {entity!r} is not parked"}
        actor = self._actor(spec, entity, {key: stored} if stored is not None else {})
        actor.parked = False
        write, tracker = BatchWrite(), BatchTracker()
        deliveries: list[tuple[Delivery, ParkedRow]] = []
        results: list[dict[str, Any]] = []
        for row in rows:
            message = Inbound(
                row.subject,
                row.data,
                row.headers,
                row.stream,
                row.seq,
                timestamp_ns=row.timestamp_ns,
            )
            try:
                prepared = self._decoder.prepare(message)
            except CodecError as exc:  # it decoded when it was parked; a schema change since
                write.outbox.append(dead_letter_row(self._subjects, message, exc.code, exc.reason))
                write.released.append((kind, entity, row.stream, row.seq))
                results.append({"seq": row.seq, "outcome": "dead_lettered", "reason": exc.reason})
                continue
            delivery = Delivery(prepared, tracker)
            actor.deliver(delivery)
            deliveries.append((delivery, row))
        await tracker.wait()
        touched: dict[tuple[str, str], tuple[EntityActor, int]] = {}
        now = time.time()
        for delivery, row in deliveries:
            outcome = delivery.outcome
            if isinstance(outcome, Parked):
                reason = outcome.reason
                # Failed again (or behind one that did): it stays parked, in its place.
                results.append({"seq": row.seq, "outcome": "parked", "reason": reason})
                continue
            write.released.append((kind, entity, row.stream, row.seq))
            self._record(delivery, write, touched, now)
            verdict = "applied" if isinstance(outcome, Applied) else "rejected"
            reason = outcome.reason if isinstance(outcome, Refused) else ""
            results.append({"seq": row.seq, "outcome": verdict, "reason": reason})
        state = actor.state if actor.load_error else self._encoder.encode(actor.state)
        last = max((seq for _, seq in touched.values()), default=stored.seq if stored else 0)
        write.entities.append(EntityRow(kind, entity, state, actor.parked, last))
        result = {"kind": kind, "id": entity, "parked": actor.parked, "messages": results}
        return write, stats, result
