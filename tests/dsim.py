"""Deterministic simulation of the workflow actors under the router's delivery guarantees.

One seed is one run: a generated workload of source commands (scheduling, charges, coverage,
stock counts, ERP feedback) goes through a model of the router, with a seeded scheduler that
picks what happens next, and invariants are checked as it goes.  Nothing here reads a clock or
iterates a set, so the same seed gives the same run in any process.

The model is the one ``router/worker.py`` implements, not a freer one:

* Every entity has an input log (its mailbox): messages are applied strictly in log order,
  one entity at a time, and the scheduler interleaves entities at random.
* Applying is not committing: applied commands form an open batch (state, dedupe record and
  effects) that a *commit* step makes durable.  A *crash* loses the open batch and every live
  state; the uncommitted messages stay in their logs and are applied again (at-least-once),
  states come back from their stored msgpack bytes.
* Effects go to a per-(sender, target) outbox channel at commit and are *published* (appended
  to the target's log, or to a system's output stream) later, one step each, so an effect can
  be delayed arbitrarily and effects from different senders interleave; one sender's effects to
  one target keep their order.  Published effects are confirmed by the next commit; a crash
  before that publishes them again (same id: the receiver's dedupe drops them).
* A command id already applied to an entity (or seen earlier in the open batch) is skipped.
  Committed messages are also redelivered at random, and sources resend some messages.
* Connectors deliver each system's output stream in order, record what the system took, and
  publish ``downstream_ack`` (id ``ack:<effect key>``) to the owning actor; a connector may
  crash before acknowledging an effect and deliver it again (a ``duplicate`` outcome with the
  same ack id), or give up on it (``failed``).  ERP answers a new purchase order with
  ``item.po_acknowledged`` and, sometimes, ``item.goods_received`` (whole or in parts).
* Cross-entity order is free; the order within one entity's log never changes.

Invariants (see :class:`Checker`) are checked when a command is applied, after every commit,
and in full whenever the network is quiescent (nothing in flight); at the end every entity's
history is replayed from its initial state.  A violation raises :class:`Violation`, whose
message names the seed, the command that re-runs it, and the last steps.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import msgspec
from workflow_network import T0, demo_refdata

from caresync.actors import (
    Accepted,
    Command,
    Downstream,
    Effect,
    EntityKind,
    Registry,
    default_registry,
)
from caresync.actors import item as item_actor
from caresync.actors.refdata import RefData

Key = tuple[str, str]
"""(entity kind, entity id)."""

FACILITIES = ("MAIN", "NORTH")
ITEMS = ("gauze", "knee-kit", "lens")
CHARGE_CODES = {"gauze": "C-GAUZE", "knee-kit": "C-KNEE", "lens": "C-LENS"}
PROCEDURES = ("27447", "27447", "66984", "99999")
PAYERS = ("ACME", "ACME", "STRICT", "CHEAP", "")
OFFSETS = (timezone(timedelta(hours=-5)), UTC, timezone(timedelta(hours=1)))
SCHEDULING = ("book", "sync", "reschedule", "modify", "cancel", "no_show", "delete")
"""Appointment commands of the scheduling source: the ones a source timestamp orders."""
SYSTEMS = ("billing", "erp", "supply")

KNOWN_BUGS: frozenset[str] = frozenset()
"""Checks the CI sweep leaves out while they catch a known, unfixed actor bug (none now:
``po_rearm`` and ``billing_reversal_once`` were found by this simulator and fixed)."""


class Violation(AssertionError):
    """An invariant did not hold; the message says which seed and how to re-run it."""


# -- messages ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Message:
    """One command in an entity's input log, with its payload as it travels on the wire.

    Sources send JSON (their timestamps keep their offsets); actors' fan-out is msgpack.
    """

    kind: str
    entity: str
    name: str
    id: str
    occurred_at: datetime
    data: bytes
    wire_json: bool
    origin: str

    @property
    def key(self) -> Key:
        return (self.kind, self.entity)


def source(
    kind: str, entity: str, name: str, id: str, at: datetime, payload: Any, origin: str
) -> Message:
    """A source command (JSON on the wire)."""
    return Message(kind, entity, name, id, at, msgspec.json.encode(payload), True, origin)


@functools.cache
def _payload_decoders(
    payload_type: Any,
) -> tuple[msgspec.json.Decoder[Any], msgspec.msgpack.Decoder[Any]]:
    return msgspec.json.Decoder(payload_type), msgspec.msgpack.Decoder(payload_type)


@functools.cache
def _state_decoder(state_type: Any) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(state_type)


_ENCODER = msgspec.msgpack.Encoder()


# -- the workload -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Profile:
    """The size of a run and how often each fault happens (weights relative to one another)."""

    name: str
    appointments: tuple[int, int]
    visits: int
    max_changes: int
    crash: float
    redeliver: float
    passivate: float
    replay_probe: float
    drain: float
    connector_crash: float
    ack_failure: float
    fifo_breaks: float = 0.0
    """How often an effect overtakes the one its sender committed before it, for the same
    target.  The router never does this (0 in every profile); it is here to show what the
    actors would do if it did."""


SHORT = Profile("short", (1, 3), 1, 3, 0.25, 0.15, 0.2, 0.05, 0.08, 0.15, 0.05)
LONG = Profile("long", (5, 8), 2, 5, 0.15, 0.1, 0.2, 0.02, 0.03, 0.15, 0.05)
PROFILES = {p.name: p for p in (SHORT, LONG)}


class _Stream:
    """The messages of one source conversation, in the order the source sends them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.messages: list[Message] = []
        self.n = 0

    def add(
        self, kind: str, entity: str, name: str, at: datetime, payload: Any, origin: str
    ) -> Message:
        self.n += 1
        msg = source(kind, entity, name, f"{self.prefix}:{name}:{self.n}", at, payload, origin)
        self.messages.append(msg)
        return msg


def _start(rng: random.Random) -> datetime:
    # Late evening in UTC-5 is the next day in UTC: the case's date must come from its offset.
    return datetime(
        2027,
        3,
        rng.randint(8, 12),
        rng.choice((7, 13, 22, 23)),
        rng.choice((0, 30)),
        tzinfo=rng.choice(OFFSETS),
    )


def _procedures(rng: random.Random) -> list[dict[str, str]]:
    codes = list(dict.fromkeys(rng.choice(PROCEDURES) for _ in range(rng.randint(1, 2))))
    return [
        {"code": c, "provider_id": "DR-WHO" if c == "27447" and rng.random() < 0.25 else ""}
        for c in codes
    ]


