"""ERP actor: the ERP conversation of one appointment, keyed by the appointment id.

It owns what goes to ERP for the case: demand planning lines (the appointment sends its whole
demand at a facility; the change per item and date goes downstream, one message per change with
a line per item and date, reversals as negative quantities) and the financial postings of the
supplies it consumed, for the facility's cost center.  Each is sent exactly once, keyed by the
command that asked for it, and tracked in the appointment's sync ledger with ERP.  Purchase
orders are the facility's, not a case's: they go through the purchasing actor
(:mod:`caresync.actors.purchasing`).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from caresync.actors.contract import Accepted, Command, Downstream, Effect, EntityKind, Rejected
from caresync.actors.ledger import DownstreamAck, Ledger, acknowledged, sent


class DemandLine(msgspec.Struct, kw_only=True, frozen=True):
    """A quantity of an item needed at a facility on a date."""

    item_id: str
    date: str
    quantity: int


class Demand(msgspec.Struct, kw_only=True, frozen=True):
    """An appointment's whole demand at one facility (absolute: repeats converge)."""

    facility_id: str
    appointment_id: str = ""
    """Informative (the entity is the appointment)."""
    lines: tuple[DemandLine, ...] = ()


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
    facility_id: str
    lines: tuple[DemandLine, ...]
    keys: tuple[str, ...]


class Posted(msgspec.Struct, kw_only=True, frozen=True, tag="posted"):
    amount: str
    key: str


class Acked(msgspec.Struct, kw_only=True, frozen=True, tag="acked"):
    ack: DownstreamAck


Event = DemandSet | Posted | Acked


class ErpState(msgspec.Struct, kw_only=True, frozen=True):
    """What ERP has been asked for on behalf of one appointment."""

    id: str
    demand: dict[str, tuple[DemandLine, ...]] = msgspec.field(default_factory=dict)
    """Facility id to the case's demand lines there."""
    postings: int = 0
    posted_amount: str = "0"
    ledger: Ledger = msgspec.field(default_factory=Ledger)


def initial(entity: str) -> ErpState:
    """A case with no demand yet."""
    return ErpState(id=entity)


def decide(state: ErpState, command: Command[Any]) -> Accepted[Event] | Rejected:
    """Send ERP what changed; file acknowledgements."""
    p = command.payload
    if isinstance(p, Demand):
        if not p.facility_id:
            return Rejected(f"demand of {state.id} names no facility")
        return _demand(state, command, p)
    if isinstance(p, PostingRequest):
        effect = _down(state, command, "posting", msgspec.to_builtins(p))
        return Accepted(events=(Posted(amount=p.amount, key=effect.key),), effects=(effect,))
    if isinstance(p, DownstreamAck):
        if p.effect_key not in state.ledger.pending and p.effect_key not in state.ledger.failed:
            return Accepted()
        return Accepted(events=(Acked(ack=p),))
    return Rejected(f"erp does not handle {type(p).__name__}")


def _totals(lines: tuple[DemandLine, ...]) -> dict[tuple[str, str], int]:
    totals: dict[tuple[str, str], int] = {}
    for line in lines:
        totals[(line.item_id, line.date)] = totals.get((line.item_id, line.date), 0) + line.quantity
    return totals


def _demand(state: ErpState, command: Command[Any], p: Demand) -> Accepted[Event]:
    old = _totals(state.demand.get(p.facility_id, ()))
    new = _totals(p.lines)
    changes = [
        {"item_id": item_id, "date": date, "quantity": delta}
        for item_id, date in sorted(set(old) | set(new))
        if (delta := new.get((item_id, date), 0) - old.get((item_id, date), 0))
    ]
    if not changes:
        return Accepted()
    # One message per case change, whatever the number of items and dates it touches.
    effect = Effect(
        target=Downstream("erp", state.id),
        name="demand",
        key=f"{command.key}:erp:demand",
        payload={"facility_id": p.facility_id, "appointment_id": state.id, "lines": changes},
    )
    event = DemandSet(facility_id=p.facility_id, lines=p.lines, keys=(effect.key,))
    return Accepted(events=(event,), effects=(effect,))


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
        return replace(state, ledger=acknowledged(state.ledger, event.ack))
    if isinstance(event, DemandSet):
        demand = {**state.demand, event.facility_id: event.lines}
        if not event.lines:
            del demand[event.facility_id]
        return replace(state, demand=demand, ledger=sent(state.ledger, event.keys))
    total = decimal(state.posted_amount) + decimal(event.amount)
    return replace(
        state,
        postings=state.postings + 1,
        posted_amount=str(total),
        ledger=sent(state.ledger, (event.key,)),
    )


def decimal(text: str) -> Decimal:
    """An amount as stored (0 if it is not a number)."""
    try:
        return Decimal(text)
    except InvalidOperation:
        return Decimal(0)


KIND: EntityKind[ErpState, Event] = EntityKind(
    name="erp",
    state_type=ErpState,
    commands={"demand": Demand, "posting": PostingRequest, "downstream_ack": DownstreamAck},
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="the ERP conversation of one appointment",
)
