"""The core scenario on the pure actors (PRODUCT.md): book, reschedule, cancel, complete,
coverage, charges, replenishment and the sync ledger — no broker, every step checked."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from workflow_network import T0, Network

from caresync.actors import Downstream
from caresync.actors.appointment import AppointmentState


def book(
    net: Network,
    appt: str = "A1",
    *,
    procedures: Any = None,
    facility: str = "MAIN",
    payer: str = "ACME",
    provider: str = "",
    visit: str = "",
    id: str = "b1",
    start: str = "2027-03-10T08:00:00+00:00",
) -> None:
    net.send(
        "appointment",
        appt,
        "book",
        {
            "procedures": procedures or [{"code": "27447", "provider_id": provider}],
            "facility_id": facility,
            "start": start,
            "duration_min": 90,
            "room": "OR-1",
            "providers": [provider] if provider else [],
            "patient_class": "O",
            "patient_id": "P1",
            "visit_number": visit,
            "payer_id": payer,
        },
        id=id,
    )


def appt(net: Network, appt_id: str = "A1") -> AppointmentState:
    state: AppointmentState = net.state("appointment", appt_id)
    return state


def test_booking_reserves_the_card_plans_demand_and_evaluates_readiness() -> None:
    net = Network()
    book(net)
    a = appt(net)
    assert a.status == "booked"
    assert [(r.item_id, r.quantity) for r in a.plan.reservations] == [("gauze", 4), ("knee-kit", 1)]
    assert a.plan.readiness == "ready"
    assert net.state("item", "gauze@MAIN").reservations == {"A1": 4}
    assert net.state("item", "knee-kit@MAIN").reservations == {"A1": 1}
    assert set(net.state("erp", "A1").demand) == {"MAIN"}
    demand = net.state("erp", "A1").demand["MAIN"]
    assert [(d.item_id, d.date, d.quantity) for d in demand] == [
        ("gauze", "2027-03-10", 4),
        ("knee-kit", "2027-03-10", 1),
    ]
    assert net.state("supply", "A1").reservations == {"MAIN": {"gauze": 4, "knee-kit": 1}}
    # One message per system and operation, a line per item (or item and date).
    assert [(e.key, e.payload) for e in net.sent("supply", "reservation")] == [
        (
            "A1/A1/b1:supply:MAIN:supply:reservation",
            {
                "facility_id": "MAIN",
                "appointment_id": "A1",
                "lines": [
                    {"item_id": "gauze", "quantity": 4},
                    {"item_id": "knee-kit", "quantity": 1},
                ],
            },
        )
    ]
    assert {e.target for e in net.sent("supply") + net.sent("erp")} == {
        Downstream("supply", "A1"),
        Downstream("erp", "A1"),
    }
    assert [e.payload["readiness"] for e in net.sent("billing", "readiness")] == ["ready"]
    assert [(e.key, e.payload) for e in net.sent("erp", "demand")] == [
        (
            "A1/A1/b1:erp:MAIN:erp:demand",
            {
                "facility_id": "MAIN",
                "appointment_id": "A1",
                "lines": [
                    {"item_id": "gauze", "date": "2027-03-10", "quantity": 4},
                    {"item_id": "knee-kit", "date": "2027-03-10", "quantity": 1},
                ],
            },
        )
    ]
    assert net.state("erp", "A1").ledger.pending == ("A1/A1/b1:erp:MAIN:erp:demand",)


def test_a_provider_specific_card_wins_over_the_general_one() -> None:
    net = Network()
    book(net, provider="DR-WHO")
    assert [(r.item_id, r.quantity) for r in appt(net).plan.reservations] == [("gauze", 6)]


def test_readiness_follows_payer_rules_and_coverage_arrives_from_the_visit() -> None:
    net = Network()
    book(net, "A1", payer="STRICT", id="b1")
    book(net, "A2", payer="CHEAP", procedures=[{"code": "66984"}], id="b2")
    assert appt(net, "A1").plan.readiness == "pending_authorization"
    assert appt(net, "A2").plan.readiness == "not_covered"
    book(net, "A3", payer="", visit="V9", id="b3")
    assert appt(net, "A3").plan.readiness == "pending_coverage"
    net.send("visit", "V9", "register", {"payer_id": "ACME", "patient_class": "O"}, id="adt-1")
    assert appt(net, "A3").plan.readiness == "ready"
    assert net.state("billing", "A3").readiness == "ready"
    # a visit registered before the booking passes its coverage on at the link
    net.send("visit", "V10", "register", {"payer_id": "STRICT"}, id="adt-2")
    book(net, "A4", payer="", visit="V10", id="b4")
    assert appt(net, "A4").plan.readiness == "pending_authorization"


def test_reschedule_moves_reservations_and_demand_to_the_new_date_and_facility() -> None:
    net = Network()
    book(net)
    net.send(
        "appointment",
        "A1",
        "reschedule",
        {"start": "2027-03-20T09:00:00+00:00", "facility_id": "NORTH"},
        id="r1",
    )
    assert net.state("item", "gauze@MAIN").reservations == {}
    assert net.state("item", "gauze@NORTH").reservations == {"A1": 4}
    assert set(net.state("erp", "A1").demand) == {"NORTH"}
    assert {d.date for d in net.state("erp", "A1").demand["NORTH"]} == {"2027-03-20"}
    assert net.state("supply", "A1").reservations == {"NORTH": {"gauze": 4, "knee-kit": 1}}
    main_demand = [
        (line["item_id"], line["date"], line["quantity"])
        for line in net.lines("erp", "demand")
        if line["facility_id"] == "MAIN"
    ]
    assert main_demand == [  # planned, then reversed
        ("gauze", "2027-03-10", 4),
        ("knee-kit", "2027-03-10", 1),
        ("gauze", "2027-03-10", -4),
        ("knee-kit", "2027-03-10", -1),
    ]
    assert len(net.sent("erp", "demand")) == 3  # booked; reversed at MAIN; planned at NORTH


def test_a_late_older_message_does_not_overwrite_newer_state() -> None:
    net = Network()
    book(net)
    net.send(
        "appointment",
        "A1",
        "reschedule",
        {"start": "2027-03-20T09:00:00+00:00"},
        id="r2",
        at=T0 + timedelta(hours=5),
    )
    net.send(
        "appointment",
        "A1",
        "reschedule",
        {"start": "2027-03-15T09:00:00+00:00"},
        id="r1",
        at=T0 + timedelta(hours=4),
    )  # older, arrives late
    assert appt(net).details is not None
    assert appt(net).details.start.day == 20  # type: ignore[union-attr]
    assert net.rejected == []


def test_cancel_no_show_and_delete_release_everything_and_flag_billing_reversal() -> None:
    for name, status in (("cancel", "cancelled"), ("no_show", "no_show"), ("delete", "deleted")):
        net = Network()
        book(net)
        net.send("appointment", "A1", name, {"reason": "x"}, id=f"{name}-1")
        assert appt(net).status == status
        assert net.state("item", "gauze@MAIN").reservations == {}
        assert net.state("erp", "A1").demand == {}
        assert net.state("supply", "A1").reservations == {}
        assert len(net.sent("billing", "reversal")) == 1
        assert sum(line["quantity"] for line in net.lines("supply", "reservation")) == 0
        assert len(net.sent("supply", "reservation")) == 2  # reserved, then released


def test_charges_capture_billing_consume_by_charge_code_and_post_cost() -> None:
    net = Network()
    net.send(
        "item",
        "gauze@MAIN",
        "set_stock",
        {"on_hand": 10, "reorder_point": 5, "reorder_quantity": 40},
        id="stock-1",
    )
    book(net)
    net.send(
        "appointment",
        "A1",
        "post_charges",
        {
            "lines": [
                {"line_id": "L1", "code": "27447", "amount": "5000.00"},
                {"line_id": "L2", "code": "C-GAUZE", "quantity": 3, "amount": "7.50"},
            ]
        },
        id="dft-1",
    )
    a = appt(net)
    assert a.status == "completed"
    gauze = net.state("item", "gauze@MAIN")
    assert gauze.on_hand == 7
    assert gauze.reservations == {}  # 4 reserved, 3 consumed, the rest released once performed
    assert net.state("billing", "A1").total == 5007.5
    assert [e.payload["amount"] for e in net.sent("erp", "posting")] == ["7.50"]
    assert [line["quantity"] for line in net.lines("supply", "consumption")] == [3]
    # a credit reverses its charge line
    net.send(
        "appointment",
        "A1",
        "post_charges",
        {
            "lines": [
                {
                    "line_id": "L3",
                    "code": "C-GAUZE",
                    "type": "credit",
                    "quantity": 1,
                    "amount": "2.50",
                    "reverses": "L2",
                }
            ]
        },
        id="dft-2",
    )
    assert net.state("billing", "A1").total == 5005
    assert len(net.sent("billing", "credit")) == 1
    # the same charge message again changes nothing
    before = len(net.downstream)
    net.send(
        "appointment",
        "A1",
        "post_charges",
        {"lines": [{"line_id": "L1", "code": "27447", "amount": "5000.00"}]},
        id="dft-1-resend",
    )
    assert len(net.downstream) == before


def test_consumption_crossing_the_reorder_point_raises_exactly_one_po() -> None:
    net = Network()
    net.send(
        "item",
        "knee-kit@MAIN",
        "set_stock",
        {"on_hand": 3, "reorder_point": 1, "reorder_quantity": 5},
        id="stock-1",
    )
    for n in range(1, 4):
        book(net, f"A{n}", id=f"b{n}")
    # 3 on hand, 3 reserved: available 0 <= 1 -> one PO at the third booking
    pos = net.sent("erp", "purchase_order")
    assert len(pos) == 1
    assert pos[0].target == Downstream("erp", "MAIN")  # the facility's purchasing conversation
    assert pos[0].payload["supplier_id"] == "SUP-B"
    assert pos[0].payload["quantity"] == 5
    for n in range(1, 4):
        net.send(
            "appointment",
            f"A{n}",
            "post_charges",
            {"lines": [{"line_id": f"K{n}", "code": "C-KNEE", "amount": "1200"}]},
            id=f"dft-{n}",
        )
    assert len(net.sent("erp", "purchase_order")) == 1  # same crossing, no second order
    item = net.state("item", "knee-kit@MAIN")
    assert (item.on_hand, item.on_order) == (0, 5)
    po_id = item.purchase_orders[0].po_id
    net.send("item", "knee-kit@MAIN", "goods_received", {"po_id": po_id}, id="grn-1")
    assert net.state("item", "knee-kit@MAIN").on_hand == 5
    assert [e.payload["po_id"] for e in net.sent("erp", "purchase_order")] == [po_id]
    assert net.state("purchasing", "MAIN").orders == 1


def test_a_booking_without_a_preference_card_is_accepted_and_flagged() -> None:
    net = Network()
    book(net, procedures=[{"code": "99999"}, {"code": "66984"}])
    a = appt(net)
    assert a.status == "booked"
    assert a.plan.missing_cards == ("99999",)
    assert [(r.item_id, r.quantity) for r in a.plan.reservations] == [("lens", 1)]


def test_the_sync_ledger_goes_pending_then_in_sync_or_failed() -> None:
    net = Network()
    book(net)
    assert net.state("billing", "A1").ledger.state == "pending"
    assert net.state("supply", "A1").ledger.state == "pending"
    assert net.state("erp", "A1").ledger.state == "pending"
    net.ack_all()
    billing = net.state("billing", "A1").ledger
    assert (billing.state, billing.wanted, billing.acked) == ("in_sync", 1, 1)
    supply = net.state("supply", "A1").ledger
    # One reservation for the card's two items, one demand for their two lines.
    assert (supply.state, supply.wanted, supply.acked) == ("in_sync", 1, 1)
    erp = net.state("erp", "A1").ledger
    assert (erp.state, erp.wanted, erp.acked) == ("in_sync", 1, 1)
    net.downstream.clear()
    net.send("appointment", "A1", "cancel", {}, id="c1")
    for effect in net.sent("billing"):
        net.send(
            "billing",
            "A1",
            "downstream_ack",
            {
                "effect_key": effect.key,
                "system": "billing",
                "outcome": "failed",
                "error": "claim locked",
            },
            id=f"ack:{effect.key}",
        )
    billing = net.state("billing", "A1").ledger
    assert (billing.state, billing.last_error) == ("failed", "claim locked")


def test_claim_status_flows_back_to_billing() -> None:
    net = Network()
    book(net)
    net.send(
        "billing",
        "A1",
        "claim_status",
        {"appointment_id": "A1", "status": "denied", "claim_id": "CLM-1", "reason": "no auth"},
        id="clm-1",
    )
    state = net.state("billing", "A1")
    assert (state.claim_status, state.claim_id, state.claim_reason) == (
        "denied",
        "CLM-1",
        "no auth",
    )


def test_no_facility_actor_grows_with_the_appointments_it_sees() -> None:
    # Supply and ERP conversations are per appointment; only purchasing is per facility, and it
    # keeps a count and the orders still waiting, not every order or appointment.
    net = Network()
    for n in range(1, 4):
        book(net, f"A{n}", id=f"b{n}")
    net.ack_all()
    assert net.state("supply", "A1").reservations == {"MAIN": {"gauze": 4, "knee-kit": 1}}
    net.downstream.clear()
    for n in range(1, 4):
        net.send("appointment", f"A{n}", "cancel", {}, id=f"c{n}")
    net.ack_all()
    for n in range(1, 4):
        supply, erp = net.state("supply", f"A{n}"), net.state("erp", f"A{n}")
        assert (supply.reservations, supply.consumed, erp.demand) == ({}, {}, {})
        assert (supply.ledger.pending, supply.ledger.failed) == ((), ())
        assert (erp.ledger.pending, erp.ledger.failed) == ((), ())
        assert supply.ledger.state == erp.ledger.state == "in_sync"
    assert not [k for k in net.states if k[0] in ("supply", "erp") and k[1] in ("MAIN", "NORTH")]
    view_state = net.state("billing", "A1").ledger
    assert view_state.state == "in_sync"


def test_ledger_references_are_capped() -> None:
    from caresync.actors.ledger import MAX_REFERENCES, DownstreamAck, Ledger, acknowledged, sent

    ledger = Ledger()
    for n in range(3 * MAX_REFERENCES):
        ledger = sent(ledger, (f"k{n}",))
        ledger = acknowledged(
            ledger,
            DownstreamAck(effect_key=f"k{n}", system="erp", outcome="created", reference=f"R{n}"),
        )
    assert len(ledger.references) == MAX_REFERENCES
    assert ledger.references[f"k{3 * MAX_REFERENCES - 1}"] == f"R{3 * MAX_REFERENCES - 1}"
    assert (ledger.wanted, ledger.acked, ledger.state) == (60, 60, "in_sync")


def test_each_procedure_records_its_card_and_its_charges() -> None:
    net = Network()
    book(net, procedures=[{"code": "27447", "provider_id": "DR-WHO"}, {"code": "66984"}])
    knee = net.state("procedure", "A1#27447")
    assert (knee.view.card_source, knee.view.provider_id) == ("provider", "DR-WHO")
    assert [(c.item_id, c.quantity) for c in knee.view.card] == [("gauze", 6)]
    assert net.state("procedure", "A1#66984").view.card_source == "general"
    assert not knee.performed
    net.send(
        "appointment",
        "A1",
        "post_charges",
        {"lines": [{"line_id": "L1", "code": "27447", "amount": "5000.00"}]},
        id="dft-1",
    )
    knee = net.state("procedure", "A1#27447")
    assert knee.performed
    assert knee.view.status == "completed"
    assert [c.line_id for c in knee.view.charges] == ["L1"]
    assert net.state("procedure", "A1#66984").view.charges == ()
    # a procedure taken off the case by a modification is recorded as removed
    net2 = Network()
    book(net2, procedures=[{"code": "27447"}, {"code": "99999"}])
    assert net2.state("procedure", "A1#99999").view.card_source == "none"
    net2.send("appointment", "A1", "modify", {"procedures": [{"code": "27447"}]}, id="m1")
    assert net2.state("procedure", "A1#99999").view.status == "removed"
