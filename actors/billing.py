"""Billing actor: the billing side of one appointment, keyed by appointment id.

It follows the appointment's changes and, when the procedure is performed, sends one charge
to the billing system (a credit if the appointment is later reversed is the workflow's job).
"""

from __future__ import annotations

from typing import Any

import msgspec

from caresync.actors.contract import Accepted, Command, Downstream, Effect, EntityKind, Rejected


class Track(msgspec.Struct, kw_only=True, frozen=True):
    """A change of the appointment this billing account follows."""

    appointment: str
    change: str
    procedure: str = ""


class Tracked(msgspec.Struct, kw_only=True, frozen=True, tag="tracked"):
    change: str
    procedure: str


class BillingState(msgspec.Struct, kw_only=True, frozen=True):
    """Billing's view of one appointment."""

    id: str
    changes: int = 0
    billable: int = 0
    last_change: str = ""


def initial(entity: str) -> BillingState:
    """An appointment billing has not heard of."""
    return BillingState(id=entity)


def decide(state: BillingState, command: Command[Any]) -> Accepted[Tracked] | Rejected:
    """Record the change; a completion sends the charge downstream."""
    p = command.payload
    if not isinstance(p, Track):
        return Rejected(f"billing does not handle {type(p).__name__}")
    effects: tuple[Effect, ...] = ()
    if p.change == "completed":
        effects = (
            Effect(
                target=Downstream("billing", state.id),
                name="charge",
                key=f"{command.id}:charge",
                payload={"appointment": state.id, "procedure": p.procedure},
            ),
        )
    return Accepted(events=(Tracked(change=p.change, procedure=p.procedure),), effects=effects)


def evolve(state: BillingState, event: Tracked) -> BillingState:
    """Count the change and track how many charges are billable."""
    billable = state.billable
    if event.change == "completed":
        billable += 1
    elif event.change == "cancelled" and billable > 0:
        billable -= 1
    return msgspec.structs.replace(
        state, changes=state.changes + 1, billable=billable, last_change=event.change
    )


KIND: EntityKind[BillingState, Tracked] = EntityKind(
    name="billing",
    state_type=BillingState,
    commands={"track": Track},
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="billing side of one appointment",
)