def _details(rng: random.Random, appt: str, visits: list[str]) -> dict[str, Any]:
    visit = rng.choice(visits) if visits and rng.random() < 0.4 else ""
    return {
        "procedures": _procedures(rng),
        "facility_id": rng.choice(FACILITIES),
        "start": _start(rng),
        "duration_min": 90,
        "room": "OR-1",
        "providers": ["DR-WHO"] if rng.random() < 0.15 else [],
        "patient_class": "O",
        "patient_id": f"P-{appt}",
        "visit_number": visit,
        "payer_id": "" if visit and rng.random() < 0.6 else rng.choice(PAYERS),
    }


def _charges(
    rng: random.Random, appt: str, details: dict[str, Any], first_line: int
) -> list[dict[str, Any]]:
    lines = [
        {"line_id": f"{appt}-L{first_line}", "code": p["code"], "amount": "1000.00"}
        for p in details["procedures"][:1]
    ]
    for item in rng.sample(ITEMS, rng.randint(0, 2)):
        quantity = rng.randint(1, 5)
        lines.append(
            {
                "line_id": f"{appt}-L{first_line + len(lines)}",
                "code": CHARGE_CODES[item],
                "quantity": quantity,
                "amount": f"{quantity * 3}.00",
            }
        )
    return lines


def _appointment_stream(
    rng: random.Random, appt: str, visits: list[str], profile: Profile
) -> _Stream:
    """A case's life at its sources: scheduling (SIU/FHIR), charges (DFT), coverage (ADT)."""
    stream = _Stream(appt)
    t = T0 + timedelta(minutes=rng.randint(0, 600))
    details = _details(rng, appt, visits)
    sched: list[Message] = []

    def schedule(name: str, payload: Any) -> None:
        sched.append(stream.add("appointment", appt, name, t, payload, "sched"))

    schedule("book" if rng.random() < 0.8 else "sync", details)
    booked = True
    posted: list[dict[str, Any]] = []
    for _ in range(rng.randint(0, profile.max_changes)):
        t += timedelta(minutes=rng.randint(1, 240))
        r = rng.random()
        if r < 0.2:
            change: dict[str, Any] = {"start": _start(rng)}
            if rng.random() < 0.5:
                change["facility_id"] = rng.choice(FACILITIES)
            details = {**details, **change}
            schedule("reschedule", change)
        elif r < 0.4:
            change = rng.choice(
                (
                    {"procedures": _procedures(rng)},
                    {"procedures_added": _procedures(rng)},
                    {"procedures_removed": [rng.choice(PROCEDURES)]},
                    {"providers_added": ["DR-WHO"]},
                    {"providers": []},
                    {"payer_id": rng.choice(PAYERS)},
                )
            )
            schedule("modify", change)
        elif r < 0.5:
            details = {**details, "start": _start(rng), "payer_id": rng.choice(PAYERS)}
            schedule("sync", details)
        elif r < 0.65:
            schedule(rng.choice(("cancel", "cancel", "no_show", "delete")), {"reason": "x"})
            booked = False
        elif r < 0.75:
            if not booked:
                details = _details(rng, appt, visits)
            schedule("book", details)
            booked = True
        elif r < 0.85:
            payload = {"payer_id": rng.choice(PAYERS[:4]), "patient_class": "I"}
            stream.add("appointment", appt, "coverage", t, payload, "adt")
        elif r < 0.95:
            lines = _charges(rng, appt, details, len(posted) + 1)
            posted += lines
            via_visit = details["visit_number"] and rng.random() < 0.4
            if via_visit:
                visit = details["visit_number"]
                stream.add("visit", visit, "post_charges", t, {"lines": lines}, "dft")
            else:
                stream.add("appointment", appt, "post_charges", t, {"lines": lines}, "dft")
            booked = False
        if posted and rng.random() < 0.3:
            supply_lines = [line for line in posted if line["code"].startswith("C-")]
            if supply_lines:
                line = rng.choice(supply_lines)
                credit = {
                    "line_id": f"{appt}-L{len(posted) + 1}",
                    "code": line["code"],
                    "type": "credit",
                    "quantity": rng.randint(1, line["quantity"]),
                    "amount": "3.00",
                    "reverses": line["line_id"],
                }
                posted.append(credit)
                stream.add("appointment", appt, "post_charges", t, {"lines": [credit]}, "dft")
        if rng.random() < 0.05:
            claim = {"appointment_id": appt, "status": "denied", "claim_id": f"CLM-{appt}"}
            stream.add("billing", appt, "claim_status", t, claim, "billing")
    # Stale messages: an older scheduling message that arrives after newer ones.
    if len(sched) > 1 and rng.random() < 0.35:
        old = sched[0].occurred_at - timedelta(minutes=rng.randint(1, 30))
        stale: tuple[tuple[str, dict[str, Any]], ...] = (
            ("reschedule", {"start": _start(rng), "facility_id": rng.choice(FACILITIES)}),
            ("modify", {"procedures": _procedures(rng)}),
            ("cancel", {"reason": "old"}),
            ("book", _details(rng, appt, visits)),
        )
        name, payload = rng.choice(stale)
        stream.add("appointment", appt, name, old, payload, "sched")
    _swap_adjacent_scheduling(rng, stream.messages)
    return stream


def _swap_adjacent_scheduling(rng: random.Random, messages: list[Message]) -> None:
    """Two scheduling messages that overtook each other: the later-sent one is now stale."""
    positions = [i for i, m in enumerate(messages) if m.name in SCHEDULING]
    pairs = list(itertools.pairwise(positions))
    if pairs and rng.random() < 0.25:
        i, j = rng.choice(pairs)
        messages[i], messages[j] = messages[j], messages[i]


def _visit_stream(rng: random.Random, visit: str) -> _Stream:
    stream = _Stream(visit)
    t = T0 + timedelta(minutes=rng.randint(0, 600))
    for _ in range(rng.randint(0, 2)):
        payload = {"payer_id": rng.choice(PAYERS[:4]), "patient_class": "O", "location": "L1"}
        stream.add("visit", visit, "register", t, payload, "adt")
        t += timedelta(minutes=rng.randint(1, 120))
    return stream


