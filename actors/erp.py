"""ERP actor: the ERP conversation of one facility, keyed by facility id.

It owns what goes to ERP for the facility: demand planning lines of its appointments (each
appointment sends its whole demand; the change per item and date goes downstream, reversals as
negative quantities), purchase orders raised by its item actors, and the financial postings of
consumed supplies to the facility's cost center.  Each is sent exactly once, keyed by the
command that asked for it, and tracked in a sync ledger per appointment (purchase orders under
the ``purchasing`` ledger).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from caresync.actors.contract import Accepted, Command, Downstream, Effect, EntityKind, Rejected
from caresync.actors.ledger import DownstreamAck, Ledger, acknowledged, sent, settled

PURCHASING = "purchasing"
"""Ledger name of the facility's purchase orders."""


class DemandLine(msgspec.Struct, kw_only=True, frozen=True):
    """A quantity of an item needed at this facility on a date."""

    item_id: str
    date: str
    quantity: int


class Demand(msgspec.Struct, kw_only=True, frozen=True):
    """An appointment's whole demand at this facility (absolute: repeats converge)."""

    appointment_id: str
    lines: tuple[DemandLine, ...] = ()


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


class DemandSet(msgspec.Struct, kw_only=True, frozen=True, tag="demand"):
    appointment_id: str
    lines: tuple[DemandLine, ...]
    keys: tuple[str, ...]


class POSent(msgspec.Struct, kw_only=True, frozen=True, tag="po_sent"):
    po_id: str
    key: str


class Posted(msgspec.Struct, kw_only=True, frozen=True, tag="posted"):
    appointment_id: str
    amount: str
    key: str


class Acked(msgspec.Struct, kw_only=True, frozen=True, tag="acked"):
    ledger: str
    ack: DownstreamAck


Event = DemandSet | POSent | Posted | Acked


class ErpState(msgspec.Struct, kw_only=True, frozen=True):
    """What the ERP of one facility has been asked for."""

    id: str
    demand: dict[str, tuple[DemandLine, ...]] = msgspec.field(default_factory=dict)
    purchase_orders: tuple[str, ...] = ()
    postings: int = 0
    posted_amount: str = "0"
    ledgers: dict[str, Ledger] = msgspec.field(default_factory=dict)
    owners: dict[str, str] = msgspec.field(default_factory=dict)
    """Pending effect key to its ledger (an appointment id, or ``purchasing``)."""


def initial(entity: str) -> ErpState:
    """A facility with no demand yet."""
    return ErpState(id=entity)


def decide(state: ErpState, command: Command[Any]) -> Accepted[Event] | Rejected:
    """Send ERP what changed; file acknowledgements."""
    p = command.payload
    if isinstance(p, Demand):
        return _demand(state, command, p)
    if isinstance(p, PurchaseOrderRequest):
        if p.quantity <= 0:
            return Rejected(f"purchase order {p.po_id} has quantity {p.quantity}")
        effect = _down(state, command, "purchase_order", msgspec.to_builtins(p))
        return Accepted(events=(POSent(po_id=p.po_id, key=effect.key),), effects=(effect,))
    if isinstance(p, PostingRequest):
        effect = _down(state, command, "posting", msgspec.to_builtins(p))
        event = Posted(appointment_id=p.appointment_id, amount=p.amount, key=effect.key)
        return Accepted(events=(event,), effects=(effect,))
    if isinstance(p, DownstreamAck):
        ledger = state.owners.get(p.effect_key)
        if ledger is None:
            return Accepted()
        return Accepted(events=(Acked(ledger=ledger, ack=p),))
    return Rejected(f"erp does not handle {type(p).__name__}")


def _demand(state: ErpState, command: Command[Any], p: Demand) -> Accepted[Event]:
    old: dict[tuple[str, str], int] = {}
    for line in state.demand.get(p.appointment_id, ()):
        old[(line.item_id, line.date)] = old.get((line.item_id, line.date), 0) + line.quantity
    new: dict[tuple[str, str], int] = {}
    for line in p.lines:
        new[(line.item_id, line.date)] = new.get((line.item_id, line.date), 0) + line.quantity
    effects = []
    for item_id, date in sorted(set(old) | set(new)):
        delta = new.get((item_id, date), 0) - old.get((item_id, date), 0)
        if delta:
            effects.append(
                Effect(
                    target=Downstream("erp", state.id),
                    name="demand",
                    key=f"{command.key}:erp:demand:{item_id}:{date}",
                    payload={
                        "facility_id": state.id,
                        "item_id": item_id,
                        "date": date,
                        "quantity": delta,
                        "appointment_id": p.appointment_id,
                    },
                )
            )
    if not effects:
        return Accepted()
    event = DemandSet(
        appointment_id=p.appointment_id, lines=p.lines, keys=tuple(e.key for e in effects)
    )
    return Accepted(events=(event,), effects=tuple(effects))


def _down(state: ErpState, command: Command[Any], operation: str, payload: Any) -> Effect:
    return Effect(
        target=Downstream("erp", state.id),
        name=operation,
        key=f"{command.key}:erp",
        payload=payload,
    )


def evolve(state: ErpState, event: Event) -> ErpState:
    """Apply one recorded event; never fails."""
    replace = msgspec.structs.replace
    if isinstance(event, Acked):
        ledger = acknowledged(state.ledgers.get(event.ledger, Ledger()), event.ack)
        ledgers = {**state.ledgers, event.ledger: ledger}
        if settled(ledger) and event.ledger != PURCHASING and event.ledger not in state.demand:
            del ledgers[event.ledger]  # no demand left, nothing waiting: done here
        return replace(
            state,
            ledgers=ledgers,
            owners={k: v for k, v in state.owners.items() if k != event.ack.effect_key},
        )
    if isinstance(event, DemandSet):
        name, keys = event.appointment_id, event.keys
        demand = {**state.demand, name: event.lines}
        if not event.lines:
            del demand[name]
        state = replace(state, demand=demand)
    elif isinstance(event, POSent):
        name, keys = PURCHASING, (event.key,)
        state = replace(state, purchase_orders=(*state.purchase_orders, event.po_id))
    else:
        name, keys = event.appointment_id, (event.key,)
        total = _decimal(state.posted_amount) + _decimal(event.amount)
        state = replace(state, postings=state.postings + 1, posted_amount=str(total))
    ledger = state.ledgers.get(name, Ledger())
    return replace(
        state,
        ledgers={**state.ledgers, name: sent(ledger, keys)},
        owners={**state.owners, **dict.fromkeys(keys, name)},
    )


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        return Decimal(0)


KIND: EntityKind[ErpState, Event] = EntityKind(
    name="erp",
    state_type=ErpState,
    commands={
        "demand": Demand,
        "purchase_order": PurchaseOrderRequest,
        "posting": PostingRequest,
        "downstream_ack": DownstreamAck,
    },
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="the ERP conversation of one facility",
)
