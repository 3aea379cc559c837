"""The connectors of the simulation: each system's output stream, delivered and acknowledged.

A connector delivers the head of its system's stream, records what the system took (by
idempotency key) and publishes ``downstream_ack`` (id ``ack:<effect key>``) to the owning
actor; it may crash before acknowledging and deliver the same effect again (a ``duplicate``
outcome with the same ack id), or give up on it (``failed``).  ERP answers a new purchase order
with ``item.po_acknowledged`` and, sometimes, ``item.goods_received`` (whole or in parts).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import msgspec
from dsim_workload import Key, Message, source
from workflow_network import T0

from caresync.actors import Downstream, Effect

if TYPE_CHECKING:
    from dsim_runtime import Sim

_ENCODER = msgspec.msgpack.Encoder()


@dataclass(slots=True)
class Connector:
    """One system's output stream and what the system holds, by idempotency key."""

    stream: deque[tuple[Key, Effect]] = field(default_factory=deque)
    records: dict[str, str] = field(default_factory=dict)
    """Effect key to the reference the system gave it."""
    failed: dict[str, bool] = field(default_factory=dict)
    delivered: list[str] = field(default_factory=list)
    """Keys in the order the system saw them (redeliveries included)."""


def connect(sim: Sim) -> None:
    """A connector delivers the head of one system's stream and acknowledges it."""
    system = sim.rng.choice([s for s, c in sim.connectors.items() if c.stream])
    conn = sim.connectors[system]
    owner, effect = conn.stream[0]
    assert isinstance(effect.target, Downstream)
    key = effect.key
    conn.delivered.append(key)
    if key not in conn.failed:
        conn.failed[key] = sim.rng.random() < sim.profile.ack_failure
    reference = ""
    if conn.failed[key]:
        outcome = "failed"
    elif key in conn.records:
        outcome, reference = "duplicate", conn.records[key]
    else:
        outcome, reference = "created", f"{system.upper()}-{len(conn.records) + 1:06d}"
        conn.records[key] = reference
        if effect.name == "purchase_order":
            erp_feedback(sim, effect, reference)
    sim.note(f"connector {system} {effect.name} {key} -> {outcome}")
    ack = {
        "effect_key": key,
        "system": system,
        "operation": effect.name,
        "outcome": outcome,
        "reference": reference,
        "error": "gave up" if outcome == "failed" else "",
    }
    at = T0 + timedelta(seconds=sim.steps)
    sim.deliver(
        Message(
            owner[0],
            effect.target.key,
            "downstream_ack",
            f"ack:{key}",
            at,
            _ENCODER.encode(ack),
            False,
            f"connector:{system}",
        )
    )
    if sim.rng.random() < sim.profile.connector_crash:
        sim.note(f"connector {system} crashed before acking {key}: redelivered")
        sim.stats["connector_crashes"] += 1
    else:
        conn.stream.popleft()


def erp_feedback(sim: Sim, effect: Effect, reference: str) -> None:
    """ERP acknowledges a new PO and, sometimes, receives its goods (whole or in parts)."""
    p = effect.payload
    entity = f"{p['item_id']}@{p['facility_id']}"
    po = p["po_id"]
    at = T0 + timedelta(seconds=sim.steps)
    if sim.rng.random() < 0.8:
        payload = {"po_id": po, "reference": reference}
        sim.feedback.append(
            source("item", entity, "po_acknowledged", f"ack:{po}", at, payload, "erp")
        )
    r = sim.rng.random()
    if r < 0.4:
        payload = {"po_id": po, "quantity": 0}
        sim.feedback.append(
            source("item", entity, "goods_received", f"received:{po}", at, payload, "erp")
        )
    elif r < 0.6:
        first = max(1, p["quantity"] // 2)
        for n, quantity in enumerate((first, p["quantity"] - first or 1), 1):
            payload = {"po_id": po, "quantity": quantity}
            msg_id = f"received:{po}:{n}"
            sim.feedback.append(
                source("item", entity, "goods_received", msg_id, at, payload, "erp")
            )
