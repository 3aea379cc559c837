"""The item actor: stock, reservations, consumption, and replenishment exactly once per crossing."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from caresync.actors import (
    Accepted,
    ActorRef,
    Command,
    Downstream,
    Effect,
    Rejected,
    item,
    purchasing,
)
from caresync.actors.item import (
    Consume,
    GoodsReceived,
    ItemState,
    POAcknowledged,
    Release,
    Reserve,
    ReturnStock,
    SetStock,
)

T0 = datetime(2027, 1, 1, tzinfo=UTC)
KEY = "gauze@MAIN-OR"


@dataclass(frozen=True)
class FakeItem:
    supplier_id: str = "SUP-1"
    unit_cost: Decimal = Decimal("1.25")


@dataclass(frozen=True)
class FakeFacility:
    cost_center: str = "CC-100"


class FakeRefData:
    """The two lookups the item actor uses (the real RefData has more)."""

    def item(self, item_id: str) -> FakeItem | None:
        return FakeItem() if item_id == "gauze" else None

    def facility(self, facility_id: str) -> FakeFacility | None:
        return FakeFacility() if facility_id == "MAIN-OR" else None


REFDATA = FakeRefData()
_ids = iter(range(1_000_000))


def cmd(name: str, payload: Any, id: str | None = None) -> Command[Any]:
    return Command(
        id=id or f"c{next(_ids)}",
        name=name,
        entity=KEY,
        occurred_at=T0,
        payload=payload,
        refdata=REFDATA,
    )


def run(
    state: ItemState, name: str, payload: Any, id: str | None = None
) -> tuple[ItemState, Accepted[Any]]:
    decision = item.decide(state, cmd(name, payload, id))
    assert isinstance(decision, Accepted), decision
    return item.KIND.apply(state, decision.events), decision


def stocked(on_hand: int = 20, rp: int = 10, rq: int = 50) -> ItemState:
    state, decision = run(
        item.initial(KEY),
        "set_stock",
        SetStock(on_hand=on_hand, reorder_point=rp, reorder_quantity=rq),
    )
    assert len(purchase_orders(decision)) == (1 if on_hand <= rp else 0)
    return state


def purchase_orders(decision: Accepted[Any]) -> list[Effect]:
    return [e for e in decision.effects if e.name == "purchase_order"]


def test_reservations_and_consumption_move_the_projection() -> None:
    state = stocked(on_hand=20)
    state, _ = run(state, "reserve", Reserve(appointment_id="A1", quantity=4))
    state, _ = run(state, "reserve", Reserve(appointment_id="A2", quantity=3))
    assert (state.reserved, state.available) == (7, 13)
    state, _ = run(state, "consume", Consume(appointment_id="A1", quantity=3))
    # consumption leaves the shelf and the appointment's reservation
    assert (state.on_hand, state.reservations, state.consumed) == (17, {"A1": 1, "A2": 3}, 3)
    state, _ = run(state, "release", Release(appointment_id="A1"))
    assert state.reservations == {"A2": 3}
    # a repeated release changes nothing
    again, _ = run(state, "release", Release(appointment_id="A1"))
    assert again.reservations == state.reservations


def test_consumption_posts_its_cost_to_the_facility_cost_center() -> None:
    state = stocked(on_hand=30)
    _, decision = run(state, "consume", Consume(appointment_id="A1", quantity=4), id="dft-1")
    [posting] = [e for e in decision.effects if e.name == "posting"]
    assert posting.target == ActorRef("erp", "A1")  # the appointment's ERP conversation
    assert posting.key == f"{KEY}/dft-1:posting:{KEY}"
    assert posting.payload["amount"] == "5.00"
    assert posting.payload["cost_center"] == "CC-100"


def test_falling_to_the_reorder_point_orders_once_for_the_reorder_quantity() -> None:
    state = stocked(on_hand=14, rp=10, rq=50)
    state, decision = run(state, "reserve", Reserve(appointment_id="A1", quantity=3))
    assert purchase_orders(decision) == []  # 11 > 10
    state, decision = run(state, "reserve", Reserve(appointment_id="A2", quantity=1))
    [po] = purchase_orders(decision)  # 10 <= 10: a crossing
    assert po.target == ActorRef("purchasing", "MAIN-OR")  # the facility's purchasing
    assert po.key == f"po:{KEY}:1"
    assert po.payload["quantity"] == 50
    assert po.payload["supplier_id"] == "SUP-1"
    assert (state.on_order, state.available, state.crossings) == (50, 60, 1)
    # further drops while the order is out do not order again
    for n in range(3, 20):
        state, decision = run(state, "reserve", Reserve(appointment_id=f"A{n}", quantity=1))
        if state.available <= state.reorder_point:
            break
    assert sum(len(purchase_orders(d)) for d in [decision]) <= 1


def test_a_new_crossing_after_recovery_orders_again_with_a_new_key() -> None:
    state = stocked(on_hand=11, rp=10, rq=5)
    state, d1 = run(state, "consume", Consume(appointment_id="A1", quantity=1))
    assert [e.key for e in purchase_orders(d1)] == [f"po:{KEY}:1"]
    # 10 on hand + 5 on order = 15 > 10: the next command re-arms the trigger
    state, _ = run(state, "reserve", Reserve(appointment_id="A2", quantity=0))
    assert state.armed
    state, d2 = run(state, "consume", Consume(appointment_id="A3", quantity=5))
    assert [e.key for e in purchase_orders(d2)] == [f"po:{KEY}:2"]


def test_goods_received_moves_on_order_to_on_hand_and_acks_are_recorded() -> None:
    state = stocked(on_hand=10, rp=10, rq=50)  # the count itself is a crossing
    assert state.crossings == 1
    po_id = state.purchase_orders[0].po_id
    state, _ = run(state, "po_acknowledged", POAcknowledged(po_id=po_id, reference="PO-000007"))
    assert state.purchase_orders[0].status == "acknowledged"
    assert state.purchase_orders[0].reference == "PO-000007"
    state, _ = run(state, "goods_received", GoodsReceived(po_id=po_id, quantity=20))
    assert (state.on_hand, state.on_order) == (30, 30)
    state, _ = run(state, "goods_received", GoodsReceived(po_id=po_id))
    assert (state.on_hand, state.on_order, state.purchase_orders[0].status) == (60, 0, "received")
    over = item.decide(state, cmd("goods_received", GoodsReceived(po_id=po_id, quantity=1)))
    assert isinstance(over, Rejected)
    assert "0 open" in over.reason


@pytest.mark.parametrize(
    ("name", "payload", "fragment"),
    [
        ("reserve", Reserve(appointment_id="A1", quantity=-1), "negative"),
        ("consume", Consume(appointment_id="A1", quantity=0), "not positive"),
        # the cost goes to the appointment's ERP actor: no appointment, no actor to send it to
        ("consume", Consume(appointment_id="", quantity=1), "names no appointment"),
        ("return_stock", ReturnStock(appointment_id="", quantity=1), "names no appointment"),
        ("po_acknowledged", POAcknowledged(po_id="PO:nope"), "is not one of"),
        ("set_stock", SetStock(on_hand=-5, reorder_point=1, reorder_quantity=1), "negative"),
    ],
)
def test_bad_commands_are_rejected_with_a_reason(name: str, payload: Any, fragment: str) -> None:
    decision = item.decide(stocked(), cmd(name, payload))
    assert isinstance(decision, Rejected)
    assert fragment in decision.reason


def test_no_replenishment_before_a_stock_count() -> None:
    state, decision = run(item.initial(KEY), "reserve", Reserve(appointment_id="A1", quantity=5))
    assert purchase_orders(decision) == []
    assert state.available == -5


def test_purchasing_sends_each_purchase_order_to_erp_keyed_by_the_request() -> None:
    state = stocked(on_hand=10)
    counted = item.decide(
        item.initial(KEY),
        cmd("set_stock", SetStock(on_hand=10, reorder_point=10, reorder_quantity=50)),
    )
    assert isinstance(counted, Accepted)
    [po] = counted.effects
    assert po.target == ActorRef("purchasing", "MAIN-OR")
    request = Command(
        id=po.key,
        name="purchase_order",
        entity="MAIN-OR",
        occurred_at=T0,
        payload=purchasing.PurchaseOrderRequest(**po.payload),
    )
    decision = purchasing.decide(purchasing.initial("MAIN-OR"), request)
    assert isinstance(decision, Accepted)
    [down] = decision.effects
    assert down.target == Downstream("erp", "MAIN-OR")
    assert down.name == "purchase_order"
    assert down.key == f"MAIN-OR/po:{KEY}:1:erp"
    assert down.payload["po_id"] == state.purchase_orders[0].po_id
    after = purchasing.KIND.apply(purchasing.initial("MAIN-OR"), decision.events)
    assert (after.orders, after.ledger.pending) == (1, (down.key,))
    # deciding the same request again gives the same order under the same key
    assert purchasing.decide(purchasing.initial("MAIN-OR"), request) == decision


def test_random_walks_order_exactly_once_per_crossing() -> None:
    """Model check: count crossings independently and compare with the orders placed."""
    for seed in range(300):
        rng = random.Random(seed)
        rp, rq = rng.randint(0, 10), rng.randint(1, 15)
        state = stocked(on_hand=rng.randint(0, 30), rp=rp, rq=rq)
        orders = len(state.purchase_orders)
        expected = 1 if state.on_hand <= rp else 0
        # an order that lifts the projection above the reorder point re-arms the trigger
        armed = not expected or state.on_hand + rq > rp
        for step in range(60):
            before = state
            op = rng.random()
            if op < 0.35:
                payload: Any = Reserve(
                    appointment_id=f"A{rng.randint(0, 5)}", quantity=rng.randint(0, 6)
                )
                name = "reserve"
            elif op < 0.55:
                payload, name = Release(appointment_id=f"A{rng.randint(0, 5)}"), "release"
            elif op < 0.8:
                payload, name = (
                    Consume(appointment_id=f"A{rng.randint(0, 5)}", quantity=rng.randint(1, 4)),
                    "consume",
                )
            else:
                open_pos = [p for p in state.purchase_orders if p.open_quantity > 0]
                if not open_pos:
                    continue
                payload, name = GoodsReceived(po_id=rng.choice(open_pos).po_id), "goods_received"
            state, decision = run(state, name, payload, id=f"s{seed}-{step}")
            placed = len(purchase_orders(decision))
            # independent model of the rule, on the projection after the command's own events
            projected = state.available - sum(
                e.payload["quantity"] for e in purchase_orders(decision)
            )
            if projected > rp:
                armed = True
            elif armed:
                expected += 1
                armed = projected + rq > rp
            orders += placed
            assert placed <= 1, (seed, step)
            assert orders == expected == state.crossings, (seed, step, before, state)


def test_a_requisition_orders_once_keyed_by_the_request_and_keeps_the_crossing_count() -> None:
    from caresync.codecs.scheduling import RequestSupply

    state = stocked(on_hand=40)
    after, decision = run(state, "request", RequestSupply(request_id="SR-7", quantity=12))
    orders = purchase_orders(decision)
    assert [(e.key, e.payload["quantity"], e.payload["supplier_id"]) for e in orders] == [
        (f"req:{KEY}:SR-7", 12, "SUP-1")
    ]
    assert after.on_order == 12
    assert after.crossings == state.crossings
    assert after.armed
    again, repeat = run(after, "request", RequestSupply(request_id="SR-7", quantity=12))
    assert repeat.events == ()
    assert repeat.effects == ()
    assert again == after
    # the order is received like any other
    po_id = orders[0].payload["po_id"]
    received, _ = run(again, "goods_received", GoodsReceived(po_id=po_id))
    assert received.on_hand == 52
    assert received.on_order == 0
    # a source's delivery may name the order by its requisition (FHIR basedOn)
    by_request, _ = run(again, "goods_received", GoodsReceived(po_id="SR-7", quantity=5))
    assert by_request.on_hand == 45
    assert by_request.on_order == 7
    refused = item.decide(after, cmd("request", RequestSupply(request_id="SR-8", quantity=0)))
    assert isinstance(refused, Rejected)
    assert "SR-8" in refused.reason
