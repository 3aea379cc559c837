"""The actor contract on the pure entity kinds: registry, deterministic effect keys, rejections
naming the entity and its status, and state as a fold of the recorded events.

The scenario behaviour of the workflow actors (what a booking reserves, how a reschedule moves
demand, charges, replenishment, the sync ledger) is in test_workflow_actors.py.
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from workflow_network import Network, demo_refdata

from caresync.actors import (
    Accepted,
    ActorRef,
    Command,
    Downstream,
    Effect,
    EntityKind,
    Registry,
    Rejected,
    appointment,
    billing,
    default_registry,
    erp,
    supply,
)
from caresync.codecs.scheduling import (
    BookAppointment,
    ChargeLine,
    CloseAppointment,
    Coverage,
    ModifyAppointment,
    PostCharges,
    ProcedureRef,
    RescheduleAppointment,
)

T0 = datetime(2027, 3, 1, 8, 0, tzinfo=UTC)
REFDATA = demo_refdata()
KINDS = dict(default_registry().kinds)
BOOK = BookAppointment(
    procedures=(ProcedureRef(code="27447"),),
    facility_id="MAIN",
    start=datetime(2027, 3, 10, 9, 0, tzinfo=UTC),
    payer_id="ACME",
)
CLOSE = CloseAppointment(reason="patient request")
CHARGES = PostCharges(lines=(ChargeLine(line_id="L1", code="27447", amount="5000.00"),))
PAYLOADS: dict[str, Any] = {
    "book": BOOK,
    "sync": BOOK,
    "reschedule": RescheduleAppointment(start=datetime(2027, 3, 20, 9, 0, tzinfo=UTC)),
    "modify": ModifyAppointment(room="OR-9", payer_id="STRICT"),
    "cancel": CLOSE,
    "no_show": CLOSE,
    "delete": CLOSE,
    "coverage": Coverage(payer_id="STRICT"),
    "post_charges": CHARGES,
}
"""A valid payload of every appointment command."""


def cmd(
    name: str, payload: Any, *, id: str = "c1", entity: str = "A1", at: datetime = T0
) -> Command[Any]:
    return Command(
        id=id, name=name, entity=entity, occurred_at=at, payload=payload, refdata=REFDATA
    )


def accept(kind: EntityKind[Any, Any], state: Any, command: Command[Any]) -> tuple[Any, Accepted]:
    """Decide, require acceptance, and return the state after the events with the decision."""
    decision = kind.decide(state, command)
    assert isinstance(decision, Accepted), decision
    return kind.apply(state, decision.events), decision


def booked(entity: str = "A1", book: BookAppointment = BOOK) -> appointment.AppointmentState:
    state, _ = accept(appointment.KIND, appointment.initial(entity), cmd("book", book, id="b0"))
    return state


def as_command(effect: Effect) -> tuple[EntityKind[Any, Any], Command[Any]]:
    """The command an actor effect becomes at its target, as the runtime would deliver it."""
    assert isinstance(effect.target, ActorRef)
    kind = KINDS[effect.target.kind]
    payload = msgspec.convert(msgspec.to_builtins(effect.payload), kind.commands[effect.name])
    return kind, cmd(effect.name, payload, id=effect.key, entity=effect.target.entity)


class Recorder:
    """Runs source commands through every actor they reach, keeping each entity's events."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], Any] = {}
        self.events: dict[tuple[str, str], list[Any]] = {}

    def send(self, kind_name: str, entity: str, name: str, payload: Any, *, id: str) -> None:
        kind = KINDS[kind_name]
        queue = deque([(kind, cmd(name, payload, id=id, entity=entity))])
        while queue:
            kind, command = queue.popleft()
            key = (kind.name, command.entity)
            self.states[key], decision = accept(
                kind, self.states.get(key) or kind.initial(command.entity), command
            )
            self.events.setdefault(key, []).extend(decision.events)
            queue.extend(as_command(e) for e in decision.effects if isinstance(e.target, ActorRef))


