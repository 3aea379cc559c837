"""What each simulated system offers: operations, the data they require, their references.

Schemas name only the fields a system needs; requests may carry more, and everything is
stored (wire schemas never forbid unknown fields).  Demand and stock moves carry all of one
change's items as ``lines`` (at least one).  Quantities are numbers; money is a decimal,
given as a string (exact, as caresync sends it) or a number.  A quantity may be negative where
the contract says so (a release, a reversal).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated

import msgspec

from caresync.codecs.envelope import MAX_ID_LENGTH

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]


class _Readiness(msgspec.Struct):
    appointment_id: Id
    readiness: Id


class _Charge(msgspec.Struct):
    appointment_id: Id
    line_id: Id
    code: Id
    quantity: float
    amount: Decimal


class _Credit(msgspec.Struct):
    appointment_id: Id
    line_id: Id
    reverses_line_id: Id


class _Reversal(msgspec.Struct):
    appointment_id: Id


class _DemandLine(msgspec.Struct):
    item_id: Id
    date: Id
    quantity: float


class _Demand(msgspec.Struct):
    facility_id: Id
    lines: Annotated[list[_DemandLine], msgspec.Meta(min_length=1)]


class _PurchaseOrder(msgspec.Struct):
    po_id: Id
    facility_id: Id
    item_id: Id
    supplier_id: Id
    quantity: Annotated[float, msgspec.Meta(gt=0)]


class _Posting(msgspec.Struct):
    facility_id: Id
    cost_center: Id
    amount: Decimal


class _StockLine(msgspec.Struct):
    item_id: Id
    quantity: float


class _StockMove(msgspec.Struct):
    facility_id: Id
    lines: Annotated[list[_StockLine], msgspec.Meta(min_length=1)]


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation a system offers: its reference prefix and the data it requires."""

    reference_prefix: str
    schema: type[msgspec.Struct]


OPERATIONS: dict[str, dict[str, Operation]] = {
    "billing": {
        "readiness": Operation("RDY", _Readiness),
        "charge": Operation("CHG", _Charge),
        "credit": Operation("CRD", _Credit),
        "reversal": Operation("REV", _Reversal),
    },
    "erp": {
        "demand": Operation("DMD", _Demand),
        "purchase_order": Operation("PO", _PurchaseOrder),
        "posting": Operation("JE", _Posting),
    },
    "supply": {
        "reservation": Operation("RES", _StockMove),
        "consumption": Operation("CON", _StockMove),
    },
}
"""Every system and its operations (subject ``<sim prefix>.<system>.<operation>``)."""
