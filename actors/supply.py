"""Supply actor: the stock of one item at one facility, keyed ``<facility>:<item>``.

It holds the reservations of appointments for the item, and consumption when a procedure is
performed.  Reservations are kept per appointment, so that a release or a consumption touches
only what that appointment reserved and a repeated release changes nothing.
"""

from __future__ import annotations

from typing import Any

import msgspec

from caresync.actors.contract import Accepted, Command, EntityKind, Rejected


class Adjust(msgspec.Struct, kw_only=True, frozen=True):
    """Reserve, hold (date change only), release or consume an appointment's quantity."""

    appointment: str
    quantity: int = 1


class Reserved(msgspec.Struct, kw_only=True, frozen=True, tag="reserved"):
    appointment: str
    quantity: int


class Held(msgspec.Struct, kw_only=True, frozen=True, tag="held"):
    appointment: str


class Released(msgspec.Struct, kw_only=True, frozen=True, tag="released"):
    appointment: str


class Consumed(msgspec.Struct, kw_only=True, frozen=True, tag="consumed"):
    appointment: str
    quantity: int


Event = Reserved | Held | Released | Consumed


class SupplyState(msgspec.Struct, kw_only=True, frozen=True):
    """Reservations and consumption of one item at one facility."""

    id: str
    reservations: dict[str, int] = msgspec.field(default_factory=dict)
    consumed: int = 0
    changes: int = 0

    @property
    def reserved(self) -> int:
        """Total quantity reserved by open appointments."""
        return sum(self.reservations.values())


def initial(entity: str) -> SupplyState:
    """No reservations, nothing consumed."""
    return SupplyState(id=entity)


def decide(state: SupplyState, command: Command[Any]) -> Accepted[Event] | Rejected:
    """Turn an adjustment into the event it means for this item's stock."""
    p = command.payload
    if not isinstance(p, Adjust):
        return Rejected(f"supply does not handle {type(p).__name__}")
    if p.quantity < 0:
        return Rejected(f"quantity {p.quantity} is negative")
    event: Event
    if command.name == "reserve":
        event = Reserved(appointment=p.appointment, quantity=p.quantity)
    elif command.name == "hold":
        event = Held(appointment=p.appointment)
    elif command.name == "release":
        event = Released(appointment=p.appointment)
    else:
        event = Consumed(appointment=p.appointment, quantity=p.quantity)
    return Accepted(events=(event,))


def evolve(state: SupplyState, event: Event) -> SupplyState:
    """Apply one recorded event; never fails."""
    reservations = state.reservations
    consumed = state.consumed
    if isinstance(event, Reserved):
        reservations = {**reservations, event.appointment: event.quantity}
    elif isinstance(event, Released | Consumed) and event.appointment in reservations:
        reservations = {k: v for k, v in reservations.items() if k != event.appointment}
    if isinstance(event, Consumed):
        consumed += event.quantity
    return msgspec.structs.replace(
        state, reservations=reservations, consumed=consumed, changes=state.changes + 1
    )


KIND: EntityKind[SupplyState, Event] = EntityKind(
    name="supply",
    state_type=SupplyState,
    commands={"reserve": Adjust, "hold": Adjust, "release": Adjust, "consume": Adjust},
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="stock of one item at one facility",
)
