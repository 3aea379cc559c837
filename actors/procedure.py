"""Procedure actor: one procedure of one appointment, keyed ``<appointment id>#<code>``.

The appointment keeps the case; each procedure keeps what is specific to it: which preference
card was used for it (the provider's own, the general one, or none), the items that card asked
for, whether it was performed, and the charge lines posted under its code.  The appointment
sends the procedure's whole view when it changes, so repeats converge.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from caresync.actors.contract import Accepted, Command, EntityKind, Rejected
from caresync.codecs.scheduling import ChargeLine

CardSource = Literal["provider", "general", "none"]


class CardLine(msgspec.Struct, kw_only=True, frozen=True):
    """One line of the preference card used."""

    item_id: str
    quantity: int


class ProcedureView(msgspec.Struct, kw_only=True, frozen=True):
    """``procedure.update``: the procedure as the appointment sees it now."""

    appointment_id: str
    code: str
    provider_id: str = ""
    card_source: CardSource = "none"
    card: tuple[CardLine, ...] = ()
    status: str = ""
    charges: tuple[ChargeLine, ...] = ()


class Updated(msgspec.Struct, kw_only=True, frozen=True, tag="updated"):
    view: ProcedureView


Event = Updated


class ProcedureState(msgspec.Struct, kw_only=True, frozen=True):
    """One procedure of one appointment."""

    id: str
    view: ProcedureView | None = None
    version: int = 0

    @property
    def performed(self) -> bool:
        """Charges were posted under this procedure's code."""
        return self.view is not None and any(c.type == "charge" for c in self.view.charges)


def initial(entity: str) -> ProcedureState:
    """A procedure nobody has planned yet."""
    return ProcedureState(id=entity)


def decide(state: ProcedureState, command: Command[Any]) -> Accepted[Event] | Rejected:
    """Record the appointment's view of this procedure; the same view again changes nothing."""
    p = command.payload
    if not isinstance(p, ProcedureView):
        return Rejected(f"procedure does not handle {type(p).__name__}")
    if state.id != f"{p.appointment_id}#{p.code}":
        return Rejected(f"procedure {state.id} cannot take the view of {p.appointment_id}#{p.code}")
    if p == state.view:
        return Accepted()
    return Accepted(events=(Updated(view=p),))


def evolve(state: ProcedureState, event: Event) -> ProcedureState:
    """Apply one recorded event; never fails."""
    return msgspec.structs.replace(state, view=event.view, version=state.version + 1)


KIND: EntityKind[ProcedureState, Event] = EntityKind(
    name="procedure",
    state_type=ProcedureState,
    commands={"update": ProcedureView},
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="one procedure of an appointment: its card, performance and charges",
)
