"""The pure entity kinds (appointment, billing, supply, erp): decide, evolve and fan-out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

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
from caresync.actors.appointment import Book, Cancel, Complete, Reschedule

T0 = datetime(2027, 1, 1, 8, 0, tzinfo=UTC)
KINDS = {k.name: k for k in (appointment.KIND, billing.KIND, supply.KIND, erp.KIND)}
BOOK = Book(procedure="knee", facility="F1", date="2027-03-01", items=("gauze", "suture"))


def cmd(name: str, payload: Any, *, id: str = "c1", entity: str = "A1") -> Command[Any]:
    return Command(id=id, name=name, entity=entity, occurred_at=T0, payload=payload)


def accept(kind: EntityKind[Any, Any], state: Any, command: Command[Any]) -> tuple[Any, Accepted]:
    """Decide, require acceptance, and return the state after the events with the decision."""
    decision = kind.decide(state, command)
    assert isinstance(decision, Accepted), decision
    return kind.apply(state, decision.events), decision


def booked(entity: str = "A1", book: Book = BOOK) -> appointment.AppointmentState:
    state, _ = accept(appointment.KIND, appointment.initial(entity), cmd("book", book, id="b0"))
    return state


def booked_effects() -> tuple[Effect, ...]:
    _, decision = accept(appointment.KIND, appointment.initial("A1"), cmd("book", BOOK, id="b0"))
    return decision.effects


def as_command(effect: Effect) -> tuple[EntityKind[Any, Any], Command[Any]]:
    """The command an actor effect becomes at its target, as the runtime would deliver it."""
    assert isinstance(effect.target, ActorRef)
    kind = KINDS[effect.target.kind]
    payload = msgspec.convert(effect.payload, kind.commands[effect.name])
    return kind, cmd(effect.name, payload, id=effect.key, entity=effect.target.entity)


def deliver_all(states: dict[tuple[str, str], Any], effects: tuple[Effect, ...]) -> None:
    """Apply every actor effect to its target's state in ``states`` (created on demand)."""
    for effect in effects:
        if not isinstance(effect.target, ActorRef):
            continue
        kind, command = as_command(effect)
        key = (kind.name, command.entity)
        states[key], _ = accept(kind, states.get(key) or kind.initial(command.entity), command)


# -- appointment: accepted commands -------------------------------------------------------------
def test_book_records_the_booking_and_fans_out_to_billing_supply_and_erp() -> None:
    state, decision = accept(appointment.KIND, appointment.initial("A1"), cmd("book", BOOK))

    assert decision.events == (
        appointment.Booked(
            procedure="knee", facility="F1", date="2027-03-01", items=("gauze", "suture")
        ),
    )
    assert state == appointment.AppointmentState(
        id="A1",
        status="booked",
        procedure="knee",
        facility="F1",
        date="2027-03-01",
        items=("gauze", "suture"),
        version=1,
    )
    note = {"appointment": "A1", "change": "booked", "procedure": "knee"}
    assert decision.effects == (
        Effect(target=ActorRef("billing", "A1"), name="track", key="c1:billing", payload=note),
        Effect(
            target=ActorRef("supply", "F1:gauze"),
            name="reserve",
            key="c1:supply:F1:gauze:reserve",
            payload={"appointment": "A1", "quantity": 1},
        ),
        Effect(
            target=ActorRef("supply", "F1:suture"),
            name="reserve",
            key="c1:supply:F1:suture:reserve",
            payload={"appointment": "A1", "quantity": 1},
        ),
        Effect(
            target=ActorRef("erp", "F1"),
            name="record",
            key="c1:erp:F1",
            payload={**note, "date": "2027-03-01"},
        ),
    )


