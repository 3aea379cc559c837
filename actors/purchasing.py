"""Purchasing actor: the purchase orders of one facility with ERP, keyed by facility id.

Item actors raise replenishment orders and source requisitions become orders; this actor sends
each to ERP exactly once (keyed by the crossing or the requisition) and keeps the facility's
purchasing ledger.  It remembers the orders still waiting for ERP, not every order ever sent, so
its state stays small however long the history (ERP and the item actors keep the orders).
"""

from __future__ import annotations

from typing import Any

import msgspec

from caresync.actors.contract import Accepted, Command, Downstream, Effect, EntityKind, Rejected
from caresync.actors.ledger import DownstreamAck, Ledger, acknowledged, sent


class PurchaseOrderRequest(msgspec.Struct, kw_only=True, frozen=True):
    """An item actor's replenishment order (or a requisition's order) for ERP."""

    po_id: str
    facility_id: str
    item_id: str
    supplier_id: str
    quantity: int
    unit_cost: str = ""


class POSent(msgspec.Struct, kw_only=True, frozen=True, tag="po_sent"):
    po_id: str
    key: str


class Acked(msgspec.Struct, kw_only=True, frozen=True, tag="acked"):
    ack: DownstreamAck


Event = POSent | Acked


class PurchasingState(msgspec.Struct, kw_only=True, frozen=True):
    """The facility's orders with ERP: how many were sent, and the ledger of those waiting."""

    id: str
    orders: int = 0
    ledger: Ledger = msgspec.field(default_factory=Ledger)


def initial(entity: str) -> PurchasingState:
    """A facility that has ordered nothing yet."""
    return PurchasingState(id=entity)


def decide(state: PurchasingState, command: Command[Any]) -> Accepted[Event] | Rejected:
    """Send a purchase order to ERP; file acknowledgements."""
    p = command.payload
    if isinstance(p, PurchaseOrderRequest):
        if p.quantity <= 0:
            return Rejected(f"purchase order {p.po_id} has quantity {p.quantity}")
        effect = Effect(
            target=Downstream("erp", state.id),
            name="purchase_order",
            key=f"{command.key}:erp",
            payload=msgspec.to_builtins(p),
        )
        return Accepted(events=(POSent(po_id=p.po_id, key=effect.key),), effects=(effect,))
    if isinstance(p, DownstreamAck):
        if p.effect_key not in state.ledger.pending and p.effect_key not in state.ledger.failed:
            return Accepted()
        return Accepted(events=(Acked(ack=p),))
    return Rejected(f"purchasing does not handle {type(p).__name__}")


def evolve(state: PurchasingState, event: Event) -> PurchasingState:
    """Apply one recorded event; never fails."""
    replace = msgspec.structs.replace
    if isinstance(event, Acked):
        return replace(state, ledger=acknowledged(state.ledger, event.ack))
    return replace(state, orders=state.orders + 1, ledger=sent(state.ledger, (event.key,)))


KIND: EntityKind[PurchasingState, Event] = EntityKind(
    name="purchasing",
    state_type=PurchasingState,
    commands={"purchase_order": PurchaseOrderRequest, "downstream_ack": DownstreamAck},
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="the purchase orders of one facility with ERP",
)
