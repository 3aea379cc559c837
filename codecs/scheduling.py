"""The canonical scheduling model: what source systems say about appointments and visits.

Wire schemas (see docs/contracts.md): frozen Structs, unknown fields tolerated, new fields get
defaults and go last.  HL7 v2 (SIU, DFT, ADT) and FHIR map onto these.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]


class RequestSupply(msgspec.Struct, kw_only=True, frozen=True):
    """``item.request``: a requisition for an item at a facility (FHIR SupplyRequest); ERP gets
    one purchase order keyed by the request."""

    request_id: str
    quantity: int


class ReceiveSupply(msgspec.Struct, kw_only=True, frozen=True):
    """``item.goods_received`` as sources send it (FHIR SupplyDelivery): goods of a purchase
    order arrived."""

    po_id: str
    quantity: int = 0


class ProcedureRef(msgspec.Struct, kw_only=True, frozen=True):
    """A procedure of an appointment: its code (CPT-like) and, optionally, who performs it."""

    code: str
    provider_id: str = ""


class BookAppointment(msgspec.Struct, kw_only=True, frozen=True):
    """``appointment.book``: a case was booked (SIU S12)."""

    procedures: tuple[ProcedureRef, ...]
    facility_id: str
    start: Timestamp
    duration_min: int = 0
    room: str = ""
    providers: tuple[str, ...] = ()
    patient_class: str = ""
    patient_id: str = ""
    visit_number: str = ""
    payer_id: str = ""


class RescheduleAppointment(msgspec.Struct, kw_only=True, frozen=True):
    """``appointment.reschedule``: new time and/or place (SIU S13); empty fields keep theirs."""

    start: Timestamp | None = None
    facility_id: str = ""
    room: str = ""
    duration_min: int = 0


class ModifyAppointment(msgspec.Struct, kw_only=True, frozen=True):
    """``appointment.modify``: any details changed (SIU S14); None keeps the current value."""

    procedures: tuple[ProcedureRef, ...] | None = None
    providers: tuple[str, ...] | None = None
    facility_id: str | None = None
    room: str | None = None
    start: Timestamp | None = None
    duration_min: int | None = None
    patient_class: str | None = None
    payer_id: str | None = None
    procedures_added: tuple[ProcedureRef, ...] = ()
    """Procedures added to (or updated in) the appointment (HL7 AIS action code A or U)."""
    procedures_removed: tuple[str, ...] = ()
    """Codes of procedures taken off the appointment (HL7 AIS action code D)."""
    providers_added: tuple[str, ...] = ()
    """Providers added (HL7 AIP action code A or U)."""
    providers_removed: tuple[str, ...] = ()
    """Providers taken off (HL7 AIP action code D)."""


class CloseAppointment(msgspec.Struct, kw_only=True, frozen=True):
    """``appointment.cancel`` (S15), ``appointment.no_show`` (S26), ``appointment.delete`` (S17)."""

    reason: str = ""


class Coverage(msgspec.Struct, kw_only=True, frozen=True):
    """``appointment.coverage``: the payer (and patient class) became known (ADT A04/A08)."""

    payer_id: str
    patient_class: str = ""


class ChargeLine(msgspec.Struct, kw_only=True, frozen=True):
    """One line of a charge message (DFT P03 FT1): a charge, or a credit reversing one."""

    line_id: str
    code: str
    """Procedure code, or an item's charge code for supplies."""
    type: Literal["charge", "credit"] = "charge"
    quantity: int = 1
    amount: str = "0"
    """Decimal amount as text, exact on the wire."""
    currency: str = "USD"
    reverses: str = ""
    """For a credit: the line id it reverses."""


class PostCharges(msgspec.Struct, kw_only=True, frozen=True):
    """``appointment.post_charges``: charges posted, the procedure was performed."""

    lines: tuple[ChargeLine, ...]


class RegisterVisit(msgspec.Struct, kw_only=True, frozen=True):
    """``visit.register``: a visit registered or updated (ADT A04/A08)."""

    payer_id: str = ""
    patient_class: str = ""
    location: str = ""


class LinkAppointment(msgspec.Struct, kw_only=True, frozen=True):
    """``visit.link``: an appointment belongs to this visit (sent by the appointment)."""

    appointment_id: str


class VisitCharges(msgspec.Struct, kw_only=True, frozen=True):
    """``visit.post_charges``: charges for a visit without an appointment reference."""

    lines: tuple[ChargeLine, ...]
