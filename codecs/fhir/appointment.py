"""FHIR R4 ``Appointment`` -> ``appointment.*`` commands.

A FHIR source sends the whole appointment each time, so a booked (arrived, checked-in,
fulfilled) appointment is ``appointment.sync``, an upsert of the booking.  Cancelled, noshow and
entered-in-error close it; proposed, pending and waitlist are not bookings yet.
"""

from __future__ import annotations

from typing import get_args

import msgspec

from caresync.codecs.fhir.model import Appointment, AppointmentStatus
from caresync.codecs.fhir.rejections import reject
from caresync.codecs.fhir.resource import Resource, Routing, decode_routed
from caresync.codecs.fhir.values import entity_id, first_code, first_identifier, parse_reference
from caresync.codecs.scheduling import BookAppointment, CloseAppointment, ProcedureRef
from caresync.codecs.source import SourceCommand

SYNC = "appointment.sync"
ROUTING = Routing(
    resource_type="Appointment",
    statuses=get_args(AppointmentStatus),
    kinds={
        "booked": SYNC,
        "arrived": SYNC,
        "checked-in": SYNC,
        "fulfilled": SYNC,
        "cancelled": "appointment.cancel",
        "noshow": "appointment.no_show",
        "entered-in-error": "appointment.delete",
    },
)
_DECODER = msgspec.json.Decoder(Appointment)


def map_appointment(resource: Resource) -> SourceCommand:
    """One Appointment as ``appointment.sync``, ``.cancel``, ``.no_show`` or ``.delete``."""
    appointment, kind = decode_routed(resource, _DECODER, ROUTING)
    entity = _entity(resource, appointment)
    payload: BookAppointment | CloseAppointment
    if kind == SYNC:
        payload = _booking(resource, appointment, kind, entity)
    else:
        reason = appointment.cancelation_reason
        text = reason.text if reason is not None else ""
        payload = CloseAppointment(reason=text or first_code(reason))
    return SourceCommand(
        kind=kind,
        entity=entity,
        id=resource.command_id,
        payload=payload,
        occurred_at=resource.occurred_at(appointment.meta),
        source="fhir",
    )


def _entity(resource: Resource, appointment: Appointment) -> str:
    """``<system>|<value>`` of the first identifier with a value, else ``Appointment/<id>``."""
    identifier = first_identifier(appointment.identifier)
    if identifier is not None:
        text = f"{identifier.system}|{identifier.value}" if identifier.system else identifier.value
        return entity_id(text, resource.at("identifier"))
    if appointment.id is not None:
        return f"Appointment/{appointment.id}"
    raise reject(
        "missing_id",
        resource.at("identifier"),
        "no identifier with a value and no $.id: which appointment?",
        kind=ROUTING.kind_of(appointment.status),
    )


def _booking(
    resource: Resource, appointment: Appointment, kind: str, entity: str
) -> BookAppointment:
    start, end = appointment.start, appointment.end
    if start is None:
        raise reject(
            "bad_value",
            resource.at("start"),
            f"a {appointment.status} appointment needs a start",
            kind=kind,
            entity=entity,
        )
    if end is not None:
        if end < start:
            raise reject(
                "bad_value",
                resource.at("end"),
                f"end {resource.tree['end']} is before start {resource.tree['start']}",
                kind=kind,
                entity=entity,
            )
        seconds = int((end - start).total_seconds())
        duration_min = -(-seconds // 60)  # a started minute counts
    else:
        duration_min = appointment.minutes_duration or 0
    patient, facility = "", ""
    providers: dict[str, None] = {}  # ordered, and a set for a hostile 30,000 of them
    for index, participant in enumerate(appointment.participant):
        if participant.actor is None:
            continue
        path = resource.at(f"participant[{index}].actor.reference")
        target = parse_reference(participant.actor.reference, path)
        if target is None:
            continue
        actor_type, actor_id = target
        if actor_type == "Location" and not facility:
            facility = actor_id
        elif actor_type == "Patient" and not patient:
            patient = actor_id
        elif actor_type == "Practitioner":
            providers.setdefault(actor_id)
    if not facility:
        raise reject(
            "bad_value",
            resource.at("participant"),
            "no Location participant: which facility?",
            kind=kind,
            entity=entity,
        )
    lead = next(iter(providers), "")
    codes = dict.fromkeys(c for c in map(first_code, appointment.service_type) if c)
    return BookAppointment(
        procedures=tuple(ProcedureRef(code=code, provider_id=lead) for code in codes),
        facility_id=facility,
        start=start,
        duration_min=duration_min,
        providers=tuple(providers),
        patient_id=patient,
    )
