"""The router pipeline on the in-memory transport with a real SQLite store.

Order, fan-out, dedupe, dead letters, parking, restarts, passivation, publish retries and
``replay rebuild`` — everything the runtime promises, without a broker.

The workload is the workflow domain with the demo reference data (tests/workflow_network.py):
a booking of a knee replacement (27447) reserves its preference card at the facility and fans
out appointment → billing, supply and ERP, supply → one item actor per card line; every owner
sends its share downstream.  The pure :class:`workflow_network.Network` is the oracle: the same
source commands through it give the states and effects the router must end up with.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
import pytest
from workflow_network import Network, demo_refdata

from caresync.actors import Accepted, Command, EntityKind, Registry, default_registry
from caresync.actors.appointment import AppointmentState
from caresync.actors.billing import BillingState
from caresync.actors.erp import ErpState
from caresync.actors.item import ItemState
from caresync.actors.supply import SupplyState
from caresync.codecs import Subjects, encode_envelope, make_envelope
from caresync.router.actor import Supervision
from caresync.router.memory_transport import MemoryTransport, subject_matches
from caresync.router.outbox_rows import H_CODE, H_REASON, H_SEQ, H_STREAM, H_SUBJECT
from caresync.router.refdata import RefDataCatalog
from caresync.router.replay import rebuild
from caresync.router.runtime import Router, RouterSettings
from caresync.router.transport import Inbound
from caresync.router.worker_settings import WorkerSettings
from caresync.store import BatchWrite, EntityRow, Store

pytestmark = pytest.mark.anyio

S = Subjects()
IN = S.input_stream(0)
T0 = datetime(2027, 3, 1, 8, 0, tzinfo=UTC)
FACILITIES = ("MAIN", "NORTH")
CARD = {"gauze": 4, "knee-kit": 1}
"""The preference card of procedure 27447 in the demo reference data."""
STEPS = ("book", "reschedule", "reschedule", "reschedule", "post_charges")
FIRST_DAY = 10
"""Step n of :data:`STEPS` happens on 2027-03-(FIRST_DAY + n): each reschedule moves a day."""
LAST_DATE = "2027-03-13"  # the date of the last reschedule in STEPS
T = TypeVar("T")

CATALOG = RefDataCatalog()
CATALOG.add(1, 0, demo_refdata().dataset)  # in force from the epoch: every message sees it


@dataclass(frozen=True, slots=True)
class Fanout:
    """What one source command causes, derived from the actors' rules."""

    accepted: int
    """Commands applied: the source command and every internal one it causes."""
    internal: int
    """Actor-to-actor messages (cs.int.>)."""
    downstream: int
    """Messages to the billing, supply and ERP systems (cs.out.>)."""

    def __add__(self, other: Fanout) -> Fanout:
        return Fanout(
            self.accepted + other.accepted,
            self.internal + other.internal,
            self.downstream + other.downstream,
        )

    def __mul__(self, n: int) -> Fanout:
        return Fanout(self.accepted * n, self.internal * n, self.downstream * n)


# book: appointment → supply (plan), erp (demand), billing (update), its procedure (update);
# supply → one item actor per card line (reserve) and one supply reservation with a line each;
# erp → one demand with a line per item; billing → readiness.
BOOK = Fanout(accepted=1 + 4 + len(CARD), internal=4 + len(CARD), downstream=3)
# Another day at the same facility: reservations and billing view unchanged, so only ERP hears
# of it: one demand moving each line (minus on the old day, plus on the new).
RESCHEDULE = Fanout(accepted=1 + 1, internal=1, downstream=1)
# A procedure charge line (no supply charge code): nothing consumed, the case is performed, so
# what stayed reserved is released (supply → each item actor; one reservation, negative lines)
# and its demand reversed; billing is told of the new line, the procedure that it was performed.
CHARGES = Fanout(accepted=1 + 4 + len(CARD), internal=4 + len(CARD), downstream=3)
LIFECYCLE = BOOK + RESCHEDULE * 3 + CHARGES


# -- fixtures and helpers -----------------------------------------------------------------------
@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "router.db")
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def transport() -> MemoryTransport:
    t = MemoryTransport()
    t.provision(S)
    return t


def make_router(
    transport: MemoryTransport,
    store: Store,
    *,
    registry: Registry | None = None,
    **worker: Any,
) -> Router:
    settings = RouterSettings(
        worker=WorkerSettings(**{"pull_timeout_s": 0.02, **worker}),
        publish_retry_initial_s=0.001,
        publish_retry_max_s=0.01,
    )
    return Router(
        transport=transport,
        store=store,
        registry=registry or default_registry(),
        subjects=S,
        settings=settings,
        refdata=CATALOG.at,
    )


@asynccontextmanager
async def running(router: Router) -> AsyncIterator[Router]:
    """Run the router in a task group; stop it (draining) when the block ends."""
    async with anyio.create_task_group() as tg:
        await tg.start(router.run)
        try:
            yield router
        finally:
            router.stop()


async def settle(
    router: Router, transport: MemoryTransport, store: Store, timeout_s: float = 20.0
) -> None:
    """Wait until every input message is applied and committed and every effect is sent.

    Fan-out appends more input messages, so this loops until the stream stops growing: the
    committed offset is the stream's end and no outbox row is pending.
    """
    stream = transport.streams[IN]
    with anyio.fail_after(timeout_s):
        while True:
            length = len(stream.messages)
            committed = await store.offset(IN)
            pending = (await store.counts())["outbox_pending"]
            if (
                committed == length == len(stream.messages)
                and router.workers[0].stats.last_seq == length
                and pending == 0
            ):
                return
            await anyio.sleep(0.01)