# -- fan-out --------------------------------------------------------------------------------
def test_a_booking_sends_its_plan_to_each_owner_keyed_by_the_command() -> None:
    book = msgspec.structs.replace(BOOK, visit_number="V1")
    _, decision = accept(appointment.KIND, appointment.initial("A1"), cmd("book", book))

    assert [(e.target, e.name, e.key) for e in decision.effects] == [
        (ActorRef("supply", "A1"), "plan", "A1/c1:supply:MAIN"),
        (ActorRef("erp", "A1"), "demand", "A1/c1:erp:MAIN"),
        (ActorRef("billing", "A1"), "update", "A1/c1:billing"),
        (ActorRef("visit", "V1"), "link", "A1/c1:visit"),
        (ActorRef("procedure", "A1#27447"), "update", "A1/c1:procedure:27447"),
    ]
    # Supply and ERP are the case's own conversations; the payload names the facility.
    assert [e.payload["facility_id"] for e in decision.effects[:2]] == ["MAIN", "MAIN"]
    # Each payload is a valid command of its target.
    for effect in decision.effects:
        kind, command = as_command(effect)
        assert isinstance(kind.decide(kind.initial(command.entity), command), Accepted)


def test_procedures_sharing_an_item_make_one_reservation_of_the_sum() -> None:
    book = msgspec.structs.replace(
        BOOK,
        procedures=(ProcedureRef(code="27447"), ProcedureRef(code="27447", provider_id="DR-WHO")),
    )
    _, decision = accept(appointment.KIND, appointment.initial("A1"), cmd("book", book))
    [plan] = [e for e in decision.effects if e.target == ActorRef("supply", "A1")]
    assert plan.payload["facility_id"] == "MAIN"
    assert list(msgspec.to_builtins(plan.payload["reservations"])) == [
        {"item_id": "gauze", "quantity": 10},  # 4 (general card) + 6 (DR-WHO's card)
        {"item_id": "knee-kit", "quantity": 1},
    ]

    kind, command = as_command(plan)
    _, at_supply = accept(kind, kind.initial("A1"), command)
    reserves = [e for e in at_supply.effects if e.name == "reserve"]
    assert [(e.target, e.payload["quantity"]) for e in reserves] == [
        (ActorRef("item", "gauze@MAIN"), 10),
        (ActorRef("item", "knee-kit@MAIN"), 1),
    ]
    kind, command = as_command(reserves[0])
    item, _ = accept(kind, kind.initial("gauze@MAIN"), command)
    assert item.reserved == 10


def test_a_supply_plan_tells_each_item_and_the_supply_system_once_per_operation() -> None:
    def plan(reservations: dict[str, int], consumed: dict[str, int]) -> supply.SupplyPlan:
        return msgspec.convert(
            {
                "facility_id": "MAIN",
                "reservations": [{"item_id": i, "quantity": q} for i, q in reservations.items()],
                "consumed": [{"item_id": i, "quantity": q} for i, q in consumed.items()],
            },
            supply.SupplyPlan,
        )

    before = {"gauze": 4, "knee-kit": 1, "lens": 2}
    state, _ = accept(supply.KIND, supply.initial("A1"), cmd("plan", plan(before, {"knee-kit": 1})))
    # Gauze used (3 of 4, the rest released), the knee kit credited back, one lens less held.
    after, decision = accept(
        supply.KIND, state, cmd("plan", plan({"lens": 1}, {"gauze": 3}), id="c2")
    )
    to_items = [
        (e.target, e.name, e.key, e.payload)
        for e in decision.effects
        if isinstance(e.target, ActorRef)
    ]
    assert to_items == [  # one command per item, keyed by the item, as before
        (ActorRef("item", "gauze@MAIN"), "consume", "A1/c2:gauze:consume",
         {"appointment_id": "A1", "quantity": 3}),
        (ActorRef("item", "gauze@MAIN"), "release", "A1/c2:gauze:release",
         {"appointment_id": "A1"}),
        (ActorRef("item", "knee-kit@MAIN"), "return_stock", "A1/c2:knee-kit:return",
         {"appointment_id": "A1", "quantity": 1}),
        (ActorRef("item", "knee-kit@MAIN"), "release", "A1/c2:knee-kit:release",
         {"appointment_id": "A1"}),
        (ActorRef("item", "lens@MAIN"), "reserve", "A1/c2:lens:reserve",
         {"appointment_id": "A1", "quantity": 1}),
    ]  # fmt: skip
    to_system = Downstream("supply", "A1")
    down = [(e.name, e.key, e.payload) for e in decision.effects if e.target == to_system]
    assert down == [
        (
            "consumption",
            "A1/c2:supply:consumption",
            {
                "facility_id": "MAIN",
                "appointment_id": "A1",
                "lines": [
                    {"item_id": "gauze", "quantity": 3},
                    {"item_id": "knee-kit", "quantity": -1},
                ],
            },
        ),
        (
            "reservation",
            "A1/c2:supply:reservation",
            {
                "facility_id": "MAIN",
                "appointment_id": "A1",
                "lines": [
                    {"item_id": "gauze", "quantity": -4},
                    {"item_id": "knee-kit", "quantity": -1},
                    {"item_id": "lens", "quantity": -1},
                ],
            },
        ),
    ]
    assert after.ledger.pending == (
        "A1/c1:supply:consumption",
        "A1/c1:supply:reservation",
        "A1/c2:supply:consumption",
        "A1/c2:supply:reservation",
    )
    # The same plan again changes nothing and sends nothing.
    assert supply.KIND.decide(after, cmd("plan", plan({"lens": 1}, {"gauze": 3}), id="c3")) == (
        Accepted()
    )