@pytest.mark.parametrize(
    ("name", "payload", "change", "supply_op", "status", "date"),
    [
        (
            "reschedule",
            Reschedule(date="2027-04-02"),
            "rescheduled",
            "hold",
            "booked",
            "2027-04-02",
        ),
        (
            "reschedule",
            Reschedule(date="2027-04-02", facility="F1"),
            "rescheduled",
            "hold",
            "booked",
            "2027-04-02",
        ),
        ("cancel", Cancel(reason="patient ill"), "cancelled", "release", "cancelled", "2027-03-01"),
        ("complete", Complete(), "completed", "consume", "completed", "2027-03-01"),
    ],
)
def test_commands_on_a_booked_appointment_fan_out_one_message_per_target(
    name: str, payload: Any, change: str, supply_op: str, status: str, date: str
) -> None:
    state, decision = accept(appointment.KIND, booked(), cmd(name, payload, id="x7"))

    assert (state.status, state.date, state.facility, state.version) == (status, date, "F1", 2)
    assert len(decision.events) == 1
    targets = [(e.target, e.name, e.key) for e in decision.effects]
    assert targets == [
        (ActorRef("billing", "A1"), "track", "x7:billing"),
        (ActorRef("supply", "F1:gauze"), supply_op, f"x7:supply:F1:gauze:{supply_op}"),
        (ActorRef("supply", "F1:suture"), supply_op, f"x7:supply:F1:suture:{supply_op}"),
        (ActorRef("erp", "F1"), "record", "x7:erp:F1"),
    ]
    assert decision.effects[0].payload == {
        "appointment": "A1",
        "change": change,
        "procedure": "knee",
    }
    assert decision.effects[-1].payload["date"] == date


def test_reschedule_to_another_facility_releases_at_the_old_and_reserves_at_the_new() -> None:
    state, decision = accept(
        appointment.KIND, booked(), cmd("reschedule", Reschedule(date="2027-05-05", facility="F2"))
    )

    assert (state.facility, state.date, state.status) == ("F2", "2027-05-05", "booked")
    assert decision.events == (appointment.Rescheduled(date="2027-05-05", facility="F2"),)
    supply_effects = [
        (e.target, e.name) for e in decision.effects if getattr(e.target, "kind", "") == "supply"
    ]
    assert supply_effects == [
        (ActorRef("supply", "F1:gauze"), "release"),
        (ActorRef("supply", "F2:gauze"), "reserve"),
        (ActorRef("supply", "F1:suture"), "release"),
        (ActorRef("supply", "F2:suture"), "reserve"),
    ]
    keys = [e.key for e in decision.effects]
    assert len(set(keys)) == len(keys)

    # Delivered to the supply actors, the reservation moves from F1 to F2.
    states: dict[tuple[str, str], Any] = {}
    deliver_all(states, booked_effects())
    deliver_all(states, decision.effects)
    for item in ("gauze", "suture"):
        assert states[("supply", f"F1:{item}")].reservations == {}
        assert states[("supply", f"F2:{item}")].reservations == {"A1": 1}


def test_reschedule_to_another_facility_moves_the_erp_case_to_the_new_facility() -> None:
    states: dict[tuple[str, str], Any] = {}
    deliver_all(states, booked_effects())
    _, decision = accept(
        appointment.KIND, booked(), cmd("reschedule", Reschedule(date="2027-05-05", facility="F2"))
    )
    deliver_all(states, decision.effects)

    assert states[("erp", "F2")].open_cases == {"A1": "2027-05-05"}
    assert "A1" not in states[("erp", "F1")].open_cases


def test_rebooking_a_cancelled_appointment_is_accepted() -> None:
    state, _ = accept(appointment.KIND, booked(), cmd("cancel", Cancel(), id="c"))
    state, decision = accept(
        appointment.KIND,
        state,
        cmd("book", Book(procedure="hip", facility="F3", date="2027-07-07")),
    )
    assert (state.status, state.procedure, state.facility, state.items) == (
        "booked",
        "hip",
        "F3",
        (),
    )
    assert state.version == 3
    # no items: billing and erp only
    assert [e.target for e in decision.effects] == [
        ActorRef("billing", "A1"),
        ActorRef("erp", "F3"),
    ]


