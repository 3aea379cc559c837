"""A pure, synchronous network of the workflow actors, for scenario tests without a broker.

It runs decide/evolve like the runtime does (dedupe by command id, effects to other actors
delivered in order), records what goes downstream, and can acknowledge it like a connector.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from caresync.actors import Accepted, ActorRef, Command, Downstream, Effect, default_registry
from caresync.actors.refdata import RefData
from caresync.codecs.refdata import (
    Facility,
    Item,
    PayerRule,
    PreferenceCardLine,
    RefDataSet,
    Supplier,
)

T0 = datetime(2027, 3, 1, 8, 0, tzinfo=UTC)


def demo_refdata() -> RefData:
    """Two facilities, three items, cards for a knee and a cataract, three payers."""
    items = [
        Item(
            item_id="gauze",
            description="Gauze",
            unit="box",
            unit_cost="2.50",
            supplier_id="SUP-A",
            charge_code="C-GAUZE",
        ),
        Item(
            item_id="knee-kit",
            description="Knee implant kit",
            unit="kit",
            unit_cost="1200.00",
            supplier_id="SUP-B",
            charge_code="C-KNEE",
        ),
        Item(
            item_id="lens",
            description="Intraocular lens",
            unit="each",
            unit_cost="300.00",
            supplier_id="SUP-B",
            charge_code="C-LENS",
        ),
    ]
    return RefData(
        RefDataSet(
            facilities=[
                Facility(facility_id="MAIN", name="Main OR", cost_center="CC-MAIN"),
                Facility(facility_id="NORTH", name="North ASC", cost_center="CC-NORTH"),
            ],
            suppliers=[
                Supplier(supplier_id="SUP-A", name="A"),
                Supplier(supplier_id="SUP-B", name="B"),
            ],
            items=items,
            stock=[],
            preference_cards=[
                PreferenceCardLine(procedure_code="27447", item_id="gauze", quantity=4),
                PreferenceCardLine(procedure_code="27447", item_id="knee-kit", quantity=1),
                PreferenceCardLine(
                    procedure_code="27447", item_id="gauze", quantity=6, provider_id="DR-WHO"
                ),
                PreferenceCardLine(procedure_code="66984", item_id="lens", quantity=1),
            ],
            payer_rules=[
                PayerRule(
                    payer_id="ACME", procedure_code="*", authorization_required=False, covered=True
                ),
                PayerRule(
                    payer_id="STRICT",
                    procedure_code="27447",
                    authorization_required=True,
                    covered=True,
                ),
                PayerRule(
                    payer_id="STRICT",
                    procedure_code="*",
                    authorization_required=False,
                    covered=True,
                ),
                PayerRule(
                    payer_id="CHEAP",
                    procedure_code="66984",
                    authorization_required=False,
                    covered=False,
                ),
            ],
            loaded_at=T0,
        ),
        version=1,
    )


@dataclass
class Network:
    """Every actor's state, the downstream effects sent, and the commands dead-lettered."""

    refdata: RefData = field(default_factory=demo_refdata)
    states: dict[tuple[str, str], Any] = field(default_factory=dict)
    applied: set[tuple[str, str, str]] = field(default_factory=set)
    downstream: list[Effect] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    internal: list[Effect] = field(default_factory=list)
    """Effects delivered to other actors, in order."""
    clock: datetime = T0

    def send(
        self,
        kind: str,
        entity: str,
        name: str,
        payload: Any,
        *,
        id: str,
        at: datetime | None = None,
    ) -> None:
        """A source command; runs until every internal effect is applied."""
        queue: deque[tuple[str, str, str, Any, str, datetime]] = deque(
            [(kind, entity, name, payload, id, at or self.tick())]
        )
        registry = default_registry()
        while queue:
            kind, entity, name, payload, cid, when = queue.popleft()
            if (kind, entity, cid) in self.applied:
                continue
            spec = registry.kinds[kind]
            command = Command(
                id=cid,
                name=name,
                entity=entity,
                occurred_at=when,
                payload=msgspec.convert(payload, spec.commands[name], from_attributes=True)
                if not isinstance(payload, spec.commands[name])
                else payload,
                refdata=self.refdata,
            )
            state = self.states.get((kind, entity), spec.initial(entity))
            decision = spec.decide(state, command)
            self.applied.add((kind, entity, cid))
            if not isinstance(decision, Accepted):
                self.rejected.append((f"{kind}:{entity}", decision.reason))
                continue
            self.states[(kind, entity)] = spec.apply(state, decision.events)
            for effect in decision.effects:
                if isinstance(effect.target, ActorRef):
                    self.internal.append(effect)
                    data = msgspec.to_builtins(effect.payload)
                    queue.append(
                        (
                            effect.target.kind,
                            effect.target.entity,
                            effect.name,
                            data,
                            effect.key,
                            when,
                        )
                    )
                else:
                    self.downstream.append(effect)

    def tick(self) -> datetime:
        self.clock += timedelta(minutes=1)
        return self.clock

    def ack_all(self, outcome: str = "created") -> None:
        """Acknowledge every downstream effect like a connector would."""
        for effect in list(self.downstream):
            assert isinstance(effect.target, Downstream)
            system, key = effect.target.system, effect.target.key
            self.send(
                system,
                key,
                "downstream_ack",
                {
                    "effect_key": effect.key,
                    "system": system,
                    "operation": effect.name,
                    "outcome": outcome,
                    "reference": f"REF-{effect.key}",
                },
                id=f"ack:{effect.key}",
            )

    def state(self, kind: str, entity: str) -> Any:
        return self.states[(kind, entity)]

    def sent(self, system: str, operation: str | None = None) -> list[Effect]:
        return [
            e
            for e in self.downstream
            if isinstance(e.target, Downstream)
            and e.target.system == system
            and (operation is None or e.name == operation)
        ]

    def lines(self, system: str, operation: str) -> list[dict[str, Any]]:
        """The lines of every ``operation`` message sent to ``system``, in order, each with
        the ``facility_id`` of its message."""
        return [
            {"facility_id": e.payload["facility_id"], **line}
            for e in self.sent(system, operation)
            for line in e.payload["lines"]
        ]