def test_erp_demand_sends_one_message_with_the_changed_lines() -> None:
    def demand(*lines: tuple[str, str, int]) -> erp.Demand:
        return erp.Demand(
            facility_id="MAIN",
            lines=tuple(erp.DemandLine(item_id=i, date=d, quantity=q) for i, d, q in lines),
        )

    planned = demand(("knee-kit", "2027-03-10", 1), ("gauze", "2027-03-10", 4))
    state, first = accept(erp.KIND, erp.initial("A1"), cmd("demand", planned))
    assert [e.payload["lines"] for e in first.effects] == [
        [
            {"item_id": "gauze", "date": "2027-03-10", "quantity": 4},
            {"item_id": "knee-kit", "date": "2027-03-10", "quantity": 1},
        ]
    ]
    moved = demand(
        ("gauze", "2027-03-10", 4), ("lens", "2027-03-20", 2), ("knee-kit", "2027-03-20", 1)
    )
    after, decision = accept(erp.KIND, state, cmd("demand", moved, id="c2"))
    [effect] = decision.effects
    assert (effect.target, effect.name, effect.key) == (
        Downstream("erp", "A1"),
        "demand",
        "A1/c2:erp:demand",
    )
    assert effect.payload == {  # gauze unchanged: no line
        "facility_id": "MAIN",
        "appointment_id": "A1",
        "lines": [
            {"item_id": "knee-kit", "date": "2027-03-10", "quantity": -1},
            {"item_id": "knee-kit", "date": "2027-03-20", "quantity": 1},
            {"item_id": "lens", "date": "2027-03-20", "quantity": 2},
        ],
    }
    [event] = decision.events
    assert isinstance(event, erp.DemandSet)
    assert event.keys == ("A1/c2:erp:demand",)
    assert after.ledger.pending == ("A1/c1:erp:demand", "A1/c2:erp:demand")
    # Nothing changed: no event, no message.
    assert erp.KIND.decide(after, cmd("demand", moved, id="c3")) == Accepted()


def test_rebooking_a_cancelled_appointment_is_accepted_and_plans_again() -> None:
    state, _ = accept(appointment.KIND, booked(), cmd("cancel", CLOSE, id="c"))
    assert state.plan == appointment.Plan()
    state, decision = accept(
        appointment.KIND,
        state,
        cmd("book", msgspec.structs.replace(BOOK, facility_id="NORTH"), id="b1"),
    )
    assert (state.status, state.version) == ("booked", 3)
    assert state.plan.facility_id == "NORTH"
    assert [(r.item_id, r.quantity) for r in state.plan.reservations] == [
        ("gauze", 4),
        ("knee-kit", 1),
    ]
    # Nothing is left at MAIN to take back: only the plan at the new facility, billing and the
    # procedure (booked again) hear of it.
    assert [e.target for e in decision.effects] == [
        ActorRef("supply", "A1"),
        ActorRef("erp", "A1"),
        ActorRef("billing", "A1"),
        ActorRef("procedure", "A1#27447"),
    ]
    assert [e.payload["facility_id"] for e in decision.effects[:2]] == ["NORTH", "NORTH"]


