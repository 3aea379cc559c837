"""When an SIU appointment starts and how long it lasts, from the fields that can say so.

Start: TQ1-7, else AIS-4, AIL-6 or AIP-6, else SCH-11.4 (only below v2.7: SCH-11 was
withdrawn there, and the v2.8 samples carry a stale SCH-11 that disagrees with TQ1).
Duration: AIS-7 in the units of AIS-8, else TQ1-8 minus the start, else SCH-9 in the units of
SCH-10; 0 when nothing says.
"""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal

from caresync.codecs.hl7v2.context import Context
from caresync.codecs.hl7v2.errors import BAD_VALUE, MISSING_FIELD, Hl7Error
from caresync.codecs.hl7v2.message import Segment
from caresync.codecs.hl7v2.values import parse_decimal

_MINUTES_PER_UNIT = {
    "": Decimal(1),
    "MIN": Decimal(1),
    "MINS": Decimal(1),
    "MINUTE": Decimal(1),
    "MINUTES": Decimal(1),
    "S": Decimal(1) / 60,
    "SEC": Decimal(1) / 60,
    "SECOND": Decimal(1) / 60,
    "SECONDS": Decimal(1) / 60,
    "H": Decimal(60),
    "HR": Decimal(60),
    "HRS": Decimal(60),
    "HOUR": Decimal(60),
    "HOURS": Decimal(60),
    "D": Decimal(1440),
    "DAY": Decimal(1440),
    "DAYS": Decimal(1440),
}
MAX_DURATION_MIN = 7 * 24 * 60


def start_of(ctx: Context) -> tuple[datetime | None, str]:
    """The appointment start and the field it came from; (None, '') when none says."""
    msg = ctx.message
    tq1 = msg.first("TQ1")
    if tq1 is not None and (when := ctx.timestamp(tq1, 7)) is not None:
        return when, "TQ1-7"
    for name, n in (("AIS", 4), ("AIL", 6), ("AIP", 6)):
        for seg in msg.all(name):
            if (when := ctx.timestamp(seg, n)) is not None:
                return when, f"{name}-{n}"
    sch = msg.first("SCH")
    old_enough = ctx.header.version < (2, 7, 0)
    if sch is not None and old_enough and (when := ctx.timestamp(sch, 11, 4)) is not None:
        return when, "SCH-11.4"
    return None, ""


def no_start(ctx: Context) -> Hl7Error:
    """The refusal of a booking that says nowhere when it starts."""
    sch11 = "SCH-11.4" if ctx.header.version < (2, 7, 0) else "SCH-11 (withdrawn in v2.7)"
    return Hl7Error(
        f"the booking has no start time: TQ1-7, AIS-4, AIL-6, AIP-6 and {sch11} are all "
        "empty; send the start in TQ1-7",
        code=MISSING_FIELD,
        location="TQ1-7",
    )


def duration_of(ctx: Context, start: datetime | None) -> int:
    """The duration in whole minutes (rounded up), 0 when no field gives it."""
    msg = ctx.message
    for ais in msg.all("AIS"):
        if ais.value(7).strip():
            return _in_minutes(ais, 7, 8)
    tq1 = msg.first("TQ1")
    if tq1 is not None and start is not None and (end := ctx.timestamp(tq1, 8)) is not None:
        if end < start:
            raise Hl7Error(
                f"TQ1-8 (end date/time) {end.isoformat()} is before the start "
                f"{start.isoformat()}: fix TQ1-7 or TQ1-8",
                code=BAD_VALUE,
                location="TQ1-8",
            )
        return _checked(math.ceil((end - start).total_seconds() / 60), tq1, 8)
    sch = msg.first("SCH")
    if sch is not None and sch.value(9).strip():
        return _in_minutes(sch, 9, 10)
    return 0


def _in_minutes(seg: Segment, n: int, units_n: int) -> int:
    amount = parse_decimal(seg.value(n), seg.where(n), "duration", seg.at())
    unit = seg.value(units_n, 1).strip()
    factor = _MINUTES_PER_UNIT.get(unit.upper())
    if factor is None:
        raise Hl7Error(
            f"{seg.where(units_n)}{seg.at()} (duration units) {unit[:20]!r} is not a time "
            "unit caresync knows: use min, s, h or d",
            code=BAD_VALUE,
            location=seg.where(units_n),
        )
    return _checked(math.ceil(amount * factor), seg, n)


def _checked(minutes: int, seg: Segment, n: int) -> int:
    if not 0 <= minutes <= MAX_DURATION_MIN:
        raise Hl7Error(
            f"{seg.where(n)}{seg.at()} gives a duration of {minutes:,} minutes: it must be "
            f"from 0 to {MAX_DURATION_MIN:,} (one week)",
            code=BAD_VALUE,
            location=seg.where(n),
        )
    return minutes
