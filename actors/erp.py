"""ERP actor: demand planning of one facility, keyed by facility id.

It keeps the number of open cases per date, which is what ERP demand planning is fed.
"""

from __future__ import annotations

from typing import Any

import msgspec

from caresync.actors.contract import Accepted, Command, EntityKind, Rejected


class Record(msgspec.Struct, kw_only=True, frozen=True):
    """An appointment change at this facility."""

    appointment: str
    change: str
    date: str = ""
    procedure: str = ""


class Recorded(msgspec.Struct, kw_only=True, frozen=True, tag="recorded"):
    appointment: str
    change: str
    date: str


class ErpState(msgspec.Struct, kw_only=True, frozen=True):
    """Changes seen and open cases per appointment date at one facility."""

    id: str
    changes: int = 0
    open_cases: dict[str, str] = msgspec.field(default_factory=dict)
    """Appointment id to its date, for appointments booked and not yet closed."""


def initial(entity: str) -> ErpState:
    """A facility with no demand yet."""
    return ErpState(id=entity)


def decide(state: ErpState, command: Command[Any]) -> Accepted[Recorded] | Rejected:
    """Record the change."""
    p = command.payload
    if not isinstance(p, Record):
        return Rejected(f"erp does not handle {type(p).__name__}")
    return Accepted(events=(Recorded(appointment=p.appointment, change=p.change, date=p.date),))


def evolve(state: ErpState, event: Recorded) -> ErpState:
    """Open, move or close the case of the appointment."""
    cases = state.open_cases
    if event.change in ("booked", "rescheduled"):
        cases = {**cases, event.appointment: event.date}
    elif event.appointment in cases:
        cases = {k: v for k, v in cases.items() if k != event.appointment}
    return msgspec.structs.replace(state, changes=state.changes + 1, open_cases=cases)


KIND: EntityKind[ErpState, Recorded] = EntityKind(
    name="erp",
    state_type=ErpState,
    commands={"record": Record},
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="demand planning of one facility",
)