def _stock_stream(rng: random.Random, entity: str) -> _Stream:
    """Stock counts of one item at one facility, as successive reference-data loads send."""
    stream = _Stream(f"stock:{entity}")
    payload: dict[str, Any]
    for version in range(1, 1 + (2 if rng.random() < 0.25 else 1)):
        payload = {
            "on_hand": rng.randint(0, 8),
            "reorder_point": rng.randint(0, 4),
            "reorder_quantity": 0 if rng.random() < 0.1 else rng.randint(1, 8),
            "refdata_version": version,
        }
        stream.add("item", entity, "set_stock", T0, payload, "refdata")
    for n in range(1, 1 + (rng.randint(1, 2) if rng.random() < 0.2 else 0)):
        # A FHIR SupplyRequest, sometimes sent again with other content (a new command id).
        at = T0 + timedelta(minutes=rng.randint(1, 600))
        for _ in range(2 if rng.random() < 0.2 else 1):
            payload = {"request_id": f"SR-{n}", "quantity": rng.randint(1, 6)}
            stream.add("item", entity, "request", at, payload, "fhir")
    return stream


def generate(rng: random.Random, profile: Profile) -> list[Message]:
    """The source log: every source's messages, sources interleaved at random."""
    visits = [f"V{i}" for i in range(1, profile.visits + 1)]
    streams = [
        _appointment_stream(rng, f"A{i}", visits, profile).messages
        for i in range(1, rng.randint(*profile.appointments) + 1)
    ]
    streams += [_visit_stream(rng, v).messages for v in visits]
    streams += [
        _stock_stream(rng, f"{item}@{facility}").messages
        for facility in FACILITIES
        for item in ITEMS
        if rng.random() < 0.8
    ]
    # Sources resend: some messages arrive again later (same id).
    for messages in streams:
        for i in range(len(messages) - 1, -1, -1):
            if rng.random() < 0.08:
                messages.insert(rng.randint(i + 1, len(messages)), messages[i])
    log: list[Message] = []
    queues = [deque(m) for m in streams if m]
    while queues:
        queue = rng.choices(queues, weights=[len(q) for q in queues])[0]
        log.append(queue.popleft())
        if not queue:
            queues.remove(queue)
    return log


# -- the runtime model ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Record:
    """A committed command of one entity: its verdict, events and effects (for replay)."""

    message: Message
    verdict: str
    events: tuple[Any, ...]
    effects: tuple[Effect, ...]


@dataclass(slots=True)
class _Applied:
    """A command applied in the open batch, not yet committed."""

    key: Key
    message: Message
    verdict: str  # accepted | rejected | duplicate
    events: tuple[Any, ...] = ()
    effects: tuple[Effect, ...] = ()


@dataclass(slots=True)
class _Channel:
    """Committed effects of one sender to one target; the first ``published`` await their mark."""

    items: deque[tuple[Effect, datetime]] = field(default_factory=deque)
    published: int = 0


@dataclass(slots=True)
class _Connector:
    """One system's output stream and what the system holds, by idempotency key."""

    stream: deque[tuple[Key, Effect]] = field(default_factory=deque)
    records: dict[str, str] = field(default_factory=dict)
    """Effect key to the reference the system gave it."""
    failed: dict[str, bool] = field(default_factory=dict)
    delivered: list[str] = field(default_factory=list)
    """Keys in the order the system saw them (redeliveries included)."""


Shadow = tuple[bool, int]
"""The PO oracle's view of one item: (above the reorder point since the last crossing,
crossings so far)."""


