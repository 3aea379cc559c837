"""Which HL7 events caresync routes, and to which canonical command kind."""

from __future__ import annotations

import re

SIU_KINDS = {
    "S12": "appointment.book",
    "S13": "appointment.reschedule",
    "S14": "appointment.modify",
    "S15": "appointment.cancel",
    "S17": "appointment.delete",
    "S26": "appointment.no_show",
}
"""SIU trigger events and the appointment command each becomes."""

DFT_EVENTS = ("P03", "P11")
"""DFT events whose FT1 lines become ``appointment.post_charges`` or ``visit.post_charges``."""

ADT_EVENTS = ("A01", "A04", "A08")
"""ADT events that become ``visit.register``."""

_MSH9 = re.compile(rb"MSH(.)")


def kind_of(message_type: str, trigger: str) -> str:
    """The command kind an event becomes ('' if not routed); DFT says appointment charges."""
    if message_type == "SIU":
        return SIU_KINDS.get(trigger, "")
    if message_type == "DFT" and trigger in DFT_EVENTS:
        return "appointment.post_charges"
    if message_type == "ADT" and trigger in ADT_EVENTS:
        return "visit.register"
    return ""


def event_kind(message: bytes) -> str:
    """Best-effort command kind of a message for verdict lines (``appointment.book`` for an
    SIU^S12); '' when unknown.  Reads only MSH-9, from raw bytes; never raises."""
    head = bytes(message[:4096])
    found = _MSH9.search(head)
    if found is None:
        return ""
    sep = found.group(1)
    line = head[found.start() :].split(b"\r", 1)[0].split(b"\n", 1)[0]
    fields = line.split(sep)
    if len(fields) < 9:
        return ""
    parts = fields[8].split(fields[1][:1] or b"^")
    message_type = parts[0].strip().decode("ascii", "replace").upper()
    trigger = parts[1].strip().decode("ascii", "replace").upper() if len(parts) > 1 else ""
    return kind_of(message_type, trigger)
