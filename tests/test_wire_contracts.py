"""Every wire Struct round-trips through JSON and msgpack, and the public facades stay pinned."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from workflow_network import demo_refdata

import caresync.actors
import caresync.codecs
import caresync.store
from caresync.actors import default_registry

REFDATA = demo_refdata()

SAMPLES: dict[str, dict[str, Any]] = {
    # appointment (codecs/scheduling.py)
    "appointment.book": {
        "procedures": [{"code": "27447", "provider_id": "DR-WHO"}, {"code": "66984"}],
        "facility_id": "MAIN",
        "start": "2026-12-02T07:30:00-05:00",
        "duration_min": 90,
        "room": "OR-1",
        "providers": ["DR-WHO"],
        "patient_class": "O",
        "patient_id": "P1",
        "visit_number": "V1",
        "payer_id": "ACME",
    },
    "appointment.sync": {
        "procedures": [{"code": "27447", "provider_id": "DR-WHO"}, {"code": "66984"}],
        "facility_id": "MAIN",
        "start": "2026-12-02T07:30:00-05:00",
        "duration_min": 90,
        "room": "OR-1",
        "providers": ["DR-WHO"],
        "patient_class": "O",
        "patient_id": "P1",
        "visit_number": "V1",
        "payer_id": "ACME",
    },
    "appointment.reschedule": {
        "start": "2026-12-09T08:00:00+00:00",
        "facility_id": "NORTH",
        "room": "OR-2",
        "duration_min": 60,
    },
    "appointment.modify": {
        "procedures": [{"code": "27447"}],
        "providers": [],
        "room": "OR-3",
        "payer_id": "STRICT",
    },
    "appointment.cancel": {"reason": "patient request"},
    "appointment.no_show": {"reason": "did not arrive"},
    "appointment.delete": {"reason": "entered in error"},
    "appointment.coverage": {"payer_id": "ACME", "patient_class": "I"},
    "appointment.post_charges": {
        "lines": [
            {"line_id": "L1", "code": "27447", "amount": "5000.00"},
            {"line_id": "L2", "code": "C-GAUZE", "quantity": 3, "amount": "7.50"},
            {
                "line_id": "L3",
                "code": "C-GAUZE",
                "type": "credit",
                "quantity": 1,
                "amount": "2.50",
                "currency": "USD",
                "reverses": "L2",
            },
        ]
    },
    # billing
    "billing.update": {
        "appointment_id": "E1",
        "status": "completed",
        "readiness": "ready",
        "payer_id": "ACME",
        "procedures": ["27447"],
        "charges": [{"line_id": "L1", "code": "27447", "amount": "5000.00"}],
    },
    "billing.claim_status": {
        "appointment_id": "E1",
        "status": "denied",
        "claim_id": "CLM-1",
        "reason": "no authorization",
    },
    "billing.downstream_ack": {
        "effect_key": "c-update:billing:readiness",
        "system": "billing",
        "operation": "readiness",
        "outcome": "created",
        "reference": "BILL-1",
    },
    # supply (keyed by appointment)
    "supply.plan": {
        "facility_id": "F1",
        "appointment_id": "A1",
        "reservations": [
            {"item_id": "gauze", "quantity": 4},
            {"item_id": "knee-kit", "quantity": 1},
        ],
        "consumed": [{"item_id": "gauze", "quantity": 2}],
    },
    "supply.downstream_ack": {
        "effect_key": "A1/A1/c-plan:supply:F1:supply:reservation",
        "system": "supply",
        "operation": "reservation",
        "outcome": "failed",
        "error": "item blocked",
        "attempts": 3,
    },
    # erp (keyed by appointment)
    "erp.demand": {
        "facility_id": "F1",
        "appointment_id": "A1",
        "lines": [
            {"item_id": "gauze", "date": "2026-12-02", "quantity": 4},
            {"item_id": "knee-kit", "date": "2026-12-02", "quantity": 1},
        ],
    },
    "erp.posting": {
        "facility_id": "F1",
        "item_id": "gauze",
        "appointment_id": "A1",
        "quantity": 2,
        "amount": "2.50",
        "unit_cost": "1.25",
        "cost_center": "CC1",
    },
    "erp.downstream_ack": {
        "effect_key": "A1/A1/c-demand:erp:F1:erp:demand",
        "system": "erp",
        "operation": "demand",
        "outcome": "duplicate",
        "reference": "DEM-1",
    },
    # purchasing (keyed by facility)
    "purchasing.purchase_order": {
        "po_id": "PO:gauze@F1:1",
        "facility_id": "F1",
        "item_id": "gauze",
        "supplier_id": "S1",
        "quantity": 50,
        "unit_cost": "1.25",
    },
    "purchasing.downstream_ack": {
        "effect_key": "F1/c-purchase_order:erp",
        "system": "erp",
        "operation": "purchase_order",
        "outcome": "created",
        "reference": "PO-000001",
    },
    # item (keyed item@facility)
    "item.set_stock": {
        "on_hand": 20,
        "reorder_point": 10,
        "reorder_quantity": 50,
        "refdata_version": 1,
    },
    "item.reserve": {"appointment_id": "A1", "quantity": 12},  # crosses: orders PO:gauze@F1:1
    "item.release": {"appointment_id": "A1"},
    "procedure.update": {
        "appointment_id": "E1",
        "code": "27447",
        "provider_id": "DR-WHO",
        "card_source": "provider",
        "card": [{"item_id": "gauze", "quantity": 6}],
        "status": "booked",
        "charges": [{"line_id": "L1", "code": "27447", "amount": "900"}],
    },
    "item.return_stock": {"appointment_id": "A1", "quantity": 1},
    "item.consume": {"appointment_id": "A1", "quantity": 3, "line_id": "L1"},
    "item.po_acknowledged": {"po_id": "PO:gauze@F1:1", "reference": "PO-000001"},
    "item.goods_received": {"po_id": "PO:gauze@F1:1", "quantity": 50},
    "item.request": {"request_id": "SR-1", "quantity": 10},
    # visit (keyed by visit number)
    "visit.register": {"payer_id": "ACME", "patient_class": "O", "location": "MAIN"},
    "visit.link": {"appointment_id": "A1"},
    "visit.post_charges": {"lines": [{"line_id": "L9", "code": "27447", "amount": "100.00"}]},
}


def _commands() -> list[tuple[str, type[Any]]]:
    return [
        (f"{kind.name}.{name}", payload_type)
        for kind in default_registry().kinds.values()
        for name, payload_type in kind.commands.items()
    ]


def test_every_command_has_a_sample() -> None:
    assert sorted(SAMPLES) == sorted(name for name, _ in _commands())


@pytest.mark.parametrize(("name", "payload_type"), _commands())
@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_command_payloads_round_trip(name: str, payload_type: type[Any], fmt: str) -> None:
    value = msgspec.convert(SAMPLES[name], payload_type)
    module = msgspec.json if fmt == "json" else msgspec.msgpack
    decoded = module.decode(module.encode(value), type=payload_type)
    assert decoded == value
    # Wire schemas must tolerate fields added by newer senders.
    extended = module.encode({**msgspec.to_builtins(value), "added_later": [1, 2]})
    assert module.decode(extended, type=payload_type) == value


ENTITIES = {
    "supply": "A1",
    "erp": "A1",
    "purchasing": "F1",
    "item": "gauze@F1",
    "visit": "V1",
    "procedure": "E1#27447",
}
"""The entity each kind's samples are addressed to (appointment and billing: ``E1``)."""


@pytest.mark.parametrize("kind", sorted(default_registry().kinds))
def test_states_round_trip_through_the_store_encoding(kind: str) -> None:
    spec = default_registry().kinds[kind]
    entity = ENTITIES.get(kind, "E1")
    state = spec.initial(entity)
    accepted = 0
    for name, payload_type in spec.commands.items():
        command = caresync.actors.Command(
            id=f"c-{name}",
            name=name,
            entity=entity,
            occurred_at=datetime(2026, 11, 24, tzinfo=UTC),
            payload=msgspec.convert(SAMPLES[f"{kind}.{name}"], payload_type),
            refdata=REFDATA,
        )
        decision = spec.decide(state, command)
        if isinstance(decision, caresync.actors.Accepted):
            accepted += 1
            state = spec.apply(state, decision.events)
    assert accepted > 0
    assert state != spec.initial(entity)
    raw = msgspec.msgpack.encode(state)
    assert msgspec.msgpack.decode(raw, type=spec.state_type) == state


@pytest.mark.parametrize("module", [caresync.actors, caresync.codecs, caresync.store])
def test_public_facades_export_what_they_list(module: Any) -> None:
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        assert hasattr(module, name), name
