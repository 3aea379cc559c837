"""Item actor: the stock of one item at one facility, keyed ``<item_id>@<facility_id>``.

It keeps on hand, the reservations of appointments, and the purchase orders on order, and it
decides replenishment: when the projected available stock (on hand + on order − reserved) falls
to or below the reorder point, ERP gets one purchase order for the reorder quantity from the
item's supplier.  Exactly one per crossing: a crossing is the move from above the reorder point
to at-or-below it; the order is numbered by the crossing, so its idempotency key is the same
whatever retries, crashes, replays or ERP outages happen.  The trigger is re-armed only once
the projection is above the reorder point again.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

import msgspec

from caresync.actors.contract import Accepted, ActorRef, Command, Effect, EntityKind, Rejected
from caresync.codecs.scheduling import RequestSupply

POStatus = Literal["requested", "acknowledged", "received"]


# -- commands -------------------------------------------------------------------------------
class SetStock(msgspec.Struct, kw_only=True, frozen=True):
    """A stock count and the replenishment parameters (from a reference-data load)."""

    on_hand: int
    reorder_point: int
    reorder_quantity: int
    refdata_version: int = 0


class Reserve(msgspec.Struct, kw_only=True, frozen=True):
    """Hold ``quantity`` for an appointment (replaces what it held before)."""

    appointment_id: str
    quantity: int


class Release(msgspec.Struct, kw_only=True, frozen=True):
    """Give back everything an appointment held."""

    appointment_id: str


class Consume(msgspec.Struct, kw_only=True, frozen=True):
    """The procedure used ``quantity``: it leaves the shelf and the reservation."""

    appointment_id: str
    quantity: int
    line_id: str = ""


class ReturnStock(msgspec.Struct, kw_only=True, frozen=True):
    """A consumption was credited: the quantity goes back on the shelf."""

    appointment_id: str
    quantity: int


class POAcknowledged(msgspec.Struct, kw_only=True, frozen=True):
    """ERP accepted a purchase order and gave it a reference."""

    po_id: str
    reference: str = ""


class GoodsReceived(msgspec.Struct, kw_only=True, frozen=True):
    """Goods of a purchase order arrived: on order moves to on hand."""

    po_id: str
    quantity: int = 0
    """0 means the whole order."""


# -- events ---------------------------------------------------------------------------------
class StockSet(msgspec.Struct, kw_only=True, frozen=True, tag="stock_set"):
    on_hand: int
    reorder_point: int
    reorder_quantity: int


class Reserved(msgspec.Struct, kw_only=True, frozen=True, tag="reserved"):
    appointment_id: str
    quantity: int


class Released(msgspec.Struct, kw_only=True, frozen=True, tag="released"):
    appointment_id: str


class Consumed(msgspec.Struct, kw_only=True, frozen=True, tag="consumed"):
    appointment_id: str
    quantity: int


class Returned(msgspec.Struct, kw_only=True, frozen=True, tag="returned"):
    appointment_id: str
    quantity: int


class Ordered(msgspec.Struct, kw_only=True, frozen=True, tag="ordered"):
    po_id: str
    quantity: int
    supplier_id: str


class Requested(msgspec.Struct, kw_only=True, frozen=True, tag="requested"):
    """A requisition from a source system (FHIR SupplyRequest) became a purchase order."""

    po_id: str
    quantity: int
    supplier_id: str = ""


class Rearmed(msgspec.Struct, kw_only=True, frozen=True, tag="rearmed"):
    pass


class Acknowledged(msgspec.Struct, kw_only=True, frozen=True, tag="acknowledged"):
    po_id: str
    reference: str


class Received(msgspec.Struct, kw_only=True, frozen=True, tag="received"):
    po_id: str
    quantity: int


Event = (
    StockSet
    | Reserved
    | Released
    | Consumed
    | Returned
    | Ordered
    | Requested
    | Rearmed
    | Acknowledged
    | Received
)


# -- state ----------------------------------------------------------------------------------
class PurchaseOrder(msgspec.Struct, kw_only=True, frozen=True):
    """One replenishment order of this item at this facility."""

    po_id: str
    quantity: int
    supplier_id: str
    status: POStatus = "requested"
    reference: str = ""
    received: int = 0

    @property
    def open_quantity(self) -> int:
        """Still on order."""
        return self.quantity - self.received


class ItemState(msgspec.Struct, kw_only=True, frozen=True):
    """Stock of one item at one facility."""

    id: str
    on_hand: int = 0
    reorder_point: int = 0
    reorder_quantity: int = 0
    reservations: dict[str, int] = msgspec.field(default_factory=dict)
    purchase_orders: tuple[PurchaseOrder, ...] = ()
    crossings: int = 0
    """How many times the projection fell to or below the reorder point: numbers the POs."""
    armed: bool = True
    """True while the projection is above the reorder point: the next crossing orders."""
    consumed: int = 0
    stocked: bool = False
    """Whether a stock count (set_stock) was ever applied; no replenishment before it."""

    @property
    def item_id(self) -> str:
        """The item part of the key."""
        return self.id.rpartition("@")[0]

    @property
    def facility_id(self) -> str:
        """The facility part of the key."""
        return self.id.rpartition("@")[2]

    @property
    def reserved(self) -> int:
        """Total held by appointments."""
        return sum(self.reservations.values())

    @property
    def on_order(self) -> int:
        """Ordered and not yet received."""
        return sum(po.open_quantity for po in self.purchase_orders)

    @property
    def available(self) -> int:
        """Projected available stock: on hand + on order − reserved."""
        return self.on_hand + self.on_order - self.reserved


def initial(entity: str) -> ItemState:
    """An item at a facility nobody has counted yet."""
    return ItemState(id=entity)


def decide(state: ItemState, command: Command[Any]) -> Accepted[Event] | Rejected:
    """Turn one command into events, then apply the replenishment rule."""
    p = command.payload
    events: list[Event]
    first: list[Effect] = []
    if isinstance(p, SetStock):
        if min(p.on_hand, p.reorder_point, p.reorder_quantity) < 0:
            return Rejected(f"stock of {state.id}: negative value in {p}")
        events = [
            StockSet(
                on_hand=p.on_hand,
                reorder_point=p.reorder_point,
                reorder_quantity=p.reorder_quantity,
            )
        ]
    elif isinstance(p, Reserve):
        if p.quantity < 0:
            return Rejected(f"reservation of {p.quantity} {state.id} is negative")
        events = [Reserved(appointment_id=p.appointment_id, quantity=p.quantity)]
    elif isinstance(p, Release):
        events = [Released(appointment_id=p.appointment_id)]
    elif isinstance(p, Consume):
        if p.quantity <= 0:
            return Rejected(f"consumption of {p.quantity} {state.id} is not positive")
        if not p.appointment_id:  # its cost is posted to the appointment's ERP actor
            return Rejected(f"consumption of {state.id} names no appointment")
        events = [Consumed(appointment_id=p.appointment_id, quantity=p.quantity)]
    elif isinstance(p, ReturnStock):
        if p.quantity <= 0:
            return Rejected(f"return of {p.quantity} {state.id} is not positive")
        if not p.appointment_id:
            return Rejected(f"return of {state.id} names no appointment")
        events = [Returned(appointment_id=p.appointment_id, quantity=p.quantity)]
    elif isinstance(p, POAcknowledged):
        if not _po(state, p.po_id):
            return Rejected(f"purchase order {p.po_id} is not one of {state.id}")
        events = [Acknowledged(po_id=p.po_id, reference=p.reference)]
    elif isinstance(p, GoodsReceived):
        # A source's delivery names a requisition's order by the request (FHIR basedOn).
        po = _po(state, p.po_id) or _po(state, _request_po(state, p.po_id))
        if po is None:
            return Rejected(f"purchase order {p.po_id} is not one of {state.id}")
        quantity = p.quantity or po.open_quantity
        if quantity <= 0 or quantity > po.open_quantity:
            return Rejected(
                f"purchase order {p.po_id} has {po.open_quantity} open, cannot receive {quantity}"
            )
        events = [Received(po_id=po.po_id, quantity=quantity)]
    elif isinstance(p, RequestSupply):
        if p.quantity <= 0:
            return Rejected(f"requisition {p.request_id} of {state.id}: quantity is not positive")
        if _po(state, _request_po(state, p.request_id)) is not None:
            return Accepted()  # the same requisition again: it already has its order
        requested, effect = _requisition(state, command, p)
        events, first = [requested], [effect]
    else:
        return Rejected(f"item does not handle {type(p).__name__}")
    after = apply_all(state, events)
    more, effects = _replenish(after, command)
    effects = first + effects
    events += more
    after = apply_all(after, more)
    consumed = next((e for e in events if isinstance(e, Consumed)), None)
    if consumed is not None:
        effects.append(_posting(after, command, consumed))
    returned = next((e for e in events if isinstance(e, Returned)), None)
    if returned is not None:  # the cost posted for it is reversed
        reversal = Consumed(appointment_id=returned.appointment_id, quantity=-returned.quantity)
        effects.append(_posting(after, command, reversal))
    return Accepted(events=tuple(events), effects=tuple(effects))


def _po(state: ItemState, po_id: str) -> PurchaseOrder | None:
    return next((po for po in state.purchase_orders if po.po_id == po_id), None)


def _replenish(state: ItemState, command: Command[Any]) -> tuple[list[Event], list[Effect]]:
    """The replenishment rule: order on a crossing, re-arm above the reorder point — also
    right after an order that lifts the projection above it, so that the next fall is a new
    crossing."""
    if not state.stocked:
        return [], []
    if state.available > state.reorder_point:
        return ([Rearmed()] if not state.armed else []), []
    if not state.armed or state.reorder_quantity <= 0:
        return [], []
    ordered, effect = _order(state, command)
    if evolve(state, ordered).available > state.reorder_point:
        return [ordered, Rearmed()], [effect]
    return [ordered], [effect]


def _order(state: ItemState, command: Command[Any]) -> tuple[Ordered, Effect]:
    """The purchase order of the next crossing."""
    crossing = state.crossings + 1
    po_id = f"PO:{state.id}:{crossing}"
    item = command.refdata.item(state.item_id) if command.refdata is not None else None
    supplier_id = item.supplier_id if item is not None else ""
    unit_cost = str(item.unit_cost) if item is not None else ""
    ordered = Ordered(po_id=po_id, quantity=state.reorder_quantity, supplier_id=supplier_id)
    return ordered, Effect(
        target=ActorRef("purchasing", state.facility_id),
        name="purchase_order",
        # Keyed by the crossing, not by the command: the same crossing is the same order.
        key=f"po:{state.id}:{crossing}",
        payload={
            "po_id": po_id,
            "facility_id": state.facility_id,
            "item_id": state.item_id,
            "supplier_id": supplier_id,
            "quantity": state.reorder_quantity,
            "unit_cost": unit_cost,
        },
    )


def _request_po(state: ItemState, request_id: str) -> str:
    return f"REQ:{state.id}:{request_id}"


def _requisition(
    state: ItemState, command: Command[Any], p: RequestSupply
) -> tuple[Requested, Effect]:
    """A source system asked for stock: one purchase order keyed by the requisition."""
    po_id = _request_po(state, p.request_id)
    item = command.refdata.item(state.item_id) if command.refdata is not None else None
    supplier_id = item.supplier_id if item is not None else ""
    event = Requested(po_id=po_id, quantity=p.quantity, supplier_id=supplier_id)
    effect = Effect(
        target=ActorRef("purchasing", state.facility_id),
        name="purchase_order",
        key=f"req:{state.id}:{p.request_id}",
        payload={
            "po_id": po_id,
            "facility_id": state.facility_id,
            "item_id": state.item_id,
            "supplier_id": supplier_id,
            "quantity": p.quantity,
            "unit_cost": str(item.unit_cost) if item is not None else "",
        },
    )
    return event, effect


def _posting(state: ItemState, command: Command[Any], consumed: Consumed) -> Effect:
    """The cost of what was consumed, for the facility's cost center in ERP."""
    refdata = command.refdata
    item = refdata.item(state.item_id) if refdata is not None else None
    facility = refdata.facility(state.facility_id) if refdata is not None else None
    unit_cost = Decimal(str(item.unit_cost)) if item is not None else Decimal(0)
    return Effect(
        target=ActorRef("erp", consumed.appointment_id),
        name="posting",
        key=f"{command.key}:posting:{state.id}",
        payload={
            "facility_id": state.facility_id,
            "cost_center": facility.cost_center if facility is not None else "",
            "item_id": state.item_id,
            "appointment_id": consumed.appointment_id,
            "quantity": consumed.quantity,
            "unit_cost": str(unit_cost),
            "amount": str(unit_cost * consumed.quantity),
        },
    )


