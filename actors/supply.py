"""Supply actor: the supply (materials management) conversation of one appointment, keyed by
the appointment id.

The appointment sends it its whole plan at a facility (reservations still needed, and what was
consumed).  It works out the change per item, tells each item actor (stock of that item at that
facility) and sends the supply system the reservation and consumption changes (one message for
each, a line per item), keeping the appointment's sync ledger with the supply system.  Its state
is the appointment's own plan per facility (usually one; two while a case moves), so it stays
small however long the history.
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
from caresync.actors.ledger import DownstreamAck, Ledger, acknowledged, sent


class Line(msgspec.Struct, kw_only=True, frozen=True):
    """A quantity of one item."""

    item_id: str
    quantity: int


class SupplyPlan(msgspec.Struct, kw_only=True, frozen=True):
    """An appointment's whole plan at one facility (absolute: repeats converge)."""

    facility_id: str
    appointment_id: str = ""
    """Informative (the entity is the appointment)."""
    reservations: tuple[Line, ...] = ()
    consumed: tuple[Line, ...] = ()


class Planned(msgspec.Struct, kw_only=True, frozen=True, tag="planned"):
    facility_id: str
    reservations: dict[str, int]
    consumed: dict[str, int]
    keys: tuple[str, ...]


class Acked(msgspec.Struct, kw_only=True, frozen=True, tag="acked"):
    ack: DownstreamAck


Event = Planned | Acked


class SupplyState(msgspec.Struct, kw_only=True, frozen=True):
    """Per facility: what this appointment has reserved and consumed there; its ledger."""

    id: str
    reservations: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    consumed: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    ledger: Ledger = msgspec.field(default_factory=Ledger)


def initial(entity: str) -> SupplyState:
    """An appointment with nothing reserved anywhere."""
    return SupplyState(id=entity)


def decide(state: SupplyState, command: Command[Any]) -> Accepted[Event] | Rejected:
    """Turn a plan into item changes and supply-system messages; file acknowledgements."""
    p = command.payload
    if isinstance(p, DownstreamAck):
        if p.effect_key not in state.ledger.pending and p.effect_key not in state.ledger.failed:
            return Accepted()  # not ours, or already settled
        return Accepted(events=(Acked(ack=p),))
    if not isinstance(p, SupplyPlan):
        return Rejected(f"supply does not handle {type(p).__name__}")
    if not p.facility_id:
        return Rejected(f"supply plan of {state.id} names no facility")
    facility = p.facility_id
    old_res = state.reservations.get(facility, {})
    old_used = state.consumed.get(facility, {})
    new_res = {line.item_id: line.quantity for line in p.reservations if line.quantity > 0}
    new_used = {line.item_id: line.quantity for line in p.consumed if line.quantity}
    effects: list[Effect] = []
    used_lines: list[dict[str, Any]] = []
    reserved_lines: list[dict[str, Any]] = []
    for item_id in sorted(set(old_res) | set(new_res) | set(old_used) | set(new_used)):
        used = new_used.get(item_id, 0) - old_used.get(item_id, 0)
        before, after = old_res.get(item_id, 0), new_res.get(item_id, 0)
        effects.extend(_item_changes(state, command, facility, item_id, used, before, after))
        if used:
            used_lines.append({"item_id": item_id, "quantity": used})
        if after != before:
            reserved_lines.append({"item_id": item_id, "quantity": after - before})
    # The supply system hears one message per kind of change, whatever the number of items.
    for operation, lines in (("consumption", used_lines), ("reservation", reserved_lines)):
        if lines:
            payload = {"facility_id": facility, "appointment_id": state.id, "lines": lines}
            effects.append(_down(state, f"{command.key}:supply:{operation}", operation, payload))
    if not effects and (new_res, new_used) == (old_res, old_used):
        return Accepted()
    downstream = tuple(e.key for e in effects if isinstance(e.target, Downstream))
    event = Planned(facility_id=facility, reservations=new_res, consumed=new_used, keys=downstream)
    return Accepted(events=(event,), effects=tuple(effects))


def _item_changes(
    state: SupplyState,
    command: Command[Any],
    facility: str,
    item_id: str,
    used: int,
    before: int,
    after: int,
) -> list[Effect]:
    """What the item actor hears of one item's change."""
    effects: list[Effect] = []
    appointment = state.id
    stock = ActorRef("item", f"{item_id}@{facility}")
    base = f"{command.key}:{item_id}"
    if used < 0:  # a credited supply line: the unused quantity goes back on the shelf
        payload = {"appointment_id": appointment, "quantity": -used}
        effects.append(
            Effect(target=stock, name="return_stock", key=f"{base}:return", payload=payload)
        )
    if used > 0:
        payload = {"appointment_id": appointment, "quantity": used}
        effects.append(Effect(target=stock, name="consume", key=f"{base}:consume", payload=payload))
    # The item actor takes a consumption out of the reservation by itself.
    expected = max(0, before - max(used, 0))
    if after != expected:
        if after:
            payload = {"appointment_id": appointment, "quantity": after}
            effects.append(
                Effect(target=stock, name="reserve", key=f"{base}:reserve", payload=payload)
            )
        else:
            payload = {"appointment_id": appointment}
            effects.append(
                Effect(target=stock, name="release", key=f"{base}:release", payload=payload)
            )
    return effects


def _down(state: SupplyState, key: str, operation: str, payload: dict[str, Any]) -> Effect:
    return Effect(target=Downstream("supply", state.id), name=operation, key=key, payload=payload)


def evolve(state: SupplyState, event: Event) -> SupplyState:
    """Apply one recorded event; never fails."""
    replace = msgspec.structs.replace
    if isinstance(event, Acked):
        return replace(state, ledger=acknowledged(state.ledger, event.ack))
    facility = event.facility_id
    reservations = {**state.reservations, facility: event.reservations}
    if not event.reservations:
        del reservations[facility]
    consumed = {**state.consumed, facility: event.consumed}
    if not event.consumed:
        del consumed[facility]
    return replace(
        state,
        reservations=reservations,
        consumed=consumed,
        ledger=sent(state.ledger, event.keys),
    )


KIND: EntityKind[SupplyState, Event] = EntityKind(
    name="supply",
    state_type=SupplyState,
    commands={"plan": SupplyPlan, "downstream_ack": DownstreamAck},
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="the supply-system conversation of one appointment",
)