class Sim:
    """The router model: logs, open batch, durable store, outboxes, connectors, ERP feedback."""

    def __init__(
        self,
        seed: int,
        profile: Profile = SHORT,
        *,
        registry: Registry | None = None,
        skip: Iterable[str] = KNOWN_BUGS,
    ) -> None:
        self.seed = seed
        self.profile = profile
        self.rng = random.Random(f"dsim:{profile.name}:{seed}")
        self.registry = registry or default_registry()
        self.refdata: RefData = demo_refdata()
        self.sources = generate(self.rng, profile)
        self.next_source = 0
        self.feedback: deque[Message] = deque()
        # durable
        self.stored: dict[Key, bytes] = {}
        self.stored_shadow: dict[Key, Shadow] = {}
        self.applied: set[tuple[str, str, str]] = set()
        self.history: dict[Key, list[Record]] = {}
        self.channels: dict[tuple[Key, Key], _Channel] = {}
        self.logs: dict[Key, deque[Message]] = {}
        self.connectors = {s: _Connector() for s in SYSTEMS}
        # volatile (lost in a crash)
        self.live: dict[Key, Any] = {}
        self.live_shadow: dict[Key, Shadow] = {}
        self.cursor: dict[Key, int] = {}
        self.batch: list[_Applied] = []
        self.batch_seen: set[tuple[str, str, str]] = set()
        # scheduling
        self.ready: dict[Key, None] = {}
        """Entities with messages not applied yet (a dict: ordered, unlike a set)."""
        self.draining = False
        self.steps = 0
        self.trace: deque[str] = deque(maxlen=30)
        self.stats: Counter[str] = Counter()
        self.checker = Checker(self, frozenset(skip))

    # -- entities ---------------------------------------------------------------------------
    def kind(self, key: Key) -> EntityKind[Any, Any]:
        return self.registry.kinds[key[0]]

    def state(self, key: Key) -> Any:
        """The live state, else the stored one (decoded like a router reloading it)."""
        state = self.live.get(key)
        if state is None:
            state = self.stored_state(key)
            self.live[key] = state
        return state

    def stored_state(self, key: Key) -> Any:
        kind = self.kind(key)
        raw = self.stored.get(key)
        state_type: Any = kind.state_type
        return kind.initial(key[1]) if raw is None else _state_decoder(state_type).decode(raw)

    def shadow(self, key: Key) -> Shadow:
        return self.live_shadow.get(key, self.stored_shadow.get(key, (True, 0)))

    def command(self, msg: Message) -> Command[Any]:
        payload_type: Any = self.kind(msg.key).commands[msg.name]
        json, packed = _payload_decoders(payload_type)
        payload = (json if msg.wire_json else packed).decode(msg.data)
        return Command(
            id=msg.id,
            name=msg.name,
            entity=msg.entity,
            occurred_at=msg.occurred_at,
            payload=payload,
            source=msg.origin,
            refdata=self.refdata,
        )

    def deliver(self, msg: Message) -> None:
        """Append to the entity's log (the stream): from now on its place is fixed."""
        self.logs.setdefault(msg.key, deque()).append(msg)
        self.ready[msg.key] = None

    # -- steps ------------------------------------------------------------------------------
    def run(self, max_steps: int = 500_000) -> str:
        """Run to the end of the workload and to quiescence; returns the run's fingerprint."""
        while True:
            quiet = self.quiescent()
            if quiet and (self.draining or self.next_source >= len(self.sources)):
                self.checker.quiescent()
                self.stats["quiescent"] += 1
                self.draining = False
                if self.next_source >= len(self.sources):
                    break
            self.step()
            if self.steps > max_steps:
                self.fail("no quiescence: the network did not settle")
        self.checker.replay_all()
        return self.fingerprint()

    def quiescent(self) -> bool:
        return not (
            self.ready
            or self.batch
            or self.feedback
            or any(c.items for c in self.channels.values())
            or any(c.stream for c in self.connectors.values())
        )

    def step(self) -> None:
        self.steps += 1
        p = self.profile
        options: list[tuple[float, Callable[[], None]]] = []
        if self.next_source < len(self.sources) and not self.draining:
            options.append((3.0, self.ingest))
        if self.feedback:
            options.append((1.0, self.publish_feedback))
        if self.ready:
            options.append((8.0, self.apply_one))
        if self.batch or any(c.published for c in self.channels.values()):
            options.append((2.0, self.commit))
            options.append((p.crash, self.crash))
        if any(len(c.items) > c.published for c in self.channels.values()):
            options.append((5.0, self.publish))
        if any(c.stream for c in self.connectors.values()):
            options.append((2.0, self.connect))
        if self.history:
            options.append((p.redeliver, self.redeliver))
            options.append((p.replay_probe, self.replay_probe))
        if self.live:
            options.append((p.passivate, self.passivate))
        if not self.draining:
            options.append((p.drain, self.drain))
        action = self.rng.choices([a for _, a in options], weights=[w for w, _ in options])[0]
        action()

    def ingest(self) -> None:
        msg = self.sources[self.next_source]
        self.next_source += 1
        self.note(f"ingest {msg.kind}:{msg.entity} {msg.name} {msg.id} @{msg.occurred_at}")
        self.deliver(msg)

    def publish_feedback(self) -> None:
        msg = self.feedback.popleft()
        self.note(f"erp feedback {msg.entity} {msg.name} {msg.id}")
        self.deliver(msg)

    def drain(self) -> None:
        self.note("drain: sources pause until quiescent")
        self.draining = True

    def apply_one(self) -> None:
        key = self.rng.choice(list(self.ready))
        log = self.logs[key]
        i = self.cursor.get(key, 0)
        msg = log[i]
        self.cursor[key] = i + 1
        if i + 1 >= len(log):
            del self.ready[key]
        dedupe = (msg.kind, msg.entity, msg.id)
        if dedupe in self.applied or dedupe in self.batch_seen:
            self.note(f"skip duplicate {key[0]}:{key[1]} {msg.id}")
            self.batch.append(_Applied(key, msg, "duplicate"))
            self.stats["duplicates"] += 1
            return
        self.batch_seen.add(dedupe)
        kind = self.kind(key)
        command = self.command(msg)
        before = self.state(key)
        decision = kind.decide(before, command)
        if isinstance(decision, Accepted):
            after = kind.apply(before, decision.events)
            applied = _Applied(key, msg, "accepted", decision.events, decision.effects)
        else:
            after = before
            applied = _Applied(key, msg, "rejected")
        self.note(f"apply {key[0]}:{key[1]} {msg.name} {msg.id} -> {applied.verdict}")
        self.checker.applied(key, command, before, after, applied)
        self.live[key] = after
        self.batch.append(applied)
        self.stats[applied.verdict] += 1
        self.stats[f"{msg.kind}.{msg.name}:{applied.verdict}"] += 1

    def commit(self) -> None:
        """State, dedupe records, effects and offsets in one transaction; marks of publishes."""
        self.note(f"commit {len(self.batch)}")
        touched: dict[Key, None] = {}
        new_effects: list[tuple[Key, Effect]] = []
        for a in self.batch:
            self.logs[a.key].popleft()
            self.cursor[a.key] -= 1
            if not self.logs[a.key]:
                del self.logs[a.key]
                del self.cursor[a.key]
            if a.verdict == "duplicate":
                continue
            self.applied.add((a.key[0], a.key[1], a.message.id))
            record = Record(a.message, a.verdict, a.events, a.effects)
            self.history.setdefault(a.key, []).append(record)
            touched[a.key] = None
            for effect in a.effects:
                target: Key = (
                    ("out", effect.target.system)
                    if isinstance(effect.target, Downstream)
                    else (effect.target.kind, effect.target.entity)
                )
                channel = self.channels.setdefault((a.key, target), _Channel())
                channel.items.append((effect, a.message.occurred_at))
                new_effects.append((a.key, effect))
        for key in touched:
            self.stored[key] = _ENCODER.encode(self.live[key])
            if key in self.live_shadow:
                self.stored_shadow[key] = self.live_shadow.pop(key)
        for channel in self.channels.values():
            for _ in range(channel.published):
                channel.items.popleft()
            channel.published = 0
        self.batch.clear()
        self.batch_seen.clear()
        self.checker.committed(list(touched), new_effects)

    def crash(self) -> None:
        """The router dies: the open batch and live states are gone, unmarked publishes redo."""
        self.note(f"CRASH (open batch of {len(self.batch)} lost)")
        self.stats["crashes"] += 1
        self.live.clear()
        self.live_shadow.clear()
        self.batch.clear()
        self.batch_seen.clear()
        self.cursor.clear()
        self.ready = dict.fromkeys(self.logs)
        for channel in self.channels.values():
            channel.published = 0

    def publish(self) -> None:
        channels = [c for c in self.channels.items() if len(c[1].items) > c[1].published]
        (sender, target), channel = self.rng.choice(channels)
        i = channel.published
        breaks = self.profile.fifo_breaks
        if breaks and len(channel.items) > i + 1 and self.rng.random() < breaks:
            channel.items[i], channel.items[i + 1] = channel.items[i + 1], channel.items[i]
        effect, occurred_at = channel.items[i]
        channel.published += 1
        if isinstance(effect.target, Downstream):
            self.note(f"publish {effect.key} -> out.{effect.target.system}")
            self.connectors[effect.target.system].stream.append((sender, effect))
            return
        self.note(f"publish {effect.key} -> {target[0]}:{target[1]}")
        data = _ENCODER.encode(effect.payload if effect.payload is not None else {})
        origin = f"{sender[0]}:{sender[1]}"
        self.deliver(
            Message(target[0], target[1], effect.name, effect.key, occurred_at, data, False, origin)
        )

    def connect(self) -> None:
        """A connector delivers the head of one system's stream and acknowledges it."""
        system = self.rng.choice([s for s, c in self.connectors.items() if c.stream])
        conn = self.connectors[system]
        owner, effect = conn.stream[0]
        assert isinstance(effect.target, Downstream)
        key = effect.key
        conn.delivered.append(key)
        if key not in conn.failed:
            conn.failed[key] = self.rng.random() < self.profile.ack_failure
        reference = ""
        if conn.failed[key]:
            outcome = "failed"
        elif key in conn.records:
            outcome, reference = "duplicate", conn.records[key]
        else:
            outcome, reference = "created", f"{system.upper()}-{len(conn.records) + 1:06d}"
            conn.records[key] = reference
            if effect.name == "purchase_order":
                self.erp_feedback(effect, reference)
        self.note(f"connector {system} {effect.name} {key} -> {outcome}")
        ack = {
            "effect_key": key,
            "system": system,
            "operation": effect.name,
            "outcome": outcome,
            "reference": reference,
            "error": "gave up" if outcome == "failed" else "",
        }
        at = T0 + timedelta(seconds=self.steps)
        self.deliver(
            Message(
                owner[0],
                effect.target.key,
                "downstream_ack",
                f"ack:{key}",
                at,
                _ENCODER.encode(ack),
                False,
                f"connector:{system}",
            )
        )
        if self.rng.random() < self.profile.connector_crash:
            self.note(f"connector {system} crashed before acking {key}: redelivered")
            self.stats["connector_crashes"] += 1
        else:
            conn.stream.popleft()

    def erp_feedback(self, effect: Effect, reference: str) -> None:
        """ERP acknowledges a new PO and, sometimes, receives its goods (whole or in parts)."""
        p = effect.payload
        entity = f"{p['item_id']}@{p['facility_id']}"
        po = p["po_id"]
        at = T0 + timedelta(seconds=self.steps)
        if self.rng.random() < 0.8:
            payload = {"po_id": po, "reference": reference}
            self.feedback.append(
                source("item", entity, "po_acknowledged", f"ack:{po}", at, payload, "erp")
            )
        r = self.rng.random()
        if r < 0.4:
            payload = {"po_id": po, "quantity": 0}
            self.feedback.append(
                source("item", entity, "goods_received", f"received:{po}", at, payload, "erp")
            )
        elif r < 0.6:
            first = max(1, p["quantity"] // 2)
            for n, quantity in enumerate((first, p["quantity"] - first or 1), 1):
                payload = {"po_id": po, "quantity": quantity}
                msg_id = f"received:{po}:{n}"
                self.feedback.append(
                    source("item", entity, "goods_received", msg_id, at, payload, "erp")
                )

    def redeliver(self) -> None:
        """A committed message comes again (a late redelivery, a publisher retry)."""
        key = self.rng.choice(list(self.history))
        record = self.rng.choice(self.history[key])
        self.note(f"redeliver {key[0]}:{key[1]} {record.message.id}")
        self.deliver(record.message)

    def passivate(self) -> None:
        """An idle actor is dropped; its next message reloads it from the store."""
        busy = {a.key for a in self.batch}
        idle = [k for k in self.live if k not in busy]
        if idle:
            key = self.rng.choice(idle)
            self.note(f"passivate {key[0]}:{key[1]}")
            del self.live[key]

    def replay_probe(self) -> None:
        key = self.rng.choice(list(self.history))
        self.note(f"replay probe {key[0]}:{key[1]}")
        self.checker.replay(key)

    # -- reporting --------------------------------------------------------------------------
    def note(self, text: str) -> None:
        self.trace.append(f"{self.steps:6d} {text}")

    def fail(self, what: str) -> None:
        raise Violation(self.describe(what))

    def describe(self, what: str) -> str:
        """A failure: what broke, where, the command that re-runs it, and the last steps."""
        seed, profile = self.seed, self.profile.name
        lines = [
            f"dsim invariant violated: seed {seed} ({profile}), step {self.steps}: {what}",
            f"re-run: {rerun_command(seed, profile, self.checker.skip)}",
            "last steps:",
            *(f"  {line}" for line in self.trace),
        ]
        return "\n".join(lines)

    def entities(self, kind: str) -> list[Key]:
        return sorted(k for k in self.stored if k[0] == kind)

    def fingerprint(self) -> str:
        """A digest of every stored state and every downstream key: equal runs, equal digests."""
        digest = hashlib.sha256()
        for key in sorted(self.stored):
            digest.update(repr(key).encode())
            digest.update(self.stored[key])
        for system in SYSTEMS:
            conn = self.connectors[system]
            digest.update("\n".join(sorted(conn.records)).encode())
            digest.update("\n".join(conn.delivered).encode())
        return digest.hexdigest()


def rerun_command(seed: int, profile: str, skip: frozenset[str] = KNOWN_BUGS) -> str:
    """The command that runs one seed again (with the standard actors)."""
    checks = "" if skip >= KNOWN_BUGS else "DSIM_CHECKS=all "
    return (
        f"DSIM_SEED={seed} DSIM_PROFILE={profile} {checks}"
        ".venv/bin/pytest tests/test_dsim.py -k replay_seed -q"
    )


# -- invariants -------------------------------------------------------------------------------
def card(refdata: RefData, details: Any) -> Counter[str]:
    """What the preference cards ask for a booking (the provider's own card wins)."""
    wanted: Counter[str] = Counter()
    for proc in details.procedures:
        provider = proc.provider_id or (details.providers[0] if details.providers else "")
        for item_id, quantity in refdata.preference_card(proc.code, provider or None):
            wanted[item_id] += quantity
    return +wanted


def consumption(refdata: RefData, charges: Iterable[Any]) -> Counter[str]:
    """Supply charge lines matched to items by charge code; credits give back."""
    used: Counter[str] = Counter()
    for line in charges:
        found = refdata.item_by_charge_code(line.code)
        if found is not None:
            used[found.item_id] += -line.quantity if line.type == "credit" else line.quantity
    return Counter({i: q for i, q in used.items() if q})


def _unit_cost(refdata: RefData, item_id: str) -> Decimal:
    found = refdata.item(item_id)
    return Decimal(str(found.unit_cost)) if found is not None else Decimal(0)


def _nonzero(counts: Counter[Any]) -> Counter[Any]:
    return Counter({k: v for k, v in counts.items() if v})


class Checker:
    """The invariants, checked as the simulation runs (numbers as in the issue).

    When a command is applied: (5) a stale scheduling message changes nothing; (3) an item
    orders exactly when its projection crosses the reorder point, under that crossing's key.
    After every commit: no downstream key reused for another effect, no PO id under two keys,
    no billing line under two keys nor for a line its case never posted; items hold no negative
    reservation or over-received PO.  At quiescence: (1) reservations, consumption and demand
    in the item, supply and ERP actors equal what the cards and charge lines of the cases say,
    and so do the deltas their systems were told and the ERP postings; (2) on order is the POs
    sent minus the goods received; (3) POs sent = crossings counted by the item = crossings
    seen by the oracle; (4) charges only for lines posted to a performed case, each billed
    once, and each procedure's charges and status as its case's; every ledger settled; live
    states equal their stored bytes.  At random and at the end: (7) replay of each entity.
    (6) is the run's fingerprint, compared by test_dsim.py.
    """

    def __init__(self, sim: Sim, skip: frozenset[str]) -> None:
        self.sim = sim
        self.skip = skip
        self.emitted: dict[str, tuple[Key, Effect]] = {}
        """Every downstream effect committed, by idempotency key."""
        self.charged_lines: dict[str, str] = {}
        """Billing line id to the one effect key that charged (or credited) it."""
        self.po_keys: dict[str, str] = {}
        """PO id to the one downstream key that ordered it."""

    def fail(self, what: str) -> None:
        self.sim.fail(what)

    # -- when a command is applied (still uncommitted) --------------------------------------
    def applied(
        self, key: Key, command: Command[Any], before: Any, after: Any, applied: _Applied
    ) -> None:
        kind = key[0]
        if kind == "appointment" and command.name in SCHEDULING:
            self._stale(key, command, before, after, applied)
        if kind == "item" and applied.verdict == "accepted":
            self._crossing(key, command, before, applied)

    def _stale(
        self, key: Key, command: Command[Any], before: Any, after: Any, applied: _Applied
    ) -> None:
        """(5) A scheduling message older than the state applied changes nothing."""
        if before.source_ts is None or command.occurred_at >= before.source_ts:
            return
        self.sim.stats["stale"] += 1
        if applied.verdict != "accepted" or after != before or applied.effects:
            self.fail(
                f"stale {command.name} {command.id} (occurred {command.occurred_at}, state "
                f"from {before.source_ts}) changed {key[0]}:{key[1]}: verdict "
                f"{applied.verdict}, status {before.status} -> {after.status}, "
                f"{len(applied.effects)} effects"
            )

    def _crossing(self, key: Key, command: Command[Any], before: Any, applied: _Applied) -> None:
        """(3) Exactly one PO per crossing of the reorder point, numbered by the crossing.

        As the item actor's docstring defines it: the projection (on hand + on order -
        reserved) moves with every change, a crossing is a move from above the reorder point
        to at-or-below it, and the next crossing needs the projection above it again.  The
        projection is looked at after the command's own events and again after the order it
        raised (an order can lift it above the reorder point).  With ``po_rearm`` skipped, the
        oracle only looks where the actor does (after a command's events, requisitions not
        included): the known bug is left out, everything else is still checked.
        """
        sim = self.sim
        lazy = "po_rearm" in self.skip
        if lazy and command.name == "request":
            return
        ordering = (item_actor.Ordered, item_actor.Rearmed)
        kind = sim.kind(key)
        pre = kind.apply(before, [e for e in applied.events if not isinstance(e, ordering)])
        above, crossings = sim.shadow(key)
        expect = False
        if pre.stocked:
            if pre.available > pre.reorder_point:
                above = True
            elif above and pre.reorder_quantity > 0:
                expect, above, crossings = True, False, crossings + 1
                if not lazy and pre.available + pre.reorder_quantity > pre.reorder_point:
                    above = True
        sim.live_shadow[key] = (above, crossings)
        orders = [e for e in applied.effects if e.key.startswith("po:")]
        if not expect:
            if orders:
                self.fail(
                    f"{key[1]} ordered {[e.key for e in orders]} on {command.name} "
                    f"{command.id} without crossing its reorder point (projection "
                    f"{pre.available}, reorder point {pre.reorder_point}, "
                    f"{crossings} crossings so far)"
                )
            return
        sim.stats["crossings"] += 1
        wanted_key, wanted_po = f"po:{key[1]}:{crossings}", f"PO:{key[1]}:{crossings}"
        got = [(e.key, e.payload["po_id"], e.payload["quantity"]) for e in orders]
        if got != [(wanted_key, wanted_po, pre.reorder_quantity)]:
            self.fail(
                f"{key[1]} crossed its reorder point (projection {pre.available} <= "
                f"{pre.reorder_point}) on {command.name} {command.id}: wanted one order "
                f"{wanted_key} of {pre.reorder_quantity}, got {got}; before it: on hand "
                f"{before.on_hand}, on order {before.on_order}, reserved {before.reserved}, "
                f"armed {before.armed}"
            )

    # -- after every commit -----------------------------------------------------------------
    def committed(self, touched: list[Key], effects: list[tuple[Key, Effect]]) -> None:
        sim = self.sim
        for owner, effect in effects:
            if isinstance(effect.target, Downstream):
                self._downstream(owner, effect)
        for key in touched:
            state = sim.live[key]
            if key[0] == "item":
                self._item_safety(key, state)
            elif key[0] == "billing":
                self._billing_safety(key, state)

    def _downstream(self, owner: Key, effect: Effect) -> None:
        """(3, 4) One key per business fact: no PO, charge or credit sent under two keys."""
        earlier = self.emitted.get(effect.key)
        if earlier is not None and (earlier[0], earlier[1].payload) != (owner, effect.payload):
            self.fail(f"downstream key {effect.key} reused for a different effect: {effect}")
        self.emitted[effect.key] = (owner, effect)
        assert isinstance(effect.target, Downstream)
        system = effect.target.system
        if system == "erp" and effect.name == "purchase_order":
            po = effect.payload["po_id"]
            if self.po_keys.setdefault(po, effect.key) != effect.key:
                self.fail(f"PO {po} ordered twice: {self.po_keys[po]} and {effect.key}")
        if system == "billing" and effect.name in ("charge", "credit"):
            line = effect.payload["line_id"]
            if self.charged_lines.setdefault(line, effect.key) != effect.key:
                self.fail(f"line {line} billed twice: {self.charged_lines[line]}, {effect.key}")
            appointment = self.sim.stored_state(("appointment", effect.payload["appointment_id"]))
            if line not in {c.line_id for c in appointment.charges}:
                self.fail(
                    f"billing charged line {line} that {appointment.id} never posted "
                    f"(status {appointment.status})"
                )

    def _item_safety(self, key: Key, state: Any) -> None:
        if any(q <= 0 for q in state.reservations.values()):
            self.fail(f"{key[1]} holds a non-positive reservation: {state.reservations}")
        for po in state.purchase_orders:
            if not 0 <= po.received <= po.quantity:
                self.fail(f"{key[1]} PO {po.po_id} received {po.received} of {po.quantity}")
        ids = [po.po_id for po in state.purchase_orders]
        if len(ids) != len(set(ids)):
            self.fail(f"{key[1]} has a PO twice: {ids}")

    def _billing_safety(self, key: Key, state: Any) -> None:
        """(4) Billing holds charges only for lines the appointment posted (it was performed)."""
        appointment = self.sim.stored_state(("appointment", key[1]))
        posted = {c.line_id for c in appointment.charges}
        lines = [line.line_id for line in state.lines]
        if len(lines) != len(set(lines)) or not set(lines) <= posted:
            self.fail(
                f"billing {key[1]} has lines {lines}; the appointment ({appointment.status}) "
                f"posted {sorted(posted)}"
            )
        if lines and appointment.status not in ("completed", "deleted"):
            self.fail(f"billing {key[1]} has charges for a case that is {appointment.status}")

    # -- at quiescence ----------------------------------------------------------------------
    def quiescent(self) -> None:
        sim = self.sim
        sim.note("quiescent: full check")
        for key in sim.stored:
            if key in sim.live and sim.live[key] != sim.stored_state(key):
                self.fail(f"{key[0]}:{key[1]} live state differs from its stored bytes")
        appointments = {k[1]: sim.stored_state(k) for k in sim.entities("appointment")}
        self._stock(appointments)
        self._orders()
        self._charges(appointments)
        self._ledgers()
        if "billing_reversal_once" not in self.skip:
            self._billing_mirrors_case(appointments)

    def _stock(self, appointments: dict[str, Any]) -> None:
        """(1) Reservations are the cards of booked cases, consumption that of completed ones,
        in the item, supply and ERP actors alike, and in what their systems were told."""
        sim, refdata = self.sim, self.sim.refdata
        # (facility, appointment) -> item -> quantity, from the cards and the charge lines
        reserved: dict[tuple[str, str], Counter[str]] = {}
        consumed: dict[tuple[str, str], Counter[str]] = {}
        demand: dict[tuple[str, str], Counter[tuple[str, str]]] = {}
        for appt, a in appointments.items():
            where = (a.details.facility_id if a.details else "", appt)
            if a.status == "booked":
                reserved[where] = card(refdata, a.details)
                demand[where] = Counter({(i, a.local_date): q for i, q in reserved[where].items()})
            elif a.status == "completed":
                consumed[where] = consumption(refdata, a.charges)
        for key in sim.entities("item"):
            item = sim.stored_state(key)
            item_id, _, facility = key[1].partition("@")
            want = {appt: c[item_id] for (f, appt), c in reserved.items() if f == facility}
            if item.reservations != {appt: q for appt, q in want.items() if q}:
                self.fail(f"{key[1]} reserves {item.reservations}; booked cards say {want}")
            used = sum(c[item_id] for (f, _), c in consumed.items() if f == facility)
            if item.consumed != used:
                self.fail(f"{key[1]} consumed {item.consumed}; completed cases used {used}")
        for facility in FACILITIES:
            supply = sim.stored_state(("supply", facility))
            erp = sim.stored_state(("erp", facility))
            for appt in sorted(set(appointments) | set(supply.reservations) | set(erp.demand)):
                holds = (supply.reservations.get(appt, {}), supply.consumed.get(appt, {}))
                case: tuple[dict[str, int], dict[str, int]] = (
                    reserved.get((facility, appt), {}),
                    consumed.get((facility, appt), {}),
                )
                if holds != case:
                    self.fail(f"supply {facility} holds {holds} for {appt}; its case says {case}")
                got: Counter[tuple[str, str]] = Counter()
                for line in erp.demand.get(appt, ()):
                    got[(line.item_id, line.date)] += line.quantity
                if got != demand.get((facility, appt), Counter()):
                    self.fail(f"ERP {facility} demand of {appt} is {dict(got)}")
        self._told(refdata)

    def _told(self, refdata: RefData) -> None:
        """What the supply and ERP systems were told adds up to what the actors hold; the
        ERP postings add up to the cost of what was consumed."""
        sim = self.sim
        told: Counter[tuple[str, ...]] = Counter()
        for _, effect in self.emitted.values():
            p = effect.payload
            if effect.name in ("reservation", "consumption"):
                told[(effect.name, p["facility_id"], p["item_id"])] += p["quantity"]
            elif effect.name == "demand":
                told[("demand", p["facility_id"], p["item_id"], p["date"])] += p["quantity"]
        held: Counter[tuple[str, ...]] = Counter()
        cost: Counter[str] = Counter()
        for key in sim.entities("item"):
            item = sim.stored_state(key)
            item_id, _, facility = key[1].partition("@")
            held[("reservation", facility, item_id)] += item.reserved
            held[("consumption", facility, item_id)] += item.consumed
            cost[facility] += _unit_cost(refdata, item_id) * item.consumed
        for facility in FACILITIES:
            erp = sim.stored_state(("erp", facility))
            if Decimal(erp.posted_amount) != cost[facility]:
                self.fail(f"ERP {facility} posted {erp.posted_amount}; consumption cost {cost}")
            for lines in erp.demand.values():
                for line in lines:
                    held[("demand", facility, line.item_id, line.date)] += line.quantity
        told, held = _nonzero(told), _nonzero(held)
        if told != held:
            self.fail(f"downstream deltas {dict(told)} do not add up to {dict(held)}")

    def _orders(self) -> None:
        """(2, 3) On order is the open POs; one PO per crossing, in the actors and downstream."""
        sim = self.sim
        ordered: dict[str, list[tuple[str, int]]] = {}
        for effect_key, (_, effect) in self.emitted.items():
            if effect.name == "purchase_order":
                p = effect.payload
                entity = f"{p['item_id']}@{p['facility_id']}"
                ordered.setdefault(entity, []).append((p["po_id"], p["quantity"]))
                if effect_key not in sim.connectors["erp"].failed:
                    self.fail(f"PO {p['po_id']} was never delivered to ERP")
        for facility in FACILITIES:
            erp = sim.stored_state(("erp", facility))
            if len(erp.purchase_orders) != len(set(erp.purchase_orders)):
                self.fail(f"ERP {facility} sent a PO twice: {erp.purchase_orders}")
        for key in sim.entities("item"):
            item = sim.stored_state(key)
            pos = ordered.get(key[1], [])
            by_crossing = [po for po, _ in pos if po.startswith("PO:")]
            _, crossings = sim.stored_shadow.get(key, (True, 0))
            if not len(by_crossing) == item.crossings == crossings:
                self.fail(
                    f"{key[1]}: {len(by_crossing)} POs for crossings sent to ERP, the item "
                    f"counted {item.crossings} crossings, the oracle {crossings}"
                )
            if sorted(po.po_id for po in item.purchase_orders) != sorted(p for p, _ in pos):
                self.fail(f"{key[1]} holds POs {item.purchase_orders}; ERP got {pos}")
            received = Counter[str]()
            for record in sim.history.get(key, []):
                for event in record.events:
                    if isinstance(event, item_actor.Received):
                        received[event.po_id] += event.quantity
            open_quantity = sum(q - received[po] for po, q in pos)
            if item.on_order != open_quantity or any(received[po] > q for po, q in pos):
                self.fail(
                    f"{key[1]} has {item.on_order} on order; POs {pos} minus receipts "
                    f"{dict(received)} leave {open_quantity}"
                )

    def _charges(self, appointments: dict[str, Any]) -> None:
        """(4) Charges only for performed cases, each line once, in billing and per procedure."""
        sim = self.sim
        billed: dict[str, list[str]] = {}
        for _, effect in self.emitted.values():
            if effect.name in ("charge", "credit"):
                billed.setdefault(effect.payload["appointment_id"], []).append(
                    effect.payload["line_id"]
                )
        for appt, a in appointments.items():
            posted = [c.line_id for c in a.charges]
            if posted and a.status not in ("completed", "deleted"):
                self.fail(f"{appt} has charges but is {a.status}")
            billing = sim.stored_state(("billing", appt))
            if a.details is not None and a.status in ("booked", "completed"):
                want = (a.status, a.plan.readiness, a.details.payer_id)
                if (billing.status, billing.readiness, billing.payer_id) != want:
                    self.fail(f"billing {appt} was last told {billing}; the case is {want}")
            if [line.line_id for line in billing.lines] != posted:
                self.fail(f"billing {appt} holds {billing.lines}; the case posted {posted}")
            if sorted(billed.get(appt, [])) != sorted(posted):
                self.fail(f"billing system got lines {billed.get(appt)} for {appt}: {posted}")
        for key in sim.entities("procedure"):
            proc = sim.stored_state(key)
            appt, _, code = key[1].partition("#")
            a = appointments[appt]
            view = proc.view
            charges = [c for c in a.charges if c.code == code]
            codes = [p.code for p in a.details.procedures] if a.details else []
            status = a.status if code in codes else "removed"
            if (view.status, view.charges) != (status, tuple(charges)) and code in codes:
                self.fail(
                    f"procedure {key[1]} is {view.status} with {view.charges}; the case is "
                    f"{a.status} with {charges}"
                )
            if proc.performed and not any(c.type == "charge" for c in a.charges):
                self.fail(f"procedure {key[1]} is performed but {appt} posted no charge")

    def _ledgers(self) -> None:
        """Every acknowledgement arrived: nothing is pending in any sync ledger."""
        sim = self.sim
        for key in sim.stored:
            if key[0] not in SYSTEMS:
                continue
            state = sim.stored_state(key)
            ledgers = [state.ledger] if key[0] == "billing" else list(state.ledgers.values())
            owners = getattr(state, "owners", {})
            if owners or any(ledger.pending for ledger in ledgers):
                self.fail(f"{key[0]}:{key[1]} still waits for acks: {owners or ledgers}")

    def _billing_mirrors_case(self, appointments: dict[str, Any]) -> None:
        """A closed case's pre-billing tasks are flagged for reversal after the last readiness."""
        sim = self.sim
        for appt, a in appointments.items():
            if a.status not in ("cancelled", "no_show", "deleted"):
                continue
            last = ""
            for record in sim.history.get(("billing", appt), []):
                for effect in record.effects:
                    if effect.name in ("readiness", "reversal"):
                        last = effect.name
            if last == "readiness":
                self.fail(
                    f"{appt} is {a.status}, but billing's last word was a readiness: its "
                    f"pre-billing tasks were never flagged for reversal"
                )

    # -- replay -----------------------------------------------------------------------------
    def replay(self, key: Key) -> None:
        """(7) The committed history, re-applied from the initial state, gives the same run."""
        sim = self.sim
        kind = sim.kind(key)
        state = kind.initial(key[1])
        for n, record in enumerate(sim.history.get(key, [])):
            decision = kind.decide(state, sim.command(record.message))
            if isinstance(decision, Accepted):
                got = ("accepted", decision.events, decision.effects)
                state = kind.apply(state, decision.events)
            else:
                got = ("rejected", (), ())
            if got != (record.verdict, record.events, record.effects):
                self.fail(
                    f"replay of {key[0]}:{key[1]} differs at command {n} "
                    f"({record.message.id}): {got[0]} {got[2]} vs {record.verdict} "
                    f"{record.effects}"
                )
        if state != sim.stored_state(key):
            self.fail(f"replay of {key[0]}:{key[1]} ends in another state:\n{state}")

    def replay_all(self) -> None:
        for key in list(self.sim.history):
            self.replay(key)


def run(
    seed: int,
    profile: Profile = SHORT,
    *,
    registry: Registry | None = None,
    skip: Iterable[str] = KNOWN_BUGS,
) -> Sim:
    """Run one seed to the end; raises :class:`Violation` when an invariant fails."""
    sim = Sim(seed, profile, registry=registry, skip=skip)
    try:
        sim.run()
    except Violation:
        raise
    except Exception as exc:
        what = f"{type(exc).__name__}: {exc}"
        raise Violation(sim.describe(what)) from exc
    return sim