def apply_all(state: ItemState, events: list[Event]) -> ItemState:
    """Fold events (used by ``decide`` to look at the state after them)."""
    for event in events:
        state = evolve(state, event)
    return state


def evolve(state: ItemState, event: Event) -> ItemState:
    """Apply one recorded event; never fails."""
    replace = msgspec.structs.replace
    if isinstance(event, StockSet):
        return replace(
            state,
            on_hand=event.on_hand,
            reorder_point=event.reorder_point,
            reorder_quantity=event.reorder_quantity,
            stocked=True,
        )
    if isinstance(event, Reserved):
        reservations = {**state.reservations, event.appointment_id: event.quantity}
        if event.quantity == 0:
            del reservations[event.appointment_id]
        return replace(state, reservations=reservations)
    if isinstance(event, Released):
        return replace(state, reservations=_without(state.reservations, event.appointment_id))
    if isinstance(event, Consumed):
        held = state.reservations.get(event.appointment_id, 0)
        reservations = _without(state.reservations, event.appointment_id)
        if held > event.quantity:
            reservations[event.appointment_id] = held - event.quantity
        return replace(
            state,
            on_hand=state.on_hand - event.quantity,
            reservations=reservations,
            consumed=state.consumed + event.quantity,
        )
    if isinstance(event, Returned):
        return replace(
            state,
            on_hand=state.on_hand + event.quantity,
            consumed=state.consumed - event.quantity,
        )
    if isinstance(event, Ordered):
        po = PurchaseOrder(
            po_id=event.po_id, quantity=event.quantity, supplier_id=event.supplier_id
        )
        return replace(
            state,
            purchase_orders=(*state.purchase_orders, po),
            crossings=state.crossings + 1,
            armed=False,
        )
    if isinstance(event, Requested):
        po = PurchaseOrder(
            po_id=event.po_id, quantity=event.quantity, supplier_id=event.supplier_id
        )
        return replace(state, purchase_orders=(*state.purchase_orders, po))
    if isinstance(event, Rearmed):
        return replace(state, armed=True)
    if isinstance(event, Acknowledged):
        return replace(
            state,
            purchase_orders=tuple(
                replace(po, status="acknowledged", reference=event.reference)
                if po.po_id == event.po_id and po.status == "requested"
                else po
                for po in state.purchase_orders
            ),
        )
    # Received
    orders = []
    on_hand = state.on_hand
    for po in state.purchase_orders:
        if po.po_id == event.po_id:
            received = po.received + event.quantity
            status: POStatus = "received" if received >= po.quantity else po.status
            po = replace(po, received=received, status=status)
            on_hand += event.quantity
        orders.append(po)
    return replace(state, purchase_orders=tuple(orders), on_hand=on_hand)


def _without(reservations: dict[str, int], appointment_id: str) -> dict[str, int]:
    return {k: v for k, v in reservations.items() if k != appointment_id}


KIND: EntityKind[ItemState, Event] = EntityKind(
    name="item",
    state_type=ItemState,
    commands={
        "set_stock": SetStock,
        "reserve": Reserve,
        "release": Release,
        "consume": Consume,
        "return_stock": ReturnStock,
        "po_acknowledged": POAcknowledged,
        "goods_received": GoodsReceived,
        "request": RequestSupply,
    },
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="stock of one item at one facility",
)
