"""Appointment actor: one scheduled procedure case, keyed by appointment id.

Accepted commands fan out to the billing actor of the appointment, the supply actor of each
item at the facility, and the ERP actor of the facility.  This first version carries the items
in the booking (as if enriched upstream); preference-card enrichment comes with the workflow.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import msgspec

from caresync.actors.contract import (
    Accepted,
    ActorRef,
    Command,
    Effect,
    EntityKind,
    Rejected,
    effect_key,
)

Status = Literal["new", "booked", "cancelled", "completed"]


# -- commands -------------------------------------------------------------------------------
class Book(msgspec.Struct, kw_only=True, frozen=True):
    """Book the appointment for a procedure at a facility on a date."""

    procedure: str
    facility: str
    date: str
    items: tuple[str, ...] = ()


class Reschedule(msgspec.Struct, kw_only=True, frozen=True):
    """Move the appointment to another date and, optionally, another facility."""

    date: str
    facility: str = ""


class Cancel(msgspec.Struct, kw_only=True, frozen=True):
    """Cancel the appointment."""

    reason: str = ""


class Complete(msgspec.Struct, kw_only=True, frozen=True):
    """The procedure was performed."""


# -- events ---------------------------------------------------------------------------------
class Booked(msgspec.Struct, kw_only=True, frozen=True, tag="booked"):
    procedure: str
    facility: str
    date: str
    items: tuple[str, ...]


class Rescheduled(msgspec.Struct, kw_only=True, frozen=True, tag="rescheduled"):
    date: str
    facility: str


class Cancelled(msgspec.Struct, kw_only=True, frozen=True, tag="cancelled"):
    reason: str


class Completed(msgspec.Struct, kw_only=True, frozen=True, tag="completed"):
    pass


Event = Booked | Rescheduled | Cancelled | Completed


# -- state ----------------------------------------------------------------------------------
class AppointmentState(msgspec.Struct, kw_only=True, frozen=True):
    """What the router knows of one appointment."""

    id: str
    status: Status = "new"
    procedure: str = ""
    facility: str = ""
    date: str = ""
    items: tuple[str, ...] = ()
    version: int = 0


def initial(entity: str) -> AppointmentState:
    """The state of an appointment nobody has booked yet."""
    return AppointmentState(id=entity)


def decide(state: AppointmentState, command: Command[Any]) -> Accepted[Event] | Rejected:
    """Accept or reject one command against the appointment's state."""
    p = command.payload
    if isinstance(p, Book):
        if state.status == "booked":
            return Rejected(f"appointment {state.id} is already booked")
        if state.status == "completed":
            return Rejected(f"appointment {state.id} is completed and cannot be booked again")
        event: Event = Booked(
            procedure=p.procedure, facility=p.facility, date=p.date, items=p.items
        )
    elif isinstance(p, Reschedule):
        if state.status != "booked":
            return Rejected(
                f"appointment {state.id} is {state.status}, not booked: cannot reschedule"
            )
        event = Rescheduled(date=p.date, facility=p.facility or state.facility)
    elif isinstance(p, Cancel):
        if state.status != "booked":
            return Rejected(f"appointment {state.id} is {state.status}, not booked: cannot cancel")
        event = Cancelled(reason=p.reason)
    elif isinstance(p, Complete):
        if state.status != "booked":
            return Rejected(
                f"appointment {state.id} is {state.status}, not booked: cannot complete"
            )
        event = Completed()
    else:  # the runtime only passes registered payload types
        return Rejected(f"appointment does not handle {type(p).__name__}")
    return Accepted(events=(event,), effects=_fan_out(state, command, event))


def _fan_out(state: AppointmentState, command: Command[Any], event: Event) -> tuple[Effect, ...]:
    after = evolve(state, event)
    change = type(event).__name__.lower()
    note = {"appointment": state.id, "change": change, "procedure": after.procedure}
    effects = [
        Effect(
            target=ActorRef("billing", state.id),
            name="track",
            key=effect_key(command.id, "billing"),
            payload=note,
        ),
    ]
    # A move to another facility releases the old facility's reservation and reserves anew.
    moves = isinstance(event, Rescheduled) and event.facility != state.facility
    # An item listed twice is one reservation of quantity two (one effect key per item).
    for item, quantity in Counter(after.items).items():
        if moves:
            effects.append(_supply(command, state.facility, item, "release", state.id, quantity))
            effects.append(_supply(command, after.facility, item, "reserve", state.id, quantity))
        else:
            op = _SUPPLY_OP[change]
            effects.append(_supply(command, after.facility, item, op, state.id, quantity))
    if moves:
        # The old facility's demand planning closes the case; the new one opens it.
        effects.append(
            Effect(
                target=ActorRef("erp", state.facility),
                name="record",
                key=effect_key(command.id, "erp", state.facility),
                payload={**note, "change": "moved_out", "date": state.date},
            )
        )
    effects.append(
        Effect(
            target=ActorRef("erp", after.facility),
            name="record",
            key=effect_key(command.id, "erp", after.facility),
            payload={**note, "date": after.date},
        )
    )
    return tuple(effects)


_SUPPLY_OP = {
    "booked": "reserve",
    "rescheduled": "hold",
    "cancelled": "release",
    "completed": "consume",
}


def _supply(
    command: Command[Any], facility: str, item: str, op: str, appointment: str, quantity: int
) -> Effect:
    return Effect(
        target=ActorRef("supply", f"{facility}:{item}"),
        name=op,
        key=effect_key(command.id, "supply", facility, item, op),
        payload={"appointment": appointment, "quantity": quantity},
    )


def evolve(state: AppointmentState, event: Event) -> AppointmentState:
    """Apply one recorded event; never fails."""
    v = state.version + 1
    if isinstance(event, Booked):
        return msgspec.structs.replace(
            state,
            status="booked",
            procedure=event.procedure,
            facility=event.facility,
            date=event.date,
            items=event.items,
            version=v,
        )
    if isinstance(event, Rescheduled):
        return msgspec.structs.replace(state, date=event.date, facility=event.facility, version=v)
    if isinstance(event, Cancelled):
        return msgspec.structs.replace(state, status="cancelled", version=v)
    return msgspec.structs.replace(state, status="completed", version=v)


KIND: EntityKind[AppointmentState, Event] = EntityKind(
    name="appointment",
    state_type=AppointmentState,
    commands={"book": Book, "reschedule": Reschedule, "cancel": Cancel, "complete": Complete},
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="a scheduled procedure case",
)