# -- idempotency keys -----------------------------------------------------------------------
RESCHEDULES: list[tuple[str, Any]] = [
    ("reschedule", PAYLOADS["reschedule"]),
    ("reschedule", RescheduleAppointment(facility_id="NORTH")),
    ("modify", ModifyAppointment(procedures=(ProcedureRef(code="66984"),))),
    (
        "post_charges",
        PostCharges(lines=(ChargeLine(line_id="L2", code="C-GAUZE", quantity=2, amount="5"),)),
    ),
]


@pytest.mark.parametrize(
    ("name", "payload"),
    [(name, PAYLOADS[name]) for name in appointment.KIND.commands] + RESCHEDULES,
)
def test_appointment_effect_keys_are_deterministic_and_differ_between_commands(
    name: str, payload: Any
) -> None:
    start = appointment.initial("A1") if name in ("book", "sync") else booked()

    first = appointment.KIND.decide(start, cmd(name, payload, id="one"))
    again = appointment.KIND.decide(start, cmd(name, payload, id="one"))
    other = appointment.KIND.decide(start, cmd(name, payload, id="two"))
    assert isinstance(first, Accepted)
    assert isinstance(other, Accepted)

    assert again == first
    keys_one = [e.key for e in first.effects]
    keys_two = [e.key for e in other.effects]
    assert len(set(keys_one)) == len(keys_one) >= 1
    assert not set(keys_one) & set(keys_two)
    assert all("/one:" in k for k in keys_one)
    # same targets and payloads: only the keys tell the two commands apart
    assert [(e.target, e.name, e.payload) for e in first.effects] == [
        (e.target, e.name, e.payload) for e in other.effects
    ]


OWNER_COMMANDS: list[tuple[str, str, str, dict[str, Any]]] = [
    (
        "billing",
        "A1",
        "update",
        {
            "appointment_id": "A1",
            "status": "completed",
            "readiness": "ready",
            "payer_id": "ACME",
            "procedures": ["27447"],
            "charges": [
                {"line_id": "L1", "code": "27447", "amount": "5000.00"},
                {"line_id": "L2", "code": "27447", "type": "credit", "amount": "50.00"},
            ],
        },
    ),
    (
        "billing",
        "A1",
        "update",
        {"appointment_id": "A1", "status": "cancelled", "payer_id": "ACME"},
    ),
    (
        "supply",
        "A1",
        "plan",
        {
            "facility_id": "MAIN",
            "appointment_id": "A1",
            "reservations": [{"item_id": "gauze", "quantity": 4}],
            "consumed": [{"item_id": "knee-kit", "quantity": 1}],
        },
    ),
    (
        "erp",
        "A1",
        "demand",
        {
            "facility_id": "MAIN",
            "appointment_id": "A1",
            "lines": [
                {"item_id": "gauze", "date": "2027-03-10", "quantity": 4},
                {"item_id": "knee-kit", "date": "2027-03-10", "quantity": 1},
            ],
        },
    ),
    (
        "erp",
        "A1",
        "posting",
        {
            "facility_id": "MAIN",
            "item_id": "gauze",
            "appointment_id": "A1",
            "quantity": 2,
            "amount": "5.00",
        },
    ),
    (
        "purchasing",
        "MAIN",
        "purchase_order",
        {
            "po_id": "PO:gauze@MAIN:1",
            "facility_id": "MAIN",
            "item_id": "gauze",
            "supplier_id": "SUP-A",
            "quantity": 20,
            "unit_cost": "2.50",
        },
    ),
    ("item", "gauze@MAIN", "consume", {"appointment_id": "A1", "quantity": 2}),
]


