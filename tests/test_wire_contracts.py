"""Every wire Struct round-trips through JSON and msgpack, and the public facades stay pinned."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

import caresync.actors
import caresync.codecs
import caresync.store
from caresync.actors import default_registry

SAMPLES: dict[str, dict[str, Any]] = {
    "appointment.book": {
        "procedure": "27447",
        "facility": "MAIN-OR",
        "date": "2026-12-02",
        "items": ["gauze", "suture"],
    },
    "appointment.reschedule": {"date": "2026-12-09", "facility": "ASC-2"},
    "appointment.cancel": {"reason": "patient request"},
    "appointment.complete": {},
    "billing.track": {"appointment": "A1", "change": "completed", "procedure": "27447"},
    "supply.reserve": {"appointment": "A1", "quantity": 2},
    "supply.hold": {"appointment": "A1", "quantity": 2},
    "supply.release": {"appointment": "A1", "quantity": 2},
    "supply.consume": {"appointment": "A1", "quantity": 2},
    "erp.record": {
        "appointment": "A1",
        "change": "booked",
        "date": "2026-12-02",
        "procedure": "27447",
    },
    "erp.purchase_order": {
        "po_id": "PO:gauze@F1:1",
        "facility_id": "F1",
        "item_id": "gauze",
        "supplier_id": "S1",
        "quantity": 50,
        "unit_cost": "1.25",
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
    "item.set_stock": {
        "on_hand": 20,
        "reorder_point": 10,
        "reorder_quantity": 50,
        "refdata_version": 1,
    },
    "item.reserve": {"appointment_id": "A1", "quantity": 4},
    "item.release": {"appointment_id": "A1"},
    "item.consume": {"appointment_id": "A1", "quantity": 3, "line_id": "L1"},
    "item.po_acknowledged": {"po_id": "PO:gauze@F1:1", "reference": "PO-000001"},
    "item.goods_received": {"po_id": "PO:gauze@F1:1", "quantity": 50},
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


@pytest.mark.parametrize("kind", sorted(default_registry().kinds))
def test_states_round_trip_through_the_store_encoding(kind: str) -> None:
    spec = default_registry().kinds[kind]
    state = spec.initial("E1")
    for name, payload_type in spec.commands.items():
        command = caresync.actors.Command(
            id=f"c-{name}",
            name=name,
            entity="E1",
            occurred_at=msgspec.json.decode(
                b'"2026-11-24T00:00:00Z"', type=__import__("datetime").datetime
            ),
            payload=msgspec.convert(SAMPLES[f"{kind}.{name}"], payload_type),
        )
        decision = spec.decide(state, command)
        if isinstance(decision, caresync.actors.Accepted):
            state = spec.apply(state, decision.events)
    raw = msgspec.msgpack.encode(state)
    assert msgspec.msgpack.decode(raw, type=spec.state_type) == state


@pytest.mark.parametrize("module", [caresync.actors, caresync.codecs, caresync.store])
def test_public_facades_export_what_they_list(module: Any) -> None:
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        assert hasattr(module, name), name