# -- appointment: idempotency keys --------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("book", BOOK),
        ("reschedule", Reschedule(date="2027-04-02", facility="F9")),
        ("cancel", Cancel()),
        ("complete", Complete()),
    ],
)
def test_effect_keys_are_deterministic_and_differ_between_commands(name: str, payload: Any) -> None:
    start = appointment.initial("A1") if name == "book" else booked()

    first = appointment.KIND.decide(start, cmd(name, payload, id="one"))
    again = appointment.KIND.decide(start, cmd(name, payload, id="one"))
    other = appointment.KIND.decide(start, cmd(name, payload, id="two"))
    assert isinstance(first, Accepted)
    assert isinstance(other, Accepted)

    assert again == first
    keys_one = [e.key for e in first.effects]
    keys_two = [e.key for e in other.effects]
    assert len(set(keys_one)) == len(keys_one) >= 2
    assert not set(keys_one) & set(keys_two)
    assert all(k.startswith("one:") for k in keys_one)
    # same targets and payloads: only the keys tell the two commands apart
    assert [(e.target, e.name, e.payload) for e in first.effects] == [
        (e.target, e.name, e.payload) for e in other.effects
    ]


# -- appointment: rejections --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("history", "name", "payload", "status"),
    [
        ([], "reschedule", Reschedule(date="2027-04-02"), "new"),
        ([], "cancel", Cancel(), "new"),
        ([], "complete", Complete(), "new"),
        (["book"], "book", BOOK, "booked"),
        (["book", "complete"], "complete", Complete(), "completed"),
        (["book", "complete"], "book", BOOK, "completed"),
        (["book", "complete"], "cancel", Cancel(), "completed"),
        (["book", "cancel"], "reschedule", Reschedule(date="2027-04-02"), "cancelled"),
        (["book", "cancel"], "cancel", Cancel(), "cancelled"),
    ],
)
def test_invalid_transitions_are_rejected_naming_the_appointment_and_its_status(
    history: list[str], name: str, payload: Any, status: str
) -> None:
    payloads = {"book": BOOK, "complete": Complete(), "cancel": Cancel()}
    state = appointment.initial("APPT-42")
    for i, step in enumerate(history):
        state, _ = accept(appointment.KIND, state, cmd(step, payloads[step], id=f"h{i}"))

    decision = appointment.KIND.decide(state, cmd(name, payload, entity="APPT-42"))

    assert isinstance(decision, Rejected)
    assert decision.code == "rejected"
    assert "APPT-42" in decision.reason
    assert status in decision.reason


# -- appointment: replay ------------------------------------------------------------------------
def test_replaying_the_events_rebuilds_the_state_applied_step_by_step() -> None:
    steps: list[tuple[str, Any]] = [
        ("book", BOOK),
        ("reschedule", Reschedule(date="2027-03-05")),
        ("reschedule", Reschedule(date="2027-03-09", facility="F2")),
        ("cancel", Cancel(reason="moved away")),
        ("book", Book(procedure="hip", facility="F3", date="2027-06-01", items=("pin",))),
        ("reschedule", Reschedule(date="2027-06-02")),
        ("complete", Complete()),
    ]
    state = appointment.initial("A1")
    events: list[Any] = []
    for i, (name, payload) in enumerate(steps):
        state, decision = accept(appointment.KIND, state, cmd(name, payload, id=f"s{i}"))
        events.extend(decision.events)

    rebuilt = appointment.KIND.apply(appointment.initial("A1"), events)

    assert rebuilt == state
    assert state == appointment.AppointmentState(
        id="A1",
        status="completed",
        procedure="hip",
        facility="F3",
        date="2027-06-02",
        items=("pin",),
        version=len(steps),
    )