@pytest.mark.parametrize(("kind_name", "entity", "name", "payload"), OWNER_COMMANDS)
def test_owner_effect_keys_are_deterministic_and_differ_between_commands(
    kind_name: str, entity: str, name: str, payload: dict[str, Any]
) -> None:
    kind = KINDS[kind_name]
    typed = msgspec.convert(payload, kind.commands[name])
    start = kind.initial(entity)

    def decide(id: str) -> Accepted:
        decision = kind.decide(start, cmd(name, typed, id=id, entity=entity))
        assert isinstance(decision, Accepted), decision
        return decision

    first, again, other = decide("one"), decide("one"), decide("two")
    assert again == first
    keys_one = [e.key for e in first.effects]
    assert len(set(keys_one)) == len(keys_one) >= 1
    assert all("/one:" in k for k in keys_one)
    assert not set(keys_one) & {e.key for e in other.effects}
    assert [(e.target, e.name, e.payload) for e in first.effects] == [
        (e.target, e.name, e.payload) for e in other.effects
    ]


# -- the shortcuts of appointment._effects ---------------------------------------------------
PROCEDURE_CHARGE = PostCharges(lines=(ChargeLine(line_id="L3", code="27447", amount="9"),))
"""One more line under the booked procedure's own code: its procedure view changes."""
STEPS: list[tuple[str, Any]] = [
    *((name, PAYLOADS[name]) for name in appointment.KIND.commands),
    *RESCHEDULES,
    ("reschedule", RescheduleAppointment(start=datetime(2027, 3, 10, 23, 30, tzinfo=UTC))),
    ("reschedule", RescheduleAppointment(facility_id="MAIN", room="OR-2")),
    ("modify", ModifyAppointment(providers_added=("DR-ORTHO",))),
    ("post_charges", PROCEDURE_CHARGE),
    ("modify", ModifyAppointment(procedures_removed=("27447",))),
    ("modify", ModifyAppointment(procedures=(ProcedureRef(code="27447", provider_id="DR-X"),))),
]


def full_effects(
    before: appointment.AppointmentState, after: appointment.AppointmentState, c: Command[Any]
) -> tuple[Effect, ...]:
    """appointment._effects without its shortcuts: every view built and compared (the oracle)."""
    a = appointment
    effects: list[Effect] = []
    old, new = before.plan, after.plan
    for facility in [f for f in dict.fromkeys((old.facility_id, new.facility_id)) if f]:
        mine = new if facility == new.facility_id else a.Plan(facility_id=facility)
        prev = old if facility == old.facility_id else a.Plan(facility_id=facility)
        if (mine.reservations, mine.consumed) != (prev.reservations, prev.consumed):
            plan = {"reservations": mine.reservations, "consumed": mine.consumed}
            payload = {"facility_id": facility, "appointment_id": after.id, **plan}
            effects.append(
                Effect(
                    target=ActorRef("supply", after.id),
                    name="plan",
                    key=f"{c.key}:supply:{facility}",
                    payload=payload,
                )
            )
        if a._demand(mine) != a._demand(prev):
            lines = {"facility_id": facility, "appointment_id": after.id, "lines": a._demand(mine)}
            effects.append(
                Effect(
                    target=ActorRef("erp", after.id),
                    name="demand",
                    key=f"{c.key}:erp:{facility}",
                    payload=lines,
                )
            )
    if a._billing_view(before) != a._billing_view(after):
        billing = a._billing_view(after)
        effects.append(
            Effect(
                target=ActorRef("billing", after.id),
                name="update",
                key=f"{c.key}:billing",
                payload=billing,
            )
        )
    if after.details is not None and after.details.visit_number and before.details is None:
        effects.append(
            Effect(
                target=ActorRef("visit", after.details.visit_number),
                name="link",
                key=f"{c.key}:visit",
                payload={"appointment_id": after.id},
            )
        )
    old_views = a._procedure_views(before, c.refdata)
    new_views = a._procedure_views(after, c.refdata)
    for code in sorted(set(old_views) | set(new_views)):
        view = new_views.get(code) or {**old_views[code], "status": "removed"}
        if view != old_views.get(code):
            effects.append(
                Effect(
                    target=ActorRef("procedure", f"{after.id}#{code}"),
                    name="update",
                    key=f"{c.key}:procedure:{code}",
                    payload=view,
                )
            )
    return tuple(effects)


