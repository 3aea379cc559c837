"""``caresync report``: totals over the committed state, in business words."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from typing import Any

import msgspec

from caresync.actors import appointment, billing, erp, item, purchasing, supply
from caresync.actors.ledger import Ledger
from caresync.store import PartitionedStore


def _ledger_totals(totals: dict[str, int], ledger: Ledger) -> None:
    totals["wanted"] += ledger.wanted
    totals["acked"] += ledger.acked
    totals["pending"] += len(ledger.pending)
    totals["failed"] += len(ledger.failed)
    totals[f"entities_{ledger.state}"] += 1


async def build_report(store: PartitionedStore) -> dict[str, Any]:
    """Appointments by status, reservations, demand, charges, orders, postings, sync, parking."""
    statuses: Counter[str] = Counter()
    readiness: Counter[str] = Counter()
    missing_cards = 0
    reservations = reserved_units = demand_lines = 0
    charge_lines = 0
    charges_total = Decimal(0)
    purchase_orders = postings = 0
    posted = Decimal(0)
    items_below = 0
    sync: dict[str, Counter[str]] = {s: Counter() for s in ("billing", "supply", "erp")}
    decoders = {
        k.name: msgspec.msgpack.Decoder(k.state_type)
        for k in (
            appointment.KIND,
            billing.KIND,
            supply.KIND,
            erp.KIND,
            purchasing.KIND,
            item.KIND,
        )
    }
    parked = 0
    for row in await store.entities():
        parked += row.parked
        decoder = decoders.get(row.kind)
        if decoder is None:
            continue
        try:
            state = decoder.decode(row.state)
        except msgspec.DecodeError:
            continue
        if isinstance(state, appointment.AppointmentState):
            statuses[state.status] += 1
            if state.plan.readiness:
                readiness[state.plan.readiness] += 1
            missing_cards += bool(state.plan.missing_cards)
        elif isinstance(state, billing.BillingState):
            charge_lines += len(state.lines)
            charges_total += state.total
            _ledger_totals(sync["billing"], state.ledger)
        elif isinstance(state, supply.SupplyState):
            for lines in state.reservations.values():
                reservations += len(lines)
                reserved_units += sum(lines.values())
            _ledger_totals(sync["supply"], state.ledger)
        elif isinstance(state, erp.ErpState):
            demand_lines += sum(len(lines) for lines in state.demand.values())
            postings += state.postings
            posted += Decimal(state.posted_amount)
            _ledger_totals(sync["erp"], state.ledger)
        elif isinstance(state, purchasing.PurchasingState):
            purchase_orders += state.orders
            _ledger_totals(sync["erp"], state.ledger)
        elif isinstance(state, item.ItemState):
            items_below += state.stocked and state.available <= state.reorder_point
    counts = await store.counts()
    return {
        "appointments": {
            "total": sum(statuses.values()),
            "by_status": dict(statuses),
            "by_readiness": dict(readiness),
            "without_preference_card": missing_cards,
        },
        "reservations": {"lines": reservations, "units": reserved_units},
        "demand_lines": demand_lines,
        "charges": {"lines": charge_lines, "total": str(charges_total)},
        "purchase_orders": purchase_orders,
        "postings": {"count": postings, "amount": str(posted)},
        "items_at_or_below_reorder_point": items_below,
        "sync": {system: dict(c) for system, c in sync.items()},
        "parked": {"entities": parked, "messages": counts["parked_messages"]},
        "outbox": {"pending": counts["outbox_pending"], "failed": counts["outbox_failed"]},
    }
