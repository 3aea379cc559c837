"""DFT (financial transaction) messages to charge commands, one per appointment or visit.

Each FT1 is one line.  FT1-23 (filler order number, ``NAMESPACE:ID`` like an appointment)
links it to an appointment (``appointment.post_charges``); without it PV1-19 links it to the
visit (``visit.post_charges``).  An amount is never guessed: FT1-11 (extended amount), else
FT1-12 (unit amount) times the quantity, else the message is refused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from caresync.codecs.hl7v2.context import Context, refusing
from caresync.codecs.hl7v2.errors import (
    BAD_VALUE,
    MISSING_FIELD,
    MISSING_ID,
    MISSING_SEGMENT,
    Hl7Error,
)
from caresync.codecs.hl7v2.message import Segment
from caresync.codecs.hl7v2.resources import visit_number
from caresync.codecs.hl7v2.values import decimal_text, parse_count, parse_decimal
from caresync.codecs.scheduling import ChargeLine, PostCharges, VisitCharges
from caresync.codecs.source import SourceCommand

TRANSACTION_TYPES = {"CG": "charge", "CD": "credit"}
"""FT1-6 values caresync routes (HL7 table 0017): charge and credit."""
DEFAULT_CURRENCY = "USD"


@dataclass(frozen=True, slots=True)
class _Line:
    """An FT1 read and checked, before its command (and so its fallback id) is known."""

    segment: Segment
    position: int
    type: str
    code: str
    quantity: int
    amount: str
    currency: str


def decode_dft(ctx: Context) -> tuple[SourceCommand, ...]:
    """The charge commands of a DFT message, in order of their first line."""
    msg = ctx.message
    if msg.count("FT1") == 0:
        raise Hl7Error(
            f"{ctx.header.event} has no FT1 segment: there is no charge to post",
            code=MISSING_SEGMENT,
            location="FT1",
        )
    visit = visit_number(msg)
    by_target: dict[tuple[str, str], list[_Line]] = {}
    for position, seg in enumerate(msg.all("FT1"), 1):
        line = _read(seg, position)
        by_target.setdefault(_target(ctx, seg, visit), []).append(line)
    set_ids = Counter(seg.value(1).strip() for seg in msg.all("FT1"))
    commands: list[SourceCommand] = []
    for index, ((kind, entity), lines) in enumerate(by_target.items()):
        with refusing(kind, entity):
            cmd_id = ctx.command_id(index)
            charge_lines = tuple(_lines(cmd_id, lines, set_ids))
            payload = (
                PostCharges(lines=charge_lines)
                if kind == "appointment.post_charges"
                else VisitCharges(lines=charge_lines)
            )
            commands.append(ctx.command(index, kind, entity, payload))
    return tuple(commands)


def _target(ctx: Context, seg: Segment, visit: str) -> tuple[str, str]:
    order = seg.value(23, 1).strip()
    if order:
        return "appointment.post_charges", ctx.qualified(order, seg.value(23, 2).strip())
    if visit:
        return "visit.post_charges", visit
    raise Hl7Error(
        f"FT1-23{seg.at()} (filler order number) and PV1-19 (visit number) are empty: the "
        "charge names no appointment or visit to post to",
        code=MISSING_ID,
        location="FT1-23",
    )


def _read(seg: Segment, position: int) -> _Line:
    at = seg.at()
    kind = seg.value(6).strip().upper()
    if kind not in TRANSACTION_TYPES:
        why = "is empty" if not kind else f"{kind[:10]!r} is not routed"
        raise Hl7Error(
            f"FT1-6{at} (transaction type) {why}: caresync posts CG (charge) and CD (credit)",
            code=MISSING_FIELD if not kind else BAD_VALUE,
            location="FT1-6",
        )
    code = seg.value(7).strip()
    if not code:
        raise Hl7Error(
            f"FT1-7.1{at} (transaction code) is empty: a charge must name its code",
            code=MISSING_FIELD,
            location="FT1-7.1",
        )
    quantity_text = seg.value(10)
    quantity = parse_count(quantity_text, "FT1-10", "quantity", at) if quantity_text else 1
    amount, currency = _amount(seg, quantity)
    return _Line(seg, position, TRANSACTION_TYPES[kind], code, quantity, amount, currency)


def _amount(seg: Segment, quantity: int) -> tuple[str, str]:
    at = seg.at()
    for n, what in ((11, "extended amount"), (12, "unit amount")):
        text = seg.value(n, 1, 1)
        if not text.strip():
            continue
        amount = parse_decimal(text, f"FT1-{n}.1", what, at)
        if n == 12:
            amount *= Decimal(quantity)
        return decimal_text(amount), _currency(seg, n)
    raise Hl7Error(
        f"FT1-11 and FT1-12{at} are empty: no amount; caresync never guesses a charge, send "
        "the extended amount in FT1-11",
        code=MISSING_FIELD,
        location="FT1-11",
    )


def _currency(seg: Segment, n: int) -> str:
    """MO.2 (``100&USD``), else a 3-letter CP.2 (``100^USD`` senders), else USD."""
    text = seg.value(n, 1, 2).strip()
    if not text:
        second = seg.value(n, 2).strip()
        text = second if len(second) == 3 and second.isalpha() else DEFAULT_CURRENCY
    currency = text.upper()
    if not (len(currency) == 3 and currency.isascii() and currency.isalpha()):
        raise Hl7Error(
            f"FT1-{n}.1.2{seg.at()} (currency) {text[:10]!r} is not a 3-letter ISO 4217 code",
            code=BAD_VALUE,
            location=f"FT1-{n}.1.2",
        )
    return currency


def _lines(cmd_id: str, lines: list[_Line], set_ids: Counter[str]) -> Iterator[ChargeLine]:
    used: dict[str, int] = {}
    for line in lines:
        seg = line.segment
        set_id = seg.value(1).strip()
        if (tx_id := seg.value(2).strip()) != "":
            line_id = tx_id
        elif set_id and set_ids[set_id] == 1:
            line_id = f"{cmd_id}:{set_id}"
        else:
            line_id = f"{cmd_id}:#{line.position}"
        if line_id in used:
            raise Hl7Error(
                f"FT1-2 (transaction id) {line_id[:40]!r} is used by the FT1 at line "
                f"{used[line_id]} and the one at line {seg.line}: each charge needs its own id",
                code=BAD_VALUE,
                location="FT1-2",
            )
        used[line_id] = seg.line
        yield ChargeLine(
            line_id=line_id,
            code=line.code,
            type="credit" if line.type == "credit" else "charge",
            quantity=line.quantity,
            amount=line.amount,
            currency=line.currency,
        )
