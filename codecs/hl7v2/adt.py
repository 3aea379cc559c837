"""ADT (patient administration) A01, A04 and A08 messages to ``visit.register``.

The visit is keyed by PV1-19.1 (visit number); an ADT without one is refused.
"""

from __future__ import annotations

from caresync.codecs.hl7v2.context import Context, refusing
from caresync.codecs.hl7v2.errors import MISSING_ID, MISSING_SEGMENT, Hl7Error
from caresync.codecs.hl7v2.resources import patient_class, payer_id
from caresync.codecs.scheduling import RegisterVisit
from caresync.codecs.source import SourceCommand

KIND = "visit.register"


def decode_adt(ctx: Context) -> tuple[SourceCommand, ...]:
    """The one ``visit.register`` command of an ADT A01/A04/A08."""
    msg = ctx.message
    pv1 = msg.first("PV1")
    if pv1 is None:
        raise Hl7Error(
            f"{ctx.header.event} has no PV1 segment: the visit is unknown",
            code=MISSING_SEGMENT,
            location="PV1",
        )
    visit = pv1.value(19).strip()
    if not visit:
        raise Hl7Error(
            "PV1-19 (visit number) is empty: caresync keys visits by it and never invents "
            "one; send PV1-19",
            code=MISSING_ID,
            location="PV1-19",
        )
    with refusing(KIND, visit):
        point_of_care = pv1.value(3, 1).strip()
        facility = pv1.value(3, 4).strip()
        location = f"{facility}:{point_of_care}" if facility and point_of_care else ""
        payload = RegisterVisit(
            payer_id=payer_id(msg),
            patient_class=patient_class(msg),
            location=location or point_of_care or facility,
        )
        return (ctx.command(0, KIND, visit, payload),)