BOOK_AT = STEPS.index(("book", BOOK))
CHARGES_AT = STEPS.index(("post_charges", CHARGES))
PROCEDURE_CHARGE_AT = STEPS.index(("post_charges", PROCEDURE_CHARGE))
BY_PROVIDER_AT = len(STEPS) - 1
MOVE_AT = STEPS.index(("reschedule", PAYLOADS["reschedule"]))
NO_CARD_AT = len(STEPS)
"""Not in STEPS: a booking with no preference card."""
NO_CARD = BookAppointment(
    procedures=(ProcedureRef(code="99999"),),
    facility_id="MAIN",
    start=datetime(2027, 3, 10, 9, 0, tzinfo=UTC),
    payer_id="ACME",
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(range(len(STEPS))), min_size=1, max_size=12))
@example([BOOK_AT, CHARGES_AT, PROCEDURE_CHARGE_AT])  # then only the charges change
@example([BOOK_AT, BY_PROVIDER_AT, MOVE_AT])  # a card of the provider's, then moved in time
@example([NO_CARD_AT, MOVE_AT])  # nothing reserved (no card), then moved to another day
def test_effects_are_those_of_comparing_every_view(steps: list[int]) -> None:
    """_effects skips the procedure views when what they are made of is equal, and compares
    demand by reservations and date: it must send exactly what comparing every view sends."""
    state = appointment.initial("A1")
    for n, i in enumerate(steps):
        name, payload = STEPS[i] if i < len(STEPS) else ("book", NO_CARD)
        command = cmd(name, payload, id=f"s{n}", at=T0 + timedelta(minutes=n))
        decision = appointment.KIND.decide(state, command)
        if not isinstance(decision, Accepted):
            continue
        after = appointment.KIND.apply(state, decision.events)
        assert decision.effects == full_effects(state, after, command)
        state = after


# -- rejections -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("history", "name", "status"),
    [
        ([], "reschedule", "new"),
        ([], "modify", "new"),
        ([], "cancel", "new"),
        ([], "no_show", "new"),
        ([], "post_charges", "new"),
        (["book"], "book", "booked"),
        (["book", "post_charges"], "book", "completed"),
        (["book", "post_charges"], "reschedule", "completed"),
        (["book", "post_charges"], "cancel", "completed"),
        (["book", "cancel"], "reschedule", "cancelled"),
        (["book", "cancel"], "modify", "cancelled"),
        (["book", "cancel"], "cancel", "cancelled"),
        (["book", "cancel"], "post_charges", "cancelled"),
        (["book", "no_show"], "no_show", "no_show"),
        (["book", "delete"], "book", "deleted"),
        (["book", "delete"], "delete", "deleted"),
        (["book", "delete"], "post_charges", "deleted"),
    ],
)
def test_invalid_transitions_are_rejected_naming_the_appointment_and_its_status(
    history: list[str], name: str, status: str
) -> None:
    state = appointment.initial("APPT-42")
    for i, step in enumerate(history):
        state, _ = accept(
            appointment.KIND, state, cmd(step, PAYLOADS[step], id=f"h{i}", entity="APPT-42")
        )
    assert state.status == status

    decision = appointment.KIND.decide(state, cmd(name, PAYLOADS[name], entity="APPT-42"))

    assert isinstance(decision, Rejected)
    assert decision.code == "rejected"
    assert "APPT-42" in decision.reason
    assert status in decision.reason


def test_a_booking_without_procedures_is_rejected() -> None:
    empty = msgspec.structs.replace(BOOK, procedures=())
    decision = appointment.KIND.decide(appointment.initial("A7"), cmd("book", empty, entity="A7"))
    assert isinstance(decision, Rejected)
    assert "A7" in decision.reason
    assert "no procedures" in decision.reason