@dataclass(frozen=True, slots=True)
class Cmd:
    """One command published to the input stream."""

    id: str
    kind: str
    entity: str
    name: str
    payload: Any
    occurred_at: datetime
    subject: str
    data: bytes


def command(
    entity: str,
    name: str,
    payload: Any = None,
    *,
    id: str,
    kind: str = "appointment",
    minutes: int = 0,
    **envelope: Any,
) -> Cmd:
    at = T0 + timedelta(minutes=minutes)
    env = make_envelope(
        id=id, kind=f"{kind}.{name}", entity=entity, payload=payload, occurred_at=at, **envelope
    )
    return Cmd(id, kind, entity, name, payload, at, S.command(kind, entity), encode_envelope(env))


def start(day: int) -> str:
    """A start time on 2027-03-<day>, with an offset (the same date in UTC)."""
    return f"2027-03-{day:02d}T09:00:00+02:00"


def book_payload(facility: str = "MAIN", day: int = FIRST_DAY) -> dict[str, Any]:
    return {
        "procedures": [{"code": "27447"}],
        "facility_id": facility,
        "start": start(day),
        "payer_id": "ACME",
    }


def charges_payload(line_id: str) -> dict[str, Any]:
    return {"lines": [{"line_id": line_id, "code": "27447", "amount": "5000.00"}]}


def publish(transport: MemoryTransport, cmds: Iterable[Cmd], *, msg_id: bool = True) -> None:
    for c in cmds:
        transport.append(c.subject, c.data, {"Nats-Msg-Id": c.id} if msg_id else None)


def lifecycle(appt: str, facility: str) -> list[Cmd]:
    """Booked, rescheduled 3 times (a day later each), charges posted: in order."""
    cmds = []
    for step, name in enumerate(STEPS):
        payload: Any
        if name == "book":
            payload = book_payload(facility, FIRST_DAY + step)
        elif name == "reschedule":
            payload = {"start": start(FIRST_DAY + step)}
        else:
            payload = charges_payload(f"{appt}-L1")
        cmds.append(command(appt, name, payload, id=f"{appt}-{step}", minutes=step))
    return cmds


def lifecycles(appointments: int, *, seed: int) -> list[Cmd]:
    """:func:`lifecycle` of appointments ``A<n>`` (at MAIN or NORTH), interleaved.

    Per-entity order is kept, across entities it is shuffled.  Applied out of order, a
    reschedule or the charges before the booking are rejected.
    """
    rng = random.Random(seed)
    per_entity = [lifecycle(f"A{a}", FACILITIES[a % 2]) for a in range(appointments)]
    order: list[Cmd] = []
    while per_entity:
        queue = rng.choice(per_entity)
        order.append(queue.pop(0))
        if not queue:
            per_entity.remove(queue)
    return order


def oracle(cmds: Iterable[Cmd]) -> Network:
    """The same source commands through the pure network of actors (no runtime at all)."""
    net = Network()
    for c in cmds:
        net.send(c.kind, c.entity, c.name, c.payload or {}, id=c.id, at=c.occurred_at)
    return net


def messages(transport: MemoryTransport, stream: str, pattern: str = ">") -> list[Inbound]:
    return [m for m in transport.streams[stream].messages if subject_matches(pattern, m.subject)]


def msg_ids(transport: MemoryTransport, pattern: str, stream: str = IN) -> list[str]:
    return [(m.headers or {}).get("Nats-Msg-Id", "") for m in messages(transport, stream, pattern)]


def internal_ids(transport: MemoryTransport) -> list[str]:
    """Msg-Ids of every internal command sent: to the input stream, or (one partition: all of
    them) applied with its cause and recorded on the local stream."""
    return [*msg_ids(transport, "cs.int.>"), *msg_ids(transport, "cs.loc.>", S.local_stream)]


def downstream_ids(transport: MemoryTransport) -> list[str]:
    return msg_ids(transport, "cs.out.>", S.output_stream)


def envelopes(transport: MemoryTransport, kind: str) -> list[tuple[Inbound, dict[str, Any]]]:
    """Downstream messages of one ``<system>.<operation>``, with their decoded JSON envelope."""
    out = []
    for m in messages(transport, S.output_stream):
        env = msgspec.json.decode(m.data)
        if env["kind"] == kind:
            out.append((m, env))
    return out


async def states(store: Store, kind: str, state_type: type[T]) -> dict[str, T]:
    return {
        e.id: msgspec.msgpack.decode(e.state, type=state_type) for e in await store.entities(kind)
    }


async def check_matches_oracle(
    store: Store, transport: MemoryTransport, cmds: Iterable[Cmd]
) -> Network:
    """Every entity's state, every internal message and every downstream message is what the
    pure network produces for the same source commands: nothing lost, nothing twice."""
    cmds = list(cmds)
    net = oracle(cmds)
    for name, kind in default_registry().kinds.items():
        expected = {entity: s for (k, entity), s in net.states.items() if k == name}
        assert await states(store, name, kind.state_type) == expected, name
    sources = {(c.kind, c.entity, c.id) for c in cmds}
    internal = internal_ids(transport)
    assert len(internal) == len(set(internal))
    assert sorted(internal) == sorted(cid for _, _, cid in net.applied - sources)
    down = downstream_ids(transport)
    assert len(down) == len(set(down))
    assert sorted(down) == sorted(e.key for e in net.downstream)
    return net


