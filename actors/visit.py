"""Visit actor: one patient visit (encounter), keyed by visit number.

Registration (ADT) tells the payer and patient class of a visit; appointments booked for the
visit link themselves to it.  The visit passes the coverage on to each of its appointments, as
soon as both are known, and routes charges that name only the visit to its latest appointment.
"""

from __future__ import annotations

from typing import Any

import msgspec

from caresync.actors.contract import Accepted, ActorRef, Command, Effect, EntityKind, Rejected
from caresync.codecs.scheduling import LinkAppointment, RegisterVisit, VisitCharges


class Registered(msgspec.Struct, kw_only=True, frozen=True, tag="registered"):
    payer_id: str
    patient_class: str
    location: str


class Linked(msgspec.Struct, kw_only=True, frozen=True, tag="linked"):
    appointment_id: str


class ChargesRouted(msgspec.Struct, kw_only=True, frozen=True, tag="charges_routed"):
    appointment_id: str


Event = Registered | Linked | ChargesRouted


class VisitState(msgspec.Struct, kw_only=True, frozen=True):
    """What is known of one visit."""

    id: str
    payer_id: str = ""
    patient_class: str = ""
    location: str = ""
    appointments: tuple[str, ...] = ()


def initial(entity: str) -> VisitState:
    """A visit nobody registered yet."""
    return VisitState(id=entity)


def decide(state: VisitState, command: Command[Any]) -> Accepted[Event] | Rejected:
    """Record registration and links; pass coverage and charges on."""
    p = command.payload
    if isinstance(p, RegisterVisit):
        event: Event = Registered(
            payer_id=p.payer_id, patient_class=p.patient_class, location=p.location
        )
        changed = (p.payer_id, p.patient_class) != (state.payer_id, state.patient_class)
        targets = state.appointments if changed and p.payer_id else ()
        return Accepted(
            events=(event,), effects=_coverage(command, targets, p.payer_id, p.patient_class)
        )
    if isinstance(p, LinkAppointment):
        if p.appointment_id in state.appointments:
            return Accepted()
        targets = (p.appointment_id,) if state.payer_id else ()
        return Accepted(
            events=(Linked(appointment_id=p.appointment_id),),
            effects=_coverage(command, targets, state.payer_id, state.patient_class),
        )
    if isinstance(p, VisitCharges):
        if not state.appointments:
            return Rejected(f"visit {state.id} has no appointment to post charges to")
        target = state.appointments[-1]
        effect = Effect(
            target=ActorRef("appointment", target),
            name="post_charges",
            key=f"{command.key}:appointment",
            payload={"lines": [msgspec.to_builtins(line) for line in p.lines]},
        )
        return Accepted(events=(ChargesRouted(appointment_id=target),), effects=(effect,))
    return Rejected(f"visit does not handle {type(p).__name__}")


def _coverage(
    command: Command[Any], targets: tuple[str, ...], payer_id: str, patient_class: str
) -> tuple[Effect, ...]:
    return tuple(
        Effect(
            target=ActorRef("appointment", appointment),
            name="coverage",
            key=f"{command.key}:coverage:{appointment}",
            payload={"payer_id": payer_id, "patient_class": patient_class},
        )
        for appointment in targets
    )


def evolve(state: VisitState, event: Event) -> VisitState:
    """Apply one recorded event; never fails."""
    replace = msgspec.structs.replace
    if isinstance(event, Registered):
        return replace(
            state,
            payer_id=event.payer_id or state.payer_id,
            patient_class=event.patient_class or state.patient_class,
            location=event.location or state.location,
        )
    if isinstance(event, Linked):
        return replace(state, appointments=(*state.appointments, event.appointment_id))
    return state


KIND: EntityKind[VisitState, Event] = EntityKind(
    name="visit",
    state_type=VisitState,
    commands={"register": RegisterVisit, "link": LinkAppointment, "post_charges": VisitCharges},
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="a patient visit: coverage and charges by visit number",
)