@pytest.mark.parametrize("kind_name", sorted(KINDS))
def test_every_kind_rejects_a_payload_it_does_not_handle(kind_name: str) -> None:
    class Stray(msgspec.Struct, frozen=True):
        pass

    kind = KINDS[kind_name]
    decision = kind.decide(kind.initial("X@Y"), cmd("stray", Stray(), entity="X@Y"))
    assert isinstance(decision, Rejected)
    assert "Stray" in decision.reason


# -- replay ---------------------------------------------------------------------------------
def test_replaying_the_events_rebuilds_the_state_applied_step_by_step() -> None:
    steps: list[tuple[str, Any]] = [
        ("book", BOOK),
        ("reschedule", RescheduleAppointment(start=datetime(2027, 3, 12, 9, 0, tzinfo=UTC))),
        ("reschedule", RescheduleAppointment(facility_id="NORTH", room="OR-2")),
        ("modify", ModifyAppointment(providers=("DR-WHO",))),
        ("coverage", Coverage(payer_id="STRICT", patient_class="I")),
        ("cancel", CloseAppointment(reason="moved away")),
        ("book", msgspec.structs.replace(BOOK, procedures=(ProcedureRef(code="66984"),))),
        ("reschedule", RescheduleAppointment(start=datetime(2027, 6, 2, 9, 0, tzinfo=UTC))),
        ("post_charges", CHARGES),
        (
            "post_charges",
            PostCharges(lines=(ChargeLine(line_id="L2", code="C-LENS", amount="300.00"),)),
        ),
    ]
    state = appointment.initial("A1")
    events: list[Any] = []
    for i, (name, payload) in enumerate(steps):
        at = T0 + timedelta(minutes=i)
        state, decision = accept(appointment.KIND, state, cmd(name, payload, id=f"s{i}", at=at))
        events.extend(decision.events)

    rebuilt = appointment.KIND.apply(appointment.initial("A1"), events)

    assert rebuilt == state
    assert (state.status, state.version) == ("completed", len(steps))
    assert state.details is not None
    assert [p.code for p in state.details.procedures] == ["66984"]
    assert state.plan.date == "2027-06-02"
    assert [c.line_id for c in state.charges] == ["L1", "L2"]
    assert [(c.item_id, c.quantity) for c in state.plan.consumed] == [("lens", 1)]
    assert state.plan.reservations == ()


def test_replaying_the_fan_out_rebuilds_every_actor_it_reached() -> None:
    """Every actor's state is a fold of its events; the harness network agrees with it."""
    sources: list[tuple[str, str, str, dict[str, Any]]] = [
        (
            "item",
            "gauze@MAIN",
            "set_stock",
            {"on_hand": 6, "reorder_point": 3, "reorder_quantity": 20},
        ),
        ("visit", "V1", "register", {"payer_id": "STRICT", "patient_class": "O"}),
        (
            "appointment",
            "A1",
            "book",
            {**msgspec.to_builtins(BOOK), "payer_id": "", "visit_number": "V1"},
        ),
        ("appointment", "A2", "book", msgspec.to_builtins(BOOK)),
        ("appointment", "A2", "reschedule", {"facility_id": "NORTH"}),
        ("appointment", "A1", "reschedule", {"start": "2027-03-11T09:00:00+00:00"}),
        (
            "appointment",
            "A1",
            "post_charges",
            {"lines": [{"line_id": "L1", "code": "C-GAUZE", "quantity": 3, "amount": "7.50"}]},
        ),
        ("appointment", "A2", "cancel", {"reason": "ill"}),
    ]
    recorder, network = Recorder(), Network()
    for n, (kind_name, entity, name, payload) in enumerate(sources):
        typed = msgspec.convert(payload, KINDS[kind_name].commands[name])
        recorder.send(kind_name, entity, name, typed, id=f"s{n}")
        network.send(kind_name, entity, name, payload, id=f"s{n}", at=T0)

    assert set(recorder.events) >= {
        ("appointment", "A1"),
        ("billing", "A1"),
        ("supply", "A1"),
        ("supply", "A2"),
        ("erp", "A1"),
        ("erp", "A2"),
        ("purchasing", "MAIN"),
        ("item", "gauze@MAIN"),
        ("item", "knee-kit@NORTH"),
        ("visit", "V1"),
    }
    for (kind_name, entity), kind_events in recorder.events.items():
        kind = KINDS[kind_name]
        assert kind.apply(kind.initial(entity), kind_events) == recorder.states[(kind_name, entity)]
    assert recorder.states == network.states
    # The walk got somewhere: coverage from the visit, a purchase order, a posting.
    assert recorder.states[("appointment", "A1")].plan.readiness == "pending_authorization"
    assert recorder.states[("purchasing", "MAIN")].orders == 1
    assert [e.payload["po_id"] for e in network.sent("erp", "purchase_order")] == [
        "PO:gauze@MAIN:1"
    ]
    assert recorder.states[("erp", "A1")].postings == 1
    assert recorder.states[("erp", "A2")].postings == 0
    # A2 moved to NORTH then was cancelled: its conversations hold nothing at either facility.
    assert (
        recorder.states[("supply", "A2")].reservations,
        recorder.states[("erp", "A2")].demand,
    ) == (
        {},
        {},
    )
    assert [(e.target, e.name) for e in network.sent("erp") if e.name != "demand"] == [
        (Downstream("erp", "MAIN"), "purchase_order"),
        (Downstream("erp", "A1"), "posting"),
    ]


