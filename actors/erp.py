"""ERP actor: the ERP conversation of one facility, keyed by facility id.

It keeps the open cases per appointment date (what demand planning is fed), and it owns what
goes to the ERP system for the facility: purchase orders raised by the facility's item actors
and the financial postings of consumed supplies, each sent downstream exactly once (keyed by
the command that asked for it).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from caresync.actors.contract import Accepted, Command, Downstream, Effect, EntityKind, Rejected


class Record(msgspec.Struct, kw_only=True, frozen=True):
    """An appointment change at this facility."""

    appointment: str
    change: str
    date: str = ""
    procedure: str = ""


class PurchaseOrderRequest(msgspec.Struct, kw_only=True, frozen=True):
    """An item actor's replenishment order for ERP."""

    po_id: str
    facility_id: str
    item_id: str
    supplier_id: str
    quantity: int
    unit_cost: str = ""


class PostingRequest(msgspec.Struct, kw_only=True, frozen=True):
    """The cost of consumed supplies, for the facility's cost center."""

    facility_id: str
    item_id: str
    appointment_id: str
    quantity: int
    amount: str
    unit_cost: str = ""
    cost_center: str = ""


class Recorded(msgspec.Struct, kw_only=True, frozen=True, tag="recorded"):
    appointment: str
    change: str
    date: str


class POSent(msgspec.Struct, kw_only=True, frozen=True, tag="po_sent"):
    po_id: str


class Posted(msgspec.Struct, kw_only=True, frozen=True, tag="posted"):
    amount: str


Event = Recorded | POSent | Posted


class ErpState(msgspec.Struct, kw_only=True, frozen=True):
    """What the ERP of one facility has been asked for."""

    id: str
    changes: int = 0
    open_cases: dict[str, str] = msgspec.field(default_factory=dict)
    """Appointment id to its date, for appointments booked and not yet closed."""
    purchase_orders: tuple[str, ...] = ()
    postings: int = 0
    posted_amount: str = "0"


def initial(entity: str) -> ErpState:
    """A facility with no demand yet."""
    return ErpState(id=entity)


def decide(state: ErpState, command: Command[Any]) -> Accepted[Event] | Rejected:
    """Record a change, or send a purchase order or a posting to ERP."""
    p = command.payload
    if isinstance(p, Record):
        return Accepted(events=(Recorded(appointment=p.appointment, change=p.change, date=p.date),))
    if isinstance(p, PurchaseOrderRequest):
        if p.quantity <= 0:
            return Rejected(f"purchase order {p.po_id} has quantity {p.quantity}")
        return Accepted(
            events=(POSent(po_id=p.po_id),),
            effects=(_downstream(state, command, "purchase_order", p),),
        )
    if isinstance(p, PostingRequest):
        return Accepted(
            events=(Posted(amount=p.amount),),
            effects=(_downstream(state, command, "posting", p),),
        )
    return Rejected(f"erp does not handle {type(p).__name__}")


def _downstream(state: ErpState, command: Command[Any], operation: str, payload: Any) -> Effect:
    return Effect(
        target=Downstream("erp", state.id),
        name=operation,
        key=f"{command.id}:erp",
        payload=payload,
    )


def evolve(state: ErpState, event: Event) -> ErpState:
    """Open, move or close a case; count orders and postings."""
    replace = msgspec.structs.replace
    if isinstance(event, POSent):
        return replace(state, purchase_orders=(*state.purchase_orders, event.po_id))
    if isinstance(event, Posted):
        total = _decimal(state.posted_amount) + _decimal(event.amount)
        return replace(state, postings=state.postings + 1, posted_amount=str(total))
    cases = state.open_cases
    if event.change in ("booked", "rescheduled"):
        cases = {**cases, event.appointment: event.date}
    elif event.appointment in cases:
        cases = {k: v for k, v in cases.items() if k != event.appointment}
    return replace(state, changes=state.changes + 1, open_cases=cases)


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        return Decimal(0)


KIND: EntityKind[ErpState, Event] = EntityKind(
    name="erp",
    state_type=ErpState,
    commands={"record": Record, "purchase_order": PurchaseOrderRequest, "posting": PostingRequest},
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="the ERP conversation of one facility",
)
