"""Business views over the committed state: what operators ask about an appointment or an item.

An appointment's sync position spans several actors, all keyed like the appointment (its
billing, supply and ERP conversations); the view reads them together.
"""

from __future__ import annotations

from typing import Any

import msgspec

from caresync.actors import appointment, billing, erp, item, supply
from caresync.actors.ledger import Ledger
from caresync.store import EntityRow, PartitionedStore

_decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {
    "appointment": msgspec.msgpack.Decoder(appointment.AppointmentState),
    "billing": msgspec.msgpack.Decoder(billing.BillingState),
    "supply": msgspec.msgpack.Decoder(supply.SupplyState),
    "erp": msgspec.msgpack.Decoder(erp.ErpState),
    "item": msgspec.msgpack.Decoder(item.ItemState),
}


async def _load(store: PartitionedStore, kind: str, entity: str) -> tuple[Any, EntityRow] | None:
    row = await store.entity(kind, entity)
    if row is None:
        return None
    return _decoders[kind].decode(row.state), row


def _sync(ledger: Ledger | None, row: EntityRow | None) -> dict[str, Any]:
    if row is not None and row.parked:
        return {"state": "parked", "last_error": "entity is parked", "wanted": 0, "acked": 0}
    if ledger is None:
        return {"state": "in_sync", "last_error": "", "wanted": 0, "acked": 0}
    return {
        "state": ledger.state,
        "last_error": ledger.last_error,
        "wanted": ledger.wanted,
        "acked": ledger.acked,
    }


async def appointment_view(store: PartitionedStore, appointment_id: str) -> dict[str, Any] | None:
    """The appointment across billing, supply and ERP, or None if it is unknown."""
    found = await _load(store, "appointment", appointment_id)
    if found is None:
        return None
    state: appointment.AppointmentState = found[0]
    details = state.details
    facility = state.plan.facility_id or (details.facility_id if details else "")
    bill = await _load(store, "billing", appointment_id)
    sup = await _load(store, "supply", appointment_id)
    ledger_erp = await _load(store, "erp", appointment_id)
    b: billing.BillingState | None = bill[0] if bill else None
    s: supply.SupplyState | None = sup[0] if sup else None
    e: erp.ErpState | None = ledger_erp[0] if ledger_erp else None
    return {
        "id": state.id,
        "status": state.status,
        "procedures": [p.code for p in details.procedures] if details else [],
        "facility": facility,
        "room": details.room if details else "",
        "start": details.start.isoformat() if details else None,
        "providers": list(details.providers) if details else [],
        "patient_class": details.patient_class if details else "",
        "payer_id": details.payer_id if details else "",
        "missing_preference_cards": list(state.plan.missing_cards),
        "billing": {
            "readiness": state.plan.readiness,
            "charges": [msgspec.to_builtins(line) for line in (b.lines if b else ())],
            "total": str(b.total) if b else "0",
            "claim_status": b.claim_status if b else "",
        },
        "supply": {
            "reservations": [
                {"item_id": i, "facility_id": f, "quantity": q}
                for f, held in sorted((s.reservations if s else {}).items())
                for i, q in sorted(held.items())
            ],
        },
        "erp": {
            "demand": [
                {
                    "item_id": d.item_id,
                    "facility_id": f,
                    "date": d.date,
                    "quantity": d.quantity,
                }
                for f, lines in sorted((e.demand if e else {}).items())
                for d in lines
            ],
        },
        "sync": {
            "billing": _sync(b.ledger if b else None, bill[1] if bill else None),
            "supply": _sync(s.ledger if s else None, sup[1] if sup else None),
            "erp": _sync(e.ledger if e else None, ledger_erp[1] if ledger_erp else None),
        },
        "version": state.version,
    }


async def item_view(store: PartitionedStore, key: str) -> dict[str, Any] | None:
    """Stock of one item at one facility (``ITEM_ID@FACILITY_ID``), or None if unknown."""
    found = await _load(store, "item", key)
    if found is None:
        return None
    state: item.ItemState = found[0]
    return {
        "id": state.id,
        "item_id": state.item_id,
        "facility_id": state.facility_id,
        "on_hand": state.on_hand,
        "reserved": state.reserved,
        "on_order": state.on_order,
        "available": state.available,
        "reorder_point": state.reorder_point,
        "reorder_quantity": state.reorder_quantity,
        "purchase_orders": [po.po_id for po in state.purchase_orders],
        "purchase_order_details": [msgspec.to_builtins(po) for po in state.purchase_orders],
        "reservations": dict(state.reservations),
        "parked": found[1].parked,
    }
