"""SIU (scheduling) messages to appointment commands.

S12 book, S13 reschedule, S14 modify (by segment action codes), S15 cancel, S17 delete and
S26 no-show.  The appointment id is the filler's: ``SCH-2.2:SCH-2.1`` (namespace defaulting
to MSH-3.1); an SIU without one is refused, never given an invented id.
"""

from __future__ import annotations

from caresync.codecs.hl7v2.context import Context, refusing
from caresync.codecs.hl7v2.errors import MISSING_FIELD, MISSING_ID, MISSING_SEGMENT, Hl7Error
from caresync.codecs.hl7v2.events import SIU_KINDS
from caresync.codecs.hl7v2.message import Segment
from caresync.codecs.hl7v2.resources import (
    action,
    groups,
    patient_class,
    patient_id,
    payer_id,
    place,
    service_code,
    visit_number,
)
from caresync.codecs.hl7v2.timing import duration_of, no_start, start_of
from caresync.codecs.scheduling import (
    BookAppointment,
    CloseAppointment,
    ModifyAppointment,
    ProcedureRef,
    RescheduleAppointment,
)
from caresync.codecs.source import SourceCommand


def appointment_id(ctx: Context) -> str:
    """``NAMESPACE:ID`` from SCH-2 (filler appointment id); raises Hl7Error when empty."""
    sch = ctx.message.first("SCH")
    if sch is None:
        raise Hl7Error(
            f"{ctx.header.event} has no SCH segment: the appointment is unknown",
            code=MISSING_SEGMENT,
            location="SCH",
        )
    ident = sch.value(2, 1).strip()
    if not ident:
        placer = sch.value(1, 1).strip()
        hint = f" (SCH-1 holds the placer id {placer[:40]!r})" if placer else ""
        raise Hl7Error(
            f"SCH-2.1 (filler appointment id) is empty{hint}: caresync keys appointments by "
            "the filler id and never invents one; send SCH-2",
            code=MISSING_ID,
            location="SCH-2.1",
        )
    return ctx.qualified(ident, sch.value(2, 2).strip())


def decode_siu(ctx: Context) -> tuple[SourceCommand, ...]:
    """The one appointment command of an SIU message."""
    kind = SIU_KINDS[ctx.header.trigger]
    with refusing(kind):
        entity = appointment_id(ctx)
        with refusing(kind, entity):
            payload: object
            if kind == "appointment.book":
                payload = _book(ctx)
            elif kind == "appointment.reschedule":
                payload = _reschedule(ctx)
            elif kind == "appointment.modify":
                payload = _modify(ctx)
            else:
                payload = _close(ctx)
            return (ctx.command(0, kind, entity, payload),)


def _procedures(ctx: Context) -> tuple[ProcedureRef, ...]:
    seen: dict[str, ProcedureRef] = {}
    for group in groups(ctx.message):
        for seg in group.services:
            code = service_code(seg)
            seen.setdefault(code, ProcedureRef(code=code, provider_id=group.provider()))
    return tuple(seen.values())


def _providers(ctx: Context) -> tuple[str, ...]:
    people = (seg.value(3).strip() for seg in ctx.message.all("AIP"))
    return tuple(dict.fromkeys(p for p in people if p))


def _book(ctx: Context) -> BookAppointment:
    start, _ = start_of(ctx)
    if start is None:
        raise no_start(ctx)
    facility, room = place(ctx.message)
    if not facility:
        raise Hl7Error(
            "the booking has no facility: AIL-3.4, AIL-3.1, PV1-3.4 and PV1-3.1 are all "
            "empty; send the location in AIL-3",
            code=MISSING_FIELD,
            location="AIL-3",
        )
    msg = ctx.message
    return BookAppointment(
        procedures=_procedures(ctx),
        facility_id=facility,
        start=start,
        duration_min=duration_of(ctx, start),
        room=room,
        providers=_providers(ctx),
        patient_class=patient_class(msg),
        patient_id=patient_id(msg),
        visit_number=visit_number(msg),
        payer_id=payer_id(msg),
    )


def _reschedule(ctx: Context) -> RescheduleAppointment:
    start, _ = start_of(ctx)
    facility, room = place(ctx.message)
    return RescheduleAppointment(
        start=start, facility_id=facility, room=room, duration_min=duration_of(ctx, start)
    )


def _modify(ctx: Context) -> ModifyAppointment:
    added: dict[str, ProcedureRef] = {}
    removed: list[str] = []
    people_added: list[str] = []
    people_removed: list[str] = []
    moved_to: list[Segment] = []
    for group in groups(ctx.message):
        for seg in group.services:
            code = action(seg)
            if code in ("A", "U"):
                proc = service_code(seg)
                added.setdefault(proc, ProcedureRef(code=proc, provider_id=group.provider()))
            elif code == "D":
                removed.append(service_code(seg))
        for seg in group.people:
            code = action(seg)
            person = seg.value(3).strip()
            if code in ("A", "U") and person:
                people_added.append(person)
            elif code == "D" and person:
                people_removed.append(person)
        moved_to.extend(seg for seg in group.places if action(seg) in ("A", "U"))
    facility, room = place(ctx.message, moved_to)
    start, _ = start_of(ctx)
    duration = duration_of(ctx, start)
    msg = ctx.message
    return ModifyAppointment(
        facility_id=facility or None,
        room=room if facility else None,
        start=start,
        duration_min=duration or None,
        patient_class=patient_class(msg) or None,
        payer_id=payer_id(msg) or None,
        procedures_added=tuple(added.values()),
        procedures_removed=tuple(dict.fromkeys(removed)),
        providers_added=tuple(dict.fromkeys(people_added)),
        providers_removed=tuple(dict.fromkeys(people_removed)),
    )


def _close(ctx: Context) -> CloseAppointment:
    sch = ctx.message.first("SCH")
    if sch is None:  # appointment_id() already refused it; kept for the type checker
        raise Hl7Error("no SCH segment", code=MISSING_SEGMENT, location="SCH")
    reason = sch.value(6, 2).strip() or sch.value(6, 1).strip()
    return CloseAppointment(reason=reason)
