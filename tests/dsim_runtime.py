"""The runtime model of the simulation: what ``router/worker.py`` (and ``batch_apply.py``) do.

:class:`Sim` holds every entity's input log (its mailbox), the open batch of applied and not yet
committed commands, the durable store (states, dedupe records, history), the per-(sender,
target) outbox channels and the connectors' output streams (:mod:`dsim_connectors`).  Each
:meth:`Sim.step` lets a seeded scheduler pick what happens next: a source message arrives, an
entity applies its next message, the batch commits or the router crashes, an effect is
published, a connector delivers, a committed message is redelivered, an actor is passivated.
The invariants (:mod:`dsim_checks`) are checked as it goes.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import dsim_connectors
import msgspec
from dsim_checks import KNOWN_BUGS, Checker, Violation, rerun_command
from dsim_workload import SHORT, SYSTEMS, Key, Message, Profile, generate
from workflow_network import demo_refdata

from caresync.actors import (
    Accepted,
    Command,
    Downstream,
    Effect,
    EntityKind,
    Registry,
    default_registry,
)
from caresync.actors.refdata import RefData


@functools.cache
def _payload_decoders(
    payload_type: Any,
) -> tuple[msgspec.json.Decoder[Any], msgspec.msgpack.Decoder[Any]]:
    return msgspec.json.Decoder(payload_type), msgspec.msgpack.Decoder(payload_type)


@functools.cache
def _state_decoder(state_type: Any) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(state_type)


_ENCODER = msgspec.msgpack.Encoder()


@dataclass(frozen=True, slots=True)
class Record:
    """A committed command of one entity: its verdict, events and effects (for replay)."""

    message: Message
    verdict: str
    events: tuple[Any, ...]
    effects: tuple[Effect, ...]


@dataclass(slots=True)
class Applied:
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
        self.connectors = {s: dsim_connectors.Connector() for s in SYSTEMS}
        # volatile (lost in a crash)
        self.live: dict[Key, Any] = {}
        self.live_shadow: dict[Key, Shadow] = {}
        self.cursor: dict[Key, int] = {}
        self.batch: list[Applied] = []
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
            self.batch.append(Applied(key, msg, "duplicate"))
            self.stats["duplicates"] += 1
            return
        self.batch_seen.add(dedupe)
        kind = self.kind(key)
        command = self.command(msg)
        before = self.state(key)
        decision = kind.decide(before, command)
        if isinstance(decision, Accepted):
            after = kind.apply(before, decision.events)
            applied = Applied(key, msg, "accepted", decision.events, decision.effects)
        else:
            after = before
            applied = Applied(key, msg, "rejected")
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
        dsim_connectors.connect(self)

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
