"""The resources of an SIU message: RGS groups of services (AIS), places (AIL), people (AIP).

Also where the appointment takes place (facility and room) and the patient facts that come
with it (PID, PV1, IN1), which the ADT and DFT mappings share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from caresync.codecs.hl7v2.errors import BAD_VALUE, MISSING_FIELD, Hl7Error
from caresync.codecs.hl7v2.message import Message, Segment

ACTIONS = ("A", "U", "D", "X", "")
"""Segment action codes (HL7 table 0206): add, update, delete, no change; empty: no change."""


@dataclass(slots=True)
class Group:
    """One resource group (RGS) and the resource segments under it."""

    services: list[Segment] = field(default_factory=list)
    places: list[Segment] = field(default_factory=list)
    people: list[Segment] = field(default_factory=list)

    def provider(self) -> str:
        """AIP-3.1 of the group's first person who has one ('' if none)."""
        return next((p for seg in self.people if (p := seg.value(3).strip())), "")


def groups(message: Message) -> list[Group]:
    """The resource groups in order; resources before any RGS form a leading group."""
    found = [Group()]
    for seg in message.segments:
        if seg.name == "RGS":
            found.append(Group())
        elif seg.name == "AIS":
            found[-1].services.append(seg)
        elif seg.name == "AIL":
            found[-1].places.append(seg)
        elif seg.name == "AIP":
            found[-1].people.append(seg)
    return [g for g in found if g.services or g.places or g.people]


def action(seg: Segment) -> str:
    """The segment action code (AIS-2, AIL-2, AIP-2), checked against table 0206."""
    code = seg.value(2).strip().upper()
    if code not in ACTIONS:
        raise Hl7Error(
            f"{seg.where(2)}{seg.at()} (segment action code) {code[:10]!r} is not A, U, D or X",
            code=BAD_VALUE,
            location=seg.where(2),
        )
    return code


def service_code(seg: Segment) -> str:
    """AIS-3.1, the procedure code; an AIS without one is refused."""
    code = seg.value(3).strip()
    if not code:
        raise Hl7Error(
            f"AIS-3.1{seg.at()} (procedure code) is empty: every AIS must name its service",
            code=MISSING_FIELD,
            location="AIS-3.1",
        )
    return code


def place_of(seg: Segment) -> tuple[str, str]:
    """(facility, room) of a PL field at AIL-3 or PV1-3: facility is PL.4 (its HD namespace
    id) else PL.1 (point of care), room PL.2; ('', '') when neither is given."""
    facility = seg.value(3, 4).strip() or seg.value(3, 1).strip()
    return (facility, seg.value(3, 2).strip()) if facility else ("", "")


def place(message: Message, places: list[Segment] | None = None) -> tuple[str, str]:
    """Facility and room: the first AIL that names one (of ``places`` when given), else PV1-3.

    The room comes with its facility, never from another segment's location.
    """
    for seg in message.all("AIL") if places is None else places:
        facility, room = place_of(seg)
        if facility:
            return facility, room
    if places is None and (pv1 := message.first("PV1")) is not None:
        return place_of(pv1)
    return "", ""


def patient_id(message: Message) -> str:
    """PID-3.1 of the first repetition."""
    pid = message.first("PID")
    return pid.value(3).strip() if pid is not None else ""


def visit_number(message: Message) -> str:
    """PV1-19.1."""
    pv1 = message.first("PV1")
    return pv1.value(19).strip() if pv1 is not None else ""


def patient_class(message: Message) -> str:
    """PV1-2.1."""
    pv1 = message.first("PV1")
    return pv1.value(2).strip() if pv1 is not None else ""


def payer_id(message: Message) -> str:
    """IN1-3.1 (insurance company id) of the first IN1, else its IN1-2.1 (plan id)."""
    in1 = message.first("IN1")
    if in1 is None:
        return ""
    return in1.value(3).strip() or in1.value(2).strip()