async def check_lifecycles_done(
    store: Store, transport: MemoryTransport, cmds: list[Cmd], appointments: int
) -> None:
    """Every appointment of :func:`lifecycles` applied exactly once, and its fan-out too."""
    assert len(internal_ids(transport)) == LIFECYCLE.internal * appointments
    assert len(downstream_ids(transport)) == LIFECYCLE.downstream * appointments
    appts = await states(store, "appointment", AppointmentState)
    assert set(appts) == {f"A{a}" for a in range(appointments)}
    wrong = {
        k: (v.status, v.plan.date, v.version)
        for k, v in appts.items()
        if (v.status, v.plan.date, v.version) != ("completed", LAST_DATE, len(STEPS))
    }
    assert wrong == {}
    bills = await states(store, "billing", BillingState)
    assert {
        k: (v.status, v.readiness, len(v.lines), v.ledger.wanted) for k, v in bills.items()
    } == dict.fromkeys(appts, ("completed", "ready", 1, 2))  # told: readiness, then the charge
    # Performed without consuming supplies: every reservation released, every demand reversed.
    # Supply and ERP are per appointment; nobody acknowledges here, so every effect each sent
    # is pending, and its key names the case's facility (<appt>/<cmd>:<owner>:<facility>:...).
    at = {f"A{a}": {FACILITIES[a % 2]} for a in range(appointments)}
    supplies = await states(store, "supply", SupplyState)
    assert {
        a: (
            s.reservations,
            s.consumed,
            s.ledger.wanted,
            {k.split(":")[2] for k in s.ledger.pending},
        )
        for a, s in supplies.items()
    } == {a: ({}, {}, 2, f) for a, f in at.items()}  # the card reserved, then released
    erps = await states(store, "erp", ErpState)
    wanted = 1 + 3 + 1  # the card planned, moved 3 times (-old +new in one), reversed
    assert {
        a: (e.demand, e.ledger.wanted, {k.split(":")[2] for k in e.ledger.pending})
        for a, e in erps.items()
    } == {a: ({}, wanted, f) for a, f in at.items()}
    items = await states(store, "item", ItemState)
    assert {k: v.reservations for k, v in items.items()} == {
        f"{item}@{f}": {} for f in FACILITIES for item in CARD
    }
    await check_matches_oracle(store, transport, cmds)


# -- order --------------------------------------------------------------------------------------
async def test_per_entity_order_holds_across_many_interleaved_entities(
    transport: MemoryTransport, store: Store
) -> None:
    cmds = lifecycles(200, seed=20270101)
    publish(transport, cmds)
    router = make_router(transport, store, batch_size=17)

    async with running(router):
        await settle(router, transport, store)

    stats = router.workers[0].stats
    assert stats.batches > len(cmds) // 17
    assert (stats.rejected, stats.dead_lettered, stats.parked, stats.duplicates) == (0, 0, 0, 0)
    assert stats.accepted == 200 * LIFECYCLE.accepted
    assert messages(transport, S.dead_letter_stream) == []
    await check_lifecycles_done(store, transport, cmds, 200)