def test_replaying_the_fan_out_rebuilds_billing_supply_and_erp() -> None:
    """Every downstream actor's state is a fold of its events, whatever the interleaving."""
    steps: list[tuple[str, Any]] = [
        ("book", BOOK),
        ("reschedule", Reschedule(date="2027-03-05")),
        ("complete", Complete()),
    ]
    state = appointment.initial("A1")
    live: dict[tuple[str, str], Any] = {}
    events: dict[tuple[str, str], list[Any]] = {}
    for i, (name, payload) in enumerate(steps):
        state, decision = accept(appointment.KIND, state, cmd(name, payload, id=f"s{i}"))
        for effect in decision.effects:
            kind, command = as_command(effect)
            key = (kind.name, command.entity)
            live[key], accepted = accept(
                kind, live.get(key) or kind.initial(command.entity), command
            )
            events.setdefault(key, []).extend(accepted.events)

    for (kind_name, entity), kind_events in events.items():
        kind = KINDS[kind_name]
        assert kind.apply(kind.initial(entity), kind_events) == live[(kind_name, entity)]
    assert live[("billing", "A1")] == billing.BillingState(
        id="A1", changes=3, billable=1, last_change="completed"
    )
    assert live[("supply", "F1:gauze")] == supply.SupplyState(
        id="F1:gauze", reservations={}, consumed=1, changes=3
    )
    assert live[("erp", "F1")] == erp.ErpState(id="F1", changes=3, open_cases={})


# -- billing ------------------------------------------------------------------------------------
def track(change: str, *, id: str = "t1") -> Command[Any]:
    return cmd("track", billing.Track(appointment="A1", change=change, procedure="knee"), id=id)


def test_billing_tracks_changes_without_effects_until_completion() -> None:
    state, decision = accept(billing.KIND, billing.initial("A1"), track("booked"))
    assert decision.events == (billing.Tracked(change="booked", procedure="knee"),)
    assert decision.effects == ()
    assert state == billing.BillingState(id="A1", changes=1, billable=0, last_change="booked")


def test_billing_sends_one_charge_on_completion_keyed_by_the_command() -> None:
    state, _ = accept(billing.KIND, billing.initial("A1"), track("booked", id="t1"))
    state, decision = accept(billing.KIND, state, track("completed", id="A1-4:billing"))

    assert decision.effects == (
        Effect(
            target=Downstream("billing", "A1"),
            name="charge",
            key="A1-4:billing:charge",
            payload={"appointment": "A1", "procedure": "knee"},
        ),
    )
    assert (state.changes, state.billable, state.last_change) == (2, 1, "completed")
    again = billing.KIND.decide(billing.initial("A1"), track("completed", id="A1-4:billing"))
    other = billing.KIND.decide(billing.initial("A1"), track("completed", id="A2-4:billing"))
    assert isinstance(again, Accepted)
    assert isinstance(other, Accepted)
    assert again.effects[0].key == "A1-4:billing:charge"
    assert other.effects[0].key != again.effects[0].key


def test_billing_cancellation_takes_back_a_billable_but_never_below_zero() -> None:
    state = billing.initial("A1")
    for i, change in enumerate(["booked", "cancelled", "completed", "cancelled", "cancelled"]):
        state, _ = accept(billing.KIND, state, track(change, id=f"t{i}"))
    assert (state.changes, state.billable, state.last_change) == (5, 0, "cancelled")


def test_billing_rejects_a_payload_it_does_not_handle() -> None:
    decision = billing.KIND.decide(
        billing.initial("A1"), cmd("track", supply.Adjust(appointment="A1"))
    )
    assert isinstance(decision, Rejected)
    assert "Adjust" in decision.reason


# -- supply -------------------------------------------------------------------------------------
def adjust(op: str, appt: str = "A1", quantity: int = 1, *, id: str = "s1") -> Command[Any]:
    return cmd(op, supply.Adjust(appointment=appt, quantity=quantity), id=id, entity="F1:gauze")


def test_supply_reserve_hold_release_and_consume() -> None:
    s0 = supply.initial("F1:gauze")
    s1, d1 = accept(supply.KIND, s0, adjust("reserve", "A1", 2))
    s2, d2 = accept(supply.KIND, s1, adjust("reserve", "A2", 1))
    s3, d3 = accept(supply.KIND, s2, adjust("hold", "A1"))
    s4, d4 = accept(supply.KIND, s3, adjust("consume", "A1", 2))
    s5, d5 = accept(supply.KIND, s4, adjust("release", "A2"))

    assert [type(d.events[0]) for d in (d1, d2, d3, d4, d5)] == [
        supply.Reserved,
        supply.Reserved,
        supply.Held,
        supply.Consumed,
        supply.Released,
    ]
    assert all(d.effects == () for d in (d1, d2, d3, d4, d5))
    assert (s2.reservations, s2.reserved) == ({"A1": 2, "A2": 1}, 3)
    assert s3.reservations == s2.reservations
    assert (s4.reservations, s4.consumed) == ({"A2": 1}, 2)
    assert (s5.reservations, s5.reserved, s5.consumed, s5.changes) == ({}, 0, 2, 5)


