"""Supply actor: the supply (materials management) conversation of one facility, keyed by
facility id.

Appointments send it their whole plan for the facility (reservations still needed, and what was
consumed).  It works out the change per item, tells each item actor (stock at this facility)
and sends the supply system the reservation and consumption changes, keeping a sync ledger per
appointment.
"""

from __future__ import annotations

from typing import Any

import msgspec

from caresync.actors.contract import (
    Accepted,
    ActorRef,
    Command,
    Downstream,
    Effect,
    EntityKind,
    Rejected,
)
from caresync.actors.ledger import DownstreamAck, Ledger, acknowledged, sent, settled


class Line(msgspec.Struct, kw_only=True, frozen=True):
    """A quantity of one item."""

    item_id: str
    quantity: int


class SupplyPlan(msgspec.Struct, kw_only=True, frozen=True):
    """An appointment's whole plan at this facility (absolute: repeats converge)."""

    appointment_id: str
    reservations: tuple[Line, ...] = ()
    consumed: tuple[Line, ...] = ()


class Planned(msgspec.Struct, kw_only=True, frozen=True, tag="planned"):
    appointment_id: str
    reservations: dict[str, int]
    consumed: dict[str, int]
    keys: tuple[str, ...]


class Acked(msgspec.Struct, kw_only=True, frozen=True, tag="acked"):
    appointment_id: str
    ack: DownstreamAck


Event = Planned | Acked


class SupplyState(msgspec.Struct, kw_only=True, frozen=True):
    """Per appointment: what is reserved and consumed at this facility, and its ledger."""

    id: str
    reservations: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    consumed: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    ledgers: dict[str, Ledger] = msgspec.field(default_factory=dict)
    owners: dict[str, str] = msgspec.field(default_factory=dict)
    """Pending effect key to the appointment it belongs to (to file acknowledgements)."""


def initial(entity: str) -> SupplyState:
    """A facility with nothing reserved."""
    return SupplyState(id=entity)


def decide(state: SupplyState, command: Command[Any]) -> Accepted[Event] | Rejected:
    """Turn a plan into item changes and supply-system messages; file acknowledgements."""
    p = command.payload
    if isinstance(p, DownstreamAck):
        appointment = state.owners.get(p.effect_key)
        if appointment is None:
            return Accepted()  # not ours, or already settled
        return Accepted(events=(Acked(appointment_id=appointment, ack=p),))
    if not isinstance(p, SupplyPlan):
        return Rejected(f"supply does not handle {type(p).__name__}")
    appointment = p.appointment_id
    old_res = state.reservations.get(appointment, {})
    old_used = state.consumed.get(appointment, {})
    new_res = {line.item_id: line.quantity for line in p.reservations if line.quantity > 0}
    new_used = {line.item_id: line.quantity for line in p.consumed if line.quantity}
    effects: list[Effect] = []
    downstream: list[str] = []
    for item_id in sorted(set(old_res) | set(new_res) | set(old_used) | set(new_used)):
        used = new_used.get(item_id, 0) - old_used.get(item_id, 0)
        before, after = old_res.get(item_id, 0), new_res.get(item_id, 0)
        stock = ActorRef("item", f"{item_id}@{state.id}")
        base = f"{command.key}:{item_id}"
        if used < 0:  # a credited supply line: the unused quantity goes back on the shelf
            effects.append(
                Effect(
                    target=stock,
                    name="return_stock",
                    key=f"{base}:return",
                    payload={"appointment_id": appointment, "quantity": -used},
                )
            )
        if used > 0:
            effects.append(
                Effect(
                    target=stock,
                    name="consume",
                    key=f"{base}:consume",
                    payload={"appointment_id": appointment, "quantity": used},
                )
            )
        if used:
            effects.append(
                _down(
                    state,
                    f"{base}:consumption",
                    "consumption",
                    {
                        "facility_id": state.id,
                        "item_id": item_id,
                        "appointment_id": appointment,
                        "quantity": used,
                    },
                )
            )
        # The item actor takes a consumption out of the reservation by itself.
        expected = max(0, before - max(used, 0))
        if after != expected:
            if after:
                effects.append(
                    Effect(
                        target=stock,
                        name="reserve",
                        key=f"{base}:reserve",
                        payload={"appointment_id": appointment, "quantity": after},
                    )
                )
            else:
                effects.append(
                    Effect(
                        target=stock,
                        name="release",
                        key=f"{base}:release",
                        payload={"appointment_id": appointment},
                    )
                )
        if after != before:
            effects.append(
                _down(
                    state,
                    f"{base}:reservation",
                    "reservation",
                    {
                        "facility_id": state.id,
                        "item_id": item_id,
                        "appointment_id": appointment,
                        "quantity": after - before,
                    },
                )
            )
    downstream = [e.key for e in effects if isinstance(e.target, Downstream)]
    if not effects and (new_res, new_used) == (old_res, old_used):
        return Accepted()
    event = Planned(
        appointment_id=appointment, reservations=new_res, consumed=new_used, keys=tuple(downstream)
    )
    return Accepted(events=(event,), effects=tuple(effects))


def _down(state: SupplyState, key: str, operation: str, payload: dict[str, Any]) -> Effect:
    return Effect(target=Downstream("supply", state.id), name=operation, key=key, payload=payload)


def evolve(state: SupplyState, event: Event) -> SupplyState:
    """Apply one recorded event; never fails."""
    replace = msgspec.structs.replace
    appointment = event.appointment_id
    ledger = state.ledgers.get(appointment, Ledger())
    if isinstance(event, Planned):
        reservations = {**state.reservations, appointment: event.reservations}
        if not event.reservations:
            del reservations[appointment]
        consumed = {**state.consumed, appointment: event.consumed}
        if not event.consumed:
            del consumed[appointment]
        owners = {**state.owners, **dict.fromkeys(event.keys, appointment)}
        ledgers = {**state.ledgers, appointment: sent(ledger, event.keys)}
        return replace(
            state, reservations=reservations, consumed=consumed, ledgers=ledgers, owners=owners
        )
    owners = {k: v for k, v in state.owners.items() if k != event.ack.effect_key}
    ledger = acknowledged(ledger, event.ack)
    ledgers = {**state.ledgers, appointment: ledger}
    if settled(ledger) and appointment not in state.reservations:
        del ledgers[appointment]  # nothing held, nothing waiting: the appointment is done here
    return replace(state, ledgers=ledgers, owners=owners)


KIND: EntityKind[SupplyState, Event] = EntityKind(
    name="supply",
    state_type=SupplyState,
    commands={"plan": SupplyPlan, "downstream_ack": DownstreamAck},
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="the supply-system conversation of one facility",
)