async def test_a_batch_takes_fewer_inputs_after_one_that_fanned_out_more(
    transport: MemoryTransport, store: Store
) -> None:
    """router.batch_max_commands bounds what a batch applies, local commands included: after a
    first batch of bookings (each brings BOOK.accepted - 1 local commands), the next ones take
    only as many bookings as fit."""
    bookings = [lifecycle(f"A{i}", "MAIN")[0] for i in range(60)]
    publish(transport, bookings)
    router = make_router(transport, store, batch_size=30, batch_max_commands=40)

    async with running(router):
        await settle(router, transport, store)

    fit = 40 // BOOK.accepted
    stats = router.workers[0].stats
    assert fit < 30
    assert stats.batches == 1 + -(-30 // fit)  # 30 at first, then `fit` at a time
    assert stats.accepted == 60 * BOOK.accepted
    await check_matches_oracle(store, transport, bookings)


async def test_out_of_order_application_is_detected(
    transport: MemoryTransport, store: Store
) -> None:
    """What the order tests rely on: a reschedule applied before its booking is rejected."""
    book, reschedule, *_ = lifecycle("A1", "MAIN")
    publish(transport, [reschedule, book])
    router = make_router(transport, store)

    async with running(router):
        await settle(router, transport, store)

    assert router.workers[0].stats.rejected == 1
    assert await store.outcome("appointment", "A1", reschedule.id) == (
        "rejected",
        "appointment A1 is new, not booked: cannot reschedule",
    )
    appt = (await states(store, "appointment", AppointmentState))["A1"]
    assert (appt.status, appt.plan.date) == ("booked", f"2027-03-{FIRST_DAY}")


# -- effects ------------------------------------------------------------------------------------
def expected_internal(
    appt: str, command_id: str, name: str, facility: str, moved_to: str = ""
) -> list[str]:
    """The keys of the internal messages one appointment command causes (actors' key rules).

    The appointment command's key base is ``<appointment>/<command id>``; an owner's
    own effects are keyed from the key of the command it received, prefixed by its entity (the
    supply actor is the appointment's: ``<appointment>/<appointment>/<command id>:supply:...``).
    """
    cid = f"{appt}/{command_id}"

    def items(f: str, op: str) -> list[str]:
        return [f"{appt}/{cid}:supply:{f}:{item}:{op}" for item in CARD]

    procedure = f"{cid}:procedure:27447"
    if name == "book":
        keys = [f"{cid}:supply:{facility}", f"{cid}:erp:{facility}", f"{cid}:billing"]
        return [*keys, procedure, *items(facility, "reserve")]
    if name == "reschedule" and moved_to:
        return (
            [f"{cid}:{owner}:{f}" for f in (facility, moved_to) for owner in ("supply", "erp")]
            + items(facility, "release")
            + items(moved_to, "reserve")
        )
    if name == "reschedule":
        return [f"{cid}:erp:{facility}"]
    # cancelled, or performed: what is still reserved is released
    assert name in ("cancel", "post_charges")
    keys = [f"{cid}:supply:{facility}", f"{cid}:erp:{facility}", f"{cid}:billing"]
    return [*keys, procedure, *items(facility, "release")]


async def test_each_accepted_command_fans_out_exactly_once_with_deterministic_keys(
    transport: MemoryTransport, store: Store
) -> None:
    # Hostile ids on purpose: they travel in subjects, percent-encoded.
    plans = [(f"A{i}", FACILITIES[i % 2]) for i in range(10)] + [("HOSP:A 1.2/x*>%", "OR 2.1")]
    cmds: list[Cmd] = []
    expected_ids: list[str] = []
    completed: list[Cmd] = []
    cancelled: list[Cmd] = []
    for n, (appt, facility) in enumerate(plans):
        # the first two move to the other facility; then one completes, the other is cancelled
        moved_to = FACILITIES[(n + 1) % 2] if n < 2 else ""
        last: tuple[str, Any] = (
            ("post_charges", charges_payload(f"{appt}/L1")) if n % 2 == 0 else ("cancel", {})
        )
        steps: list[tuple[str, Any]] = [
            ("book", book_payload(facility)),
            ("reschedule", {"start": start(20), **({"facility_id": moved_to} if moved_to else {})}),
            last,
        ]
        for step, (name, payload) in enumerate(steps):
            c = command(appt, name, payload, id=f"{appt}#{step}", minutes=step)
            cmds.append(c)
            here = moved_to if moved_to and step > 1 else facility
            expected_ids += expected_internal(
                appt, c.id, name, here, moved_to if name == "reschedule" else ""
            )
            if name == "post_charges":
                completed.append(c)
            elif name == "cancel":
                cancelled.append(c)
    publish(transport, cmds)
    router = make_router(transport, store, batch_size=5)

    async with running(router):
        await settle(router, transport, store)

    internal = internal_ids(transport)
    assert len(internal) == len(set(internal))
    assert sorted(internal) == sorted(expected_ids)
    assert router.publisher.stats.duplicates == 0
    await check_matches_oracle(store, transport, cmds)
    # one charge per completed appointment, downstream, correlated with the charges posted
    charges = envelopes(transport, "billing.charge")
    assert sorted(m.subject for m, _ in charges) == sorted(
        S.downstream("billing", c.entity) for c in completed
    )
    by_entity = {env["entity"]: (m, env) for m, env in charges}
    for c in completed:
        m, env = by_entity[c.entity]
        line = f"{c.entity}/L1"
        assert (
            env["id"]
            == (m.headers or {})["Nats-Msg-Id"]
            == f"{c.entity}/{c.entity}/{c.id}:billing:billing:charge:{line}"
        )
        assert env["causation_id"] == f"{c.entity}/{c.id}:billing"
        assert env["correlation_id"] == c.id
        assert env["data"] == {
            "appointment_id": c.entity,
            "line_id": line,
            "code": "27447",
            "quantity": 1,
            "amount": "5000.00",
            "currency": "USD",
            "reverses_line_id": "",
        }
    # one reversal per cancelled appointment
    reversals = envelopes(transport, "billing.reversal")
    assert sorted(env["entity"] for _, env in reversals) == sorted(c.entity for c in cancelled)
    hostile = (await states(store, "appointment", AppointmentState))["HOSP:A 1.2/x*>%"]
    assert (hostile.status, hostile.plan.facility_id, hostile.version) == (
        "completed",
        "OR 2.1",
        3,
    )
    assert "gauze@OR 2.1" in await states(store, "item", ItemState)


# -- duplicates ---------------------------------------------------------------------------------
async def test_a_command_id_is_applied_once_within_a_batch_across_batches_and_restarts(
    transport: MemoryTransport, store: Store
) -> None:
    book = command("A1", "book", book_payload("MAIN"), id="dup-1")

    async def check_applied_once() -> None:
        appt = (await states(store, "appointment", AppointmentState))["A1"]
        assert (appt.status, appt.version) == ("booked", 1)
        assert (await states(store, "billing", BillingState))["A1"].ledger.wanted == 1
        assert (await states(store, "item", ItemState))["gauze@MAIN"].reservations == {"A1": 4}
        assert len(internal_ids(transport)) == BOOK.internal
        assert len(downstream_ids(transport)) == BOOK.downstream
        assert messages(transport, S.dead_letter_stream) == []

    # No Msg-Id: the transport stores every copy, the router must drop them.
    publish(transport, [book, book], msg_id=False)  # one batch
    first = make_router(transport, store)
    async with running(first):
        await settle(first, transport, store)
        assert first.workers[0].stats.duplicates == 1
        await check_applied_once()

        publish(transport, [book], msg_id=False)  # a later batch
        await settle(first, transport, store)
        assert first.workers[0].stats.duplicates == 2
        assert first.workers[0].stats.accepted == BOOK.accepted
        await check_applied_once()

    second = make_router(transport, store)
    publish(transport, [book], msg_id=False)  # after a restart
    async with running(second):
        await settle(second, transport, store)
        assert (second.workers[0].stats.duplicates, second.workers[0].stats.accepted) == (1, 0)
        await check_applied_once()
    assert len(messages(transport, IN, "cs.in.>")) == 4
    await check_matches_oracle(store, transport, [book])


# -- dead letters -------------------------------------------------------------------------------
BOOK_A1 = book_payload("MAIN")
BAD_INPUTS: list[tuple[str, str, bytes, str, str]] = [
    # (what, subject, data, code, a fragment of the reason)
    ("garbage", "cs.in.appointment.A1", b"\x00\xffgarbage", "undecodable", "0x00 at offset 0"),
    (
        "unknown kind",
        "cs.in.nosuch.X",
        command("X", "do", {"a": 1}, id="bad-kind", kind="nosuch").data,
        "unknown_kind",
        "unknown entity kind 'nosuch'",
    ),
    (
        "unknown command",
        "cs.in.appointment.A1",
        command("A1", "fly", None, id="bad-cmd").data,
        "unknown_command",
        "unknown command 'appointment.fly'",
    ),
    (
        "entity mismatch",
        "cs.in.appointment.A1",
        command("B2", "book", BOOK_A1, id="bad-entity").data,
        "entity_mismatch",
        "$.entity 'B2' does not match",
    ),
    (
        "kind mismatch",
        "cs.in.appointment.A1",
        command(
            "A1", "update", {"appointment_id": "A1", "status": "x"}, id="k", kind="billing"
        ).data,
        "kind_mismatch",
        "'billing'",
    ),
    (
        "schema too new",
        "cs.in.appointment.A1",
        command("A1", "book", BOOK_A1, id="bad-version", schema_version=2).data,
        "unsupported_version",
        "$.schema_version 2",
    ),
    (
        "payload type error",
        "cs.in.appointment.A1",
        command("A1", "book", {**BOOK_A1, "start": 20270101}, id="bad-type").data,
        "undecodable",
        "$.data.start",
    ),
    (
        "missing payload",
        "cs.in.appointment.A1",
        command("A1", "book", None, id="no-payload").data,
        "undecodable",
        "procedures",
    ),
    (
        "empty id",
        "cs.in.appointment.A1",
        b'{"id":"","kind":"appointment.cancel","entity":"A1","occurred_at":"2027-01-01T00:00:00Z"}',
        "missing_id",
        "$.id",
    ),
    (
        "subject too short",
        "cs.in.appointment",
        command("A1", "cancel", id="short").data,
        "bad_subject",
        "cs.in.<kind>.<entity>",
    ),
    (
        "bad escape in subject",
        "cs.in.appointment.A%zz",
        command("A%zz", "cancel", id="esc").data,
        "bad_id",
        "bad escape",
    ),
]


async def test_bad_inputs_are_dead_lettered_raw_and_later_good_messages_still_flow(
    transport: MemoryTransport, store: Store
) -> None:
    good: list[Cmd] = []
    for n, (_, subject, data, _, _) in enumerate(BAD_INPUTS):
        transport.append(subject, data, {"Nats-Msg-Id": f"bad-{n}", "X-Source": "emr"})
        ok = command(f"OK{n}", "book", book_payload("MAIN"), id=f"ok-{n}")
        good.append(ok)
        publish(transport, [ok])
    router = make_router(transport, store, batch_size=4)

    async with running(router):
        await settle(router, transport, store)

    dead = messages(transport, S.dead_letter_stream)
    assert len(dead) == len(BAD_INPUTS)
    assert router.workers[0].stats.dead_lettered == len(BAD_INPUTS)
    for n, (m, (what, subject, data, code, fragment)) in enumerate(
        zip(dead, BAD_INPUTS, strict=True)
    ):
        headers = m.headers or {}
        assert m.data == data, what
        assert m.subject == f"cs.dlq.{code}", what
        assert headers[H_CODE] == code, what
        assert fragment in headers[H_REASON], (what, headers[H_REASON])
        assert headers[H_SUBJECT] == subject
        assert (headers[H_STREAM], headers[H_SEQ]) == (IN, str(2 * n + 1))
        assert headers["X-Source"] == "emr"  # the input's own headers are kept
        assert headers["Nats-Msg-Id"] == f"dlq:{IN}:{2 * n + 1}"
    appts = await states(store, "appointment", AppointmentState)
    assert set(appts) == {c.entity for c in good}
    assert all(a.status == "booked" for a in appts.values())
    assert router.workers[0].stats.rejected == 0


async def test_a_business_rejection_is_dead_lettered_and_recorded(
    transport: MemoryTransport, store: Store
) -> None:
    cancel = command("A9", "cancel", {"reason": "early"}, id="cancel-early")
    publish(transport, [cancel])
    router = make_router(transport, store)

    async with running(router):
        await settle(router, transport, store)
        reason = "appointment A9 is new, not booked: cannot cancel"
        [dead] = messages(transport, S.dead_letter_stream)
        assert dead.subject == "cs.dlq.rejected"
        assert dead.data == cancel.data
        assert (dead.headers or {})[H_CODE] == "rejected"
        assert (dead.headers or {})[H_REASON] == reason
        assert await store.outcome("appointment", "A9", "cancel-early") == ("rejected", reason)
        assert await store.entities("appointment") == []  # a rejection changes no state
        assert internal_ids(transport) == []

        # The same command again is a duplicate of the rejected one, not a second rejection.
        publish(transport, [cancel], msg_id=False)
        publish(transport, [command("A9", "book", book_payload("MAIN"), id="book-late")])
        await settle(router, transport, store)

    stats = router.workers[0].stats
    assert (stats.rejected, stats.duplicates) == (1, 1)
    assert len(messages(transport, S.dead_letter_stream)) == 1
    appt = (await states(store, "appointment", AppointmentState))["A9"]
    assert (appt.status, appt.version) == ("booked", 1)


# -- poison messages ----------------------------------------------------------------------------
class Poke(msgspec.Struct, kw_only=True, frozen=True):
    poison: bool = False


class Poked(msgspec.Struct, frozen=True, tag="poked"):
    command_id: str


class WidgetState(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    pokes: tuple[str, ...] = ()


def widget_kind(attempts: Counter[str]) -> EntityKind[WidgetState, Poked]:
    """A kind whose decide raises on ``{"poison": true}``, counting attempts per command."""

    def decide(state: WidgetState, command: Command[Any]) -> Accepted[Poked]:
        attempts[command.id] += 1
        if command.payload.poison:
            raise RuntimeError(f"poison pill in {command.id}")
        return Accepted(events=(Poked(command.id),))

    def evolve(state: WidgetState, event: Poked) -> WidgetState:
        return msgspec.structs.replace(state, pokes=(*state.pokes, event.command_id))

    return EntityKind(
        name="widget",
        state_type=WidgetState,
        commands={"poke": Poke},
        initial=lambda entity: WidgetState(id=entity),
        decide=decide,
        evolve=evolve,
    )


async def test_a_poison_message_parks_its_entity_while_others_keep_flowing(
    transport: MemoryTransport, store: Store
) -> None:
    attempts: Counter[str] = Counter()
    registry = Registry.of(widget_kind(attempts), *default_registry().kinds.values())
    supervision = Supervision(max_failures=3, backoff_initial_s=0.001, backoff_max_s=0.01)

    def poke(entity: str, n: int, poison: bool = False) -> Cmd:
        return command(entity, "poke", {"poison": poison}, id=f"{entity}-{n}", kind="widget")

    w1 = [poke("W1", 0), poke("W1", 1, poison=True), poke("W1", 2), poke("W1", 3)]
    w2 = [poke("W2", n) for n in range(4)]
    interleaved = [c for pair in zip(w1, w2, strict=True) for c in pair]
    publish(transport, [*interleaved, command("A1", "book", book_payload("MAIN"), id="a1-book")])

    def start() -> Router:
        return make_router(
            transport, store, registry=registry, batch_size=3, supervision=supervision
        )

    router = start()
    async with running(router):
        await settle(router, transport, store)
    assert router.workers[0].stats.parked == 3

    assert attempts["W1-1"] == 3  # tried max_failures times, then parked
    rows = await store.parked("widget", "W1")
    assert [r.command_id for r in rows] == ["W1-1", "W1-2", "W1-3"]
    assert [r.data for r in rows] == [c.data for c in w1[1:]]
    assert "RuntimeError: poison pill in W1-1" in rows[0].reason
    assert rows[0].failures == 3
    assert all(r.reason == "entity is parked" for r in rows[1:])
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    assert await store.outcome("widget", "W1", "W1-1") is None
    stored = await store.entity("widget", "W1")
    assert stored is not None
    assert stored.parked
    widgets = await states(store, "widget", WidgetState)
    assert widgets["W1"].pokes == ("W1-0",)
    assert widgets["W2"].pokes == ("W2-0", "W2-1", "W2-2", "W2-3")
    w2_row = await store.entity("widget", "W2")
    assert w2_row is not None
    assert not w2_row.parked
    appt = (await states(store, "appointment", AppointmentState))["A1"]
    assert appt.status == "booked"
    counts = await store.counts()
    assert (counts["parked_entities"], counts["parked_messages"]) == (1, 3)

    # Parked survives a restart: a new message for W1 queues behind, W2 still flows.
    publish(transport, [poke("W1", 4), poke("W2", 4)])
    again = start()
    async with running(again):
        await settle(again, transport, store)
    assert [r.command_id for r in await store.parked("widget", "W1")] == [
        "W1-1",
        "W1-2",
        "W1-3",
        "W1-4",
    ]
    assert attempts["W1-4"] == 0
    widgets = await states(store, "widget", WidgetState)
    assert widgets["W1"].pokes == ("W1-0",)
    assert widgets["W2"].pokes[-1] == "W2-4"


async def _run_on_corrupt_state(transport: MemoryTransport, store: Store) -> None:
    await store.commit(
        BatchWrite(entities=[EntityRow("appointment", "A1", CORRUPT, parked=False, seq=3)])
    )
    publish(
        transport,
        [
            command("A1", "cancel", {"reason": "x"}, id="c1"),
            command("A2", "book", book_payload("MAIN"), id="b2"),
        ],
    )
    router = make_router(transport, store)
    async with running(router):
        await settle(router, transport, store)


CORRUPT = b"\xc1 not msgpack"


async def test_an_undecodable_stored_state_parks_the_entity(
    transport: MemoryTransport, store: Store
) -> None:
    await _run_on_corrupt_state(transport, store)

    [row] = await store.parked("appointment", "A1")
    assert row.command_id == "c1"
    assert "stored state does not decode" in row.reason
    stored = await store.entity("appointment", "A1")
    assert stored is not None
    assert stored.parked
    other = await store.entity("appointment", "A2")
    assert other is not None
    assert msgspec.msgpack.decode(other.state, type=AppointmentState).status == "booked"


async def test_parking_on_an_undecodable_state_keeps_the_stored_bytes(
    transport: MemoryTransport, store: Store
) -> None:
    await _run_on_corrupt_state(transport, store)

    stored = await store.entity("appointment", "A1")
    assert stored is not None
    assert stored.state == CORRUPT


# -- restarts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["stop", "crash"])
async def test_a_router_stopped_mid_stream_resumes_and_applies_everything_once(
    transport: MemoryTransport, store: Store, how: str
) -> None:
    appointments = 60
    cmds = lifecycles(appointments, seed=7)
    publish(transport, cmds)
    stream = transport.streams[IN]

    first = make_router(transport, store, batch_size=7)
    async with anyio.create_task_group() as tg:
        await tg.start(first.run)
        with anyio.fail_after(10):
            while True:  # poll until some, not all, is committed
                if await store.offset(IN) >= 100:
                    break
                await anyio.sleep(0.001)
        if how == "stop":  # graceful: what was pulled is drained
            first.stop()
        else:  # abrupt: whatever is in flight is abandoned
            tg.cancel_scope.cancel()
    if how == "crash":
        # As after a crashed process: its connection is gone, SQLite rolls back what was open.
        await store.close()
    async with await Store.open(store.path) as resumed:
        stopped_at = await resumed.offset(IN)
        assert 100 <= stopped_at < len(stream.messages)  # some, not all

        second = make_router(transport, resumed, batch_size=7)
        async with running(second):
            await settle(second, transport, resumed)

        assert first.workers[0].stats.rejected == second.workers[0].stats.rejected == 0
        assert messages(transport, S.dead_letter_stream) == []
        await check_lifecycles_done(resumed, transport, cmds, appointments)
    charges = envelopes(transport, "billing.charge")
    assert sorted(m.subject for m, _ in charges) == sorted(
        S.downstream("billing", f"A{a}") for a in range(appointments)
    )


# -- passivation --------------------------------------------------------------------------------
async def test_passivated_entities_are_loaded_back_from_the_store(
    transport: MemoryTransport, store: Store
) -> None:
    books = [
        command(f"A{a}", "book", book_payload(FACILITIES[a % 2]), id=f"b{a}") for a in range(100)
    ]
    publish(transport, books)
    router = make_router(transport, store, max_live_actors=10, batch_size=20)

    async with running(router):
        await settle(router, transport, store)
        worker = router.workers[0]
        assert worker.live_actors <= 10
        assert worker.stats.passivated > 0
        evicted = worker.stats.passivated

        later = [
            command("A0", "reschedule", {"start": start(20)}, id="r0", minutes=1),
            command("A1", "post_charges", charges_payload("A1-L1"), id="c1", minutes=1),
        ]
        publish(transport, later)
        await settle(router, transport, store)
        assert worker.live_actors <= 10
        assert worker.stats.passivated > evicted

    assert router.workers[0].stats.rejected == 0
    appts = await states(store, "appointment", AppointmentState)
    assert (appts["A0"].status, appts["A0"].plan.date, appts["A0"].version) == (
        "booked",
        "2027-03-20",
        2,
    )
    assert (appts["A1"].status, appts["A1"].version) == ("completed", 2)
    assert all(appts[f"A{a}"].version == 1 for a in range(2, 100))
    bills = await states(store, "billing", BillingState)
    assert (bills["A0"].status, bills["A0"].ledger.wanted) == ("booked", 1)
    assert (bills["A1"].status, bills["A1"].ledger.wanted) == ("completed", 2)
    supplies = await states(store, "supply", SupplyState)
    held = Counter(f for s in supplies.values() for f in s.reservations)
    assert held == {"MAIN": 50, "NORTH": 49}
    assert supplies["A1"].reservations == {}
    assert set(supplies["A3"].reservations) == {"NORTH"}
    erps = await states(store, "erp", ErpState)
    assert {d.date for d in erps["A0"].demand["MAIN"]} == {"2027-03-20"}
    assert {d.date for d in erps["A2"].demand["MAIN"]} == {f"2027-03-{FIRST_DAY}"}
    # Loaded back or kept live, every actor decided as if it had never left memory.
    await check_matches_oracle(store, transport, books + later)


async def test_a_reloaded_entity_decides_like_one_that_stayed_live(
    transport: MemoryTransport, store: Store
) -> None:
    late_evening = {**book_payload("MAIN"), "start": "2027-03-10T22:00:00-05:00"}
    cmds = [
        command("A1", "book", late_evening, id="b1"),
        command("A1", "reschedule", {"room": "OR-2"}, id="r1", minutes=1),
    ]
    for c in cmds:  # a restart between the two: A1 is loaded back from the store
        publish(transport, [c])
        router = make_router(transport, store)
        async with running(router):
            await settle(router, transport, store)

    appt = (await states(store, "appointment", AppointmentState))["A1"]
    assert appt.plan.date == "2027-03-10"
    assert {d.date for d in (await states(store, "erp", ErpState))["A1"].demand["MAIN"]} == {
        "2027-03-10"
    }
    await check_matches_oracle(store, transport, cmds)


# -- publish failures ---------------------------------------------------------------------------
async def test_transient_publish_failures_are_retried_and_delivered_once(
    transport: MemoryTransport, store: Store
) -> None:
    transport.fail_publish = 5
    books = [command(f"A{a}", "book", book_payload("MAIN"), id=f"b{a}") for a in range(10)]
    publish(transport, books)
    router = make_router(transport, store, batch_size=3)

    async with running(router):
        await settle(router, transport, store)

    assert transport.fail_publish == 0
    assert router.publisher.stats.retries >= 5
    assert (router.publisher.stats.duplicates, router.publisher.stats.failed) == (0, 0)
    internal = internal_ids(transport)
    assert sorted(internal) == sorted(
        key for b in books for key in expected_internal(b.entity, b.id, "book", "MAIN")
    )
    assert len(downstream_ids(transport)) == 10 * BOOK.downstream
    bills = await states(store, "billing", BillingState)
    assert {k: v.ledger.wanted for k, v in bills.items()} == {f"A{a}": 1 for a in range(10)}
    supplies = await states(store, "supply", SupplyState)
    assert {k: v.reservations for k, v in supplies.items()} == {
        f"A{a}": {"MAIN": CARD} for a in range(10)
    }
    items = await states(store, "item", ItemState)
    assert {k: v.reserved for k, v in items.items()} == {
        f"{item}@MAIN": 10 * n for item, n in CARD.items()
    }
    erps = await states(store, "erp", ErpState)
    assert {k: set(v.demand) for k, v in erps.items()} == {f"A{a}": {"MAIN"} for a in range(10)}
    await check_matches_oracle(store, transport, books)


# -- replay rebuild -----------------------------------------------------------------------------
async def test_rebuild_reproduces_the_live_state_and_sends_nothing_again(
    transport: MemoryTransport, store: Store
) -> None:
    cmds = lifecycles(30, seed=99)
    cmds.insert(10, command("Z", "post_charges", charges_payload("Z-L1"), id="z-rejected"))
    cmds += [
        # rejected: completed by now (and newer than its last change, so not merely superseded)
        command("A3", "cancel", None, id="A3-too-late", minutes=10),
        command("M", "book", book_payload("MAIN"), id="m-0"),
        command(
            "M", "reschedule", {"start": start(20), "facility_id": "NORTH"}, id="m-1", minutes=1
        ),
        command("M", "cancel", {"reason": "moved away"}, id="m-2", minutes=2),
    ]
    publish(transport, cmds)
    publish(transport, cmds[5:8], msg_id=False)  # duplicates
    transport.append("cs.in.appointment.G", b"garbage")  # dead letter
    live = make_router(transport, store, batch_size=11)
    async with running(live):
        await settle(live, transport, store)
    assert live.workers[0].stats.duplicates == 3
    await check_matches_oracle(store, transport, cmds)

    def snapshot(entities: list[Any]) -> list[tuple[str, str, bytes, bool, int]]:
        return [(e.kind, e.id, e.state, e.parked, e.seq) for e in entities]

    before = snapshot(await store.entities())
    outcomes = {c.id: await store.outcome(c.kind, c.entity, c.id) for c in cmds}
    lengths = {name: len(s.messages) for name, s in transport.streams.items()}
    counts = await store.counts()
    assert counts["outbox_pending"] == 0

    report = await rebuild(
        transport=transport,
        store=store,
        registry=default_registry(),
        subjects=S,
        settings=WorkerSettings(batch_size=13, pull_timeout_s=0.02),
        refdata=CATALOG.at,
    )

    assert report.messages == lengths[IN]
    assert report.pending_effects == 0
    assert report.entities == len(before)
    assert snapshot(await store.entities()) == before
    assert {c.id: await store.outcome(c.kind, c.entity, c.id) for c in cmds} == outcomes
    assert outcomes["A3-too-late"] == (
        "rejected",
        "appointment A3 is completed, not booked: cannot cancel",
    )
    assert outcomes["m-2"] == ("accepted", "")
    assert outcomes["z-rejected"] == ("rejected", "appointment Z is new: cannot post charges")
    assert await store.offset(IN) == lengths[IN]
    assert await store.counts() == counts
    assert {name: len(s.messages) for name, s in transport.streams.items()} == lengths

    # A router started on the rebuilt store finds nothing to send or apply.
    after = make_router(transport, store)
    async with running(after):
        await settle(after, transport, store)
    assert after.publisher.stats.published == after.publisher.stats.duplicates == 0
    assert {name: len(s.messages) for name, s in transport.streams.items()} == lengths


async def test_the_same_command_id_for_two_entities_is_not_a_duplicate(
    transport: MemoryTransport, store: Store
) -> None:
    # Dedupe is per entity: senders that reuse ids across entities lose nothing.
    books = [command(a, "book", book_payload("MAIN"), id="shared-1") for a in ("A1", "A2")]
    publish(transport, books, msg_id=False)
    router = make_router(transport, store)
    async with running(router):
        await settle(router, transport, store)
    assert router.workers[0].stats.duplicates == 0
    booked = await states(store, "appointment", AppointmentState)
    assert {a: s.status for a, s in booked.items()} == {"A1": "booked", "A2": "booked"}


async def test_the_same_command_id_for_two_entities_loses_no_fan_out(
    transport: MemoryTransport, store: Store
) -> None:
    books = [command(a, "book", book_payload("MAIN"), id="shared-1") for a in ("A1", "A2")]
    publish(transport, books, msg_id=False)
    router = make_router(transport, store)
    async with running(router):
        await settle(router, transport, store)
    bills = await states(store, "billing", BillingState)
    assert {a: s.status for a, s in bills.items()} == {"A1": "booked", "A2": "booked"}
    supplies = await states(store, "supply", SupplyState)
    assert {a: s.reservations for a, s in supplies.items()} == {
        a: {"MAIN": CARD} for a in ("A1", "A2")
    }
    erps = await states(store, "erp", ErpState)
    assert {a: set(e.demand) for a, e in erps.items()} == {a: {"MAIN"} for a in ("A1", "A2")}
    items = await states(store, "item", ItemState)
    assert items["gauze@MAIN"].reservations == {"A1": 4, "A2": 4}