# -- registry -------------------------------------------------------------------------------
def test_registry_rejects_duplicate_kind_names() -> None:
    clone = EntityKind(
        name="billing",
        state_type=billing.BillingState,
        commands={"update": billing.Update},
        initial=billing.initial,
        decide=billing.decide,
        evolve=billing.evolve,
    )
    with pytest.raises(ValueError, match="'billing' registered twice"):
        Registry.of(appointment.KIND, billing.KIND, clone)


def test_default_registry_hosts_the_kinds() -> None:
    registry = default_registry()
    assert set(registry.kinds) == {
        "appointment",
        "procedure",
        "billing",
        "supply",
        "erp",
        "purchasing",
        "item",
        "visit",
    }
    assert "supply" in registry
    assert registry.get("nosuch") is None


def test_sync_books_then_updates_and_ignores_a_repeat() -> None:
    """``appointment.sync`` is the upsert of sources that send the whole appointment (FHIR)."""
    state, _ = accept(appointment.KIND, appointment.initial("A1"), cmd("sync", BOOK, id="s1"))
    assert state.status == "booked"
    assert state.details == BOOK
    moved = msgspec.structs.replace(BOOK, start=datetime(2027, 3, 12, 9, 0, tzinfo=UTC))
    later = T0 + timedelta(hours=1)
    after, decision = accept(appointment.KIND, state, cmd("sync", moved, id="s2", at=later))
    assert after.status == "booked"
    assert after.details == moved
    assert after.local_date == "2027-03-12"
    assert decision.effects
    repeat = appointment.KIND.decide(after, cmd("sync", moved, id="s3", at=later))
    assert repeat == Accepted()


def test_modify_applies_added_and_removed_procedures_and_providers() -> None:
    book = msgspec.structs.replace(
        BOOK,
        procedures=(ProcedureRef(code="27447"), ProcedureRef(code="66984")),
        providers=("DR-A", "DR-B"),
    )
    change = ModifyAppointment(
        procedures_added=(ProcedureRef(code="27447", provider_id="DR-C"), ProcedureRef(code="X1")),
        procedures_removed=("66984",),
        providers_added=("DR-C", "DR-A"),
        providers_removed=("DR-B",),
        room="OR-2",
    )
    after, _ = accept(appointment.KIND, booked(book=book), cmd("modify", change, id="m1"))
    assert after.details is not None
    assert after.details.procedures == (
        ProcedureRef(code="27447", provider_id="DR-C"),
        ProcedureRef(code="X1"),
    )
    assert after.details.providers == ("DR-A", "DR-C")
    assert after.details.room == "OR-2"