def test_supply_release_of_an_appointment_that_never_reserved_changes_no_reservation() -> None:
    state, _ = accept(supply.KIND, supply.initial("F1:gauze"), adjust("reserve", "A1", 3))
    after, decision = accept(supply.KIND, state, adjust("release", "NEVER", id="s2"))
    assert decision.events == (supply.Released(appointment="NEVER"),)
    assert after.reservations == {"A1": 3}
    assert after.consumed == 0
    # a repeated release of a real reservation is harmless too
    once, _ = accept(supply.KIND, after, adjust("release", "A1", id="s3"))
    twice, _ = accept(supply.KIND, once, adjust("release", "A1", id="s4"))
    assert once.reservations == twice.reservations == {}


def test_supply_rejects_a_negative_quantity() -> None:
    decision = supply.KIND.decide(supply.initial("F1:gauze"), adjust("reserve", quantity=-2))
    assert isinstance(decision, Rejected)
    assert "-2" in decision.reason


# -- erp ----------------------------------------------------------------------------------------
def record(appt: str, change: str, date: str = "", *, id: str) -> Command[Any]:
    return cmd("record", erp.Record(appointment=appt, change=change, date=date), id=id, entity="F1")


def test_erp_opens_moves_and_closes_cases() -> None:
    state = erp.initial("F1")
    state, d = accept(erp.KIND, state, record("A1", "booked", "2027-03-01", id="e1"))
    assert d.events == (erp.Recorded(appointment="A1", change="booked", date="2027-03-01"),)
    assert d.effects == ()
    assert state.open_cases == {"A1": "2027-03-01"}
    state, _ = accept(erp.KIND, state, record("A2", "booked", "2027-03-02", id="e2"))
    state, _ = accept(erp.KIND, state, record("A1", "rescheduled", "2027-04-01", id="e3"))
    assert state.open_cases == {"A1": "2027-04-01", "A2": "2027-03-02"}
    state, _ = accept(erp.KIND, state, record("A1", "completed", "2027-04-01", id="e4"))
    state, _ = accept(erp.KIND, state, record("A2", "cancelled", "2027-03-02", id="e5"))
    state, _ = accept(erp.KIND, state, record("GHOST", "cancelled", id="e6"))
    assert state.open_cases == {}
    assert state.changes == 6


# -- registry -----------------------------------------------------------------------------------
def test_registry_rejects_duplicate_kind_names() -> None:
    clone = EntityKind(
        name="billing",
        state_type=billing.BillingState,
        commands={"track": billing.Track},
        initial=billing.initial,
        decide=billing.decide,
        evolve=billing.evolve,
    )
    with pytest.raises(ValueError, match="'billing' registered twice"):
        Registry.of(appointment.KIND, billing.KIND, clone)


def test_default_registry_hosts_the_kinds() -> None:
    registry = default_registry()
    assert set(registry.kinds) == {"appointment", "billing", "supply", "erp", "item"}
    assert "supply" in registry
    assert registry.get("nosuch") is None


def test_an_item_listed_twice_is_one_reservation_of_quantity_two() -> None:
    book = Book(procedure="knee", facility="F1", date="2027-03-01", items=("gauze", "gauze"))
    _, decision = accept(appointment.KIND, appointment.initial("A1"), cmd("book", book))
    supply_effects = [e for e in decision.effects if e.target == ActorRef("supply", "F1:gauze")]
    assert len(supply_effects) == 1
    assert supply_effects[0].payload["quantity"] == 2
    kind, command = as_command(supply_effects[0])
    state, _ = accept(kind, kind.initial("F1:gauze"), command)
    assert state.reserved == 2
