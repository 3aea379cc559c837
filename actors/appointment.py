"""Appointment actor: one scheduled case, keyed by its (qualified) appointment id.

It orchestrates the scenario: a booking looks up the preference card of each procedure (a
provider-specific card wins over the general one) and plans reservations at the facility and
demand lines for the date; billing readiness comes from the payer rules.  Each change sends the
whole plan (per facility), not a delta, to the actors that own the case's downstream
conversations — its billing, supply and ERP actors, keyed like it — so a repeated or replayed
message converges to the same plan.  A message older than the state already applied (by its
source timestamp) changes nothing.  Charges posted mark the case performed; supply lines are
matched to items by charge code and consumed.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any, Literal

import msgspec

from caresync.actors.contract import Accepted, ActorRef, Command, Effect, EntityKind, Rejected
from caresync.codecs.scheduling import (
    BookAppointment,
    ChargeLine,
    CloseAppointment,
    Coverage,
    ModifyAppointment,
    PostCharges,
    ProcedureRef,
    RescheduleAppointment,
)

Status = Literal["new", "booked", "cancelled", "no_show", "deleted", "completed"]
Readiness = Literal["", "ready", "pending_authorization", "not_covered", "pending_coverage"]
_CLOSED_BY = {"cancel": "cancelled", "no_show": "no_show", "delete": "deleted"}


class Line(msgspec.Struct, kw_only=True, frozen=True):
    """A quantity of one item (a reservation, or a consumption)."""

    item_id: str
    quantity: int


class Plan(msgspec.Struct, kw_only=True, frozen=True):
    """What the downstream systems should hold for this appointment."""

    facility_id: str = ""
    date: str = ""
    reservations: tuple[Line, ...] = ()
    consumed: tuple[Line, ...] = ()
    readiness: Readiness = ""
    missing_cards: tuple[str, ...] = ()
    """Procedure codes without a preference card: booked, flagged, nothing reserved for them."""


# -- events ---------------------------------------------------------------------------------
class Booked(msgspec.Struct, kw_only=True, frozen=True, tag="booked"):
    details: BookAppointment
    occurred_at: datetime


class Changed(msgspec.Struct, kw_only=True, frozen=True, tag="changed"):
    details: BookAppointment
    occurred_at: datetime
    local_date: str


class Closed(msgspec.Struct, kw_only=True, frozen=True, tag="closed"):
    status: Status
    reason: str
    occurred_at: datetime


class CoverageKnown(msgspec.Struct, kw_only=True, frozen=True, tag="coverage"):
    payer_id: str
    patient_class: str


class ChargesPosted(msgspec.Struct, kw_only=True, frozen=True, tag="charges"):
    lines: tuple[ChargeLine, ...]
    consumed: tuple[Line, ...]


class Planned(msgspec.Struct, kw_only=True, frozen=True, tag="planned"):
    plan: Plan


class Superseded(msgspec.Struct, kw_only=True, frozen=True, tag="superseded"):
    """A message older than the state: recorded, changes nothing."""

    occurred_at: datetime


Event = Booked | Changed | Closed | CoverageKnown | ChargesPosted | Planned | Superseded


# -- state ----------------------------------------------------------------------------------
class AppointmentState(msgspec.Struct, kw_only=True, frozen=True):
    """What the router knows of one appointment."""

    id: str
    status: Status = "new"
    details: BookAppointment | None = None
    source_ts: datetime | None = None
    charges: tuple[ChargeLine, ...] = ()
    consumed_lines: tuple[Line, ...] = ()
    local_date: str = ""
    """The start's date where the case happens (its own offset): stored states keep times in
    UTC only, so the date is taken when the booking or change arrives."""
    plan: Plan = msgspec.field(default_factory=Plan)
    close_reason: str = ""
    version: int = 0


def initial(entity: str) -> AppointmentState:
    """An appointment nobody has booked yet."""
    return AppointmentState(id=entity)


def decide(state: AppointmentState, command: Command[Any]) -> Accepted[Event] | Rejected:
    """Accept or reject one command; an accepted change re-plans and sends the plan on."""
    p = command.payload
    name = command.name
    at = command.occurred_at
    scheduling = isinstance(p, BookAppointment | RescheduleAppointment | ModifyAppointment)
    if (scheduling or isinstance(p, CloseAppointment)) and _stale(state, at):
        return Accepted(events=(Superseded(occurred_at=at),))
    event: Event
    if (
        isinstance(p, BookAppointment)
        and name == "sync"
        and state.status in ("booked", "completed")
    ):
        # A source that sends the whole appointment (FHIR) each time: an update of the booking;
        # once performed (charges posted) the case is what it was.
        if state.details == p or state.status == "completed":
            return Accepted()
        if not p.procedures:
            return Rejected(f"update of {state.id} has no procedures")
        local_date = p.start.date().isoformat()
        event = Changed(details=p, occurred_at=at, local_date=local_date)
    elif isinstance(p, BookAppointment):
        if state.status in ("booked", "completed", "deleted"):
            return Rejected(f"appointment {state.id} is {state.status}: cannot book it again")
        if not p.procedures:
            return Rejected(f"booking of {state.id} has no procedures")
        event = Booked(details=p, occurred_at=at)
    elif isinstance(p, RescheduleAppointment | ModifyAppointment):
        if state.status != "booked" or state.details is None:
            return Rejected(f"appointment {state.id} is {state.status}, not booked: cannot {name}")
        # The date where the case happens comes from the message's own offset, if it moves.
        local_date = p.start.date().isoformat() if p.start is not None else state.local_date
        event = Changed(details=_changed(state.details, p), occurred_at=at, local_date=local_date)
    elif isinstance(p, CloseAppointment):
        status: Status = _CLOSED_BY.get(name, "cancelled")  # type: ignore[assignment]
        if name == "delete":
            if state.status == "deleted":
                return Rejected(f"appointment {state.id} is already deleted")
        elif state.status != "booked":
            return Rejected(f"appointment {state.id} is {state.status}, not booked: cannot {name}")
        event = Closed(status=status, reason=p.reason, occurred_at=at)
    elif isinstance(p, Coverage):
        event = CoverageKnown(payer_id=p.payer_id, patient_class=p.patient_class)
    elif isinstance(p, PostCharges):
        if state.status not in ("booked", "completed"):
            return Rejected(f"appointment {state.id} is {state.status}: cannot post charges")
        known = {c.line_id for c in state.charges}
        lines = tuple(line for line in p.lines if line.line_id not in known)
        if not lines:  # every line already posted: a resend
            return Accepted()
        event = ChargesPosted(lines=lines, consumed=_consumption(lines, command.refdata))
    else:
        return Rejected(f"appointment does not handle {type(p).__name__}")
    after = evolve(state, event)
    plan = _plan(after, command.refdata)
    events: list[Event] = [event]
    if plan != state.plan:
        events.append(Planned(plan=plan))
    final = evolve(after, events[-1]) if len(events) > 1 else after
    return Accepted(events=tuple(events), effects=_effects(state, final, command))


def _stale(state: AppointmentState, at: datetime) -> bool:
    return state.source_ts is not None and at < state.source_ts


def _changed(
    details: BookAppointment, p: RescheduleAppointment | ModifyAppointment
) -> BookAppointment:
    replace = msgspec.structs.replace
    if isinstance(p, RescheduleAppointment):
        return replace(
            details,
            start=p.start or details.start,
            facility_id=p.facility_id or details.facility_id,
            room=p.room or details.room,
            duration_min=p.duration_min or details.duration_min,
        )
    deltas = ("procedures_added", "procedures_removed", "providers_added", "providers_removed")
    changes = {
        name: value
        for name in p.__struct_fields__
        if name not in deltas and (value := getattr(p, name)) is not None
    }
    changed = replace(details, **changes)
    if p.procedures_added or p.procedures_removed:
        added = {ref.code: ref for ref in p.procedures_added}
        kept = tuple(
            added.pop(ref.code, ref)
            for ref in changed.procedures
            if ref.code not in p.procedures_removed
        )
        changed = replace(changed, procedures=(*kept, *added.values()))
    if p.providers_added or p.providers_removed:
        providers = [x for x in changed.providers if x not in p.providers_removed]
        providers += [x for x in p.providers_added if x not in providers]
        changed = replace(changed, providers=tuple(providers))
    return changed


def _consumption(lines: tuple[ChargeLine, ...], refdata: Any) -> tuple[Line, ...]:
    """Supply lines are matched to items by the item's charge code; credits give back."""
    used: Counter[str] = Counter()
    for line in lines:
        item = refdata.item_by_charge_code(line.code) if refdata is not None else None
        if item is not None:
            sign = -1 if line.type == "credit" else 1
            used[item.item_id] += sign * line.quantity
    return tuple(Line(item_id=i, quantity=q) for i, q in sorted(used.items()) if q)


def _plan(state: AppointmentState, refdata: Any) -> Plan:
    """Reservations, demand and readiness the appointment needs now."""
    details = state.details
    if details is None or state.status in ("cancelled", "no_show", "deleted"):
        return Plan()
    wanted: Counter[str] = Counter()
    missing: list[str] = []
    for proc in details.procedures:
        card = _card(refdata, proc, details.providers)
        if not card:
            missing.append(proc.code)
        for item_id, quantity in card:
            wanted[item_id] += quantity
    consumed: Counter[str] = Counter()
    for line in state.consumed_lines:
        consumed[line.item_id] += line.quantity
    # What is consumed leaves the reservation; once performed, what was not used is released.
    reservations = tuple(
        Line(item_id=i, quantity=q - consumed[i])
        for i, q in sorted(wanted.items())
        if q - consumed[i] > 0 and state.status != "completed"
    )
    return Plan(
        facility_id=details.facility_id,
        date=state.local_date,
        reservations=reservations,
        consumed=tuple(Line(item_id=i, quantity=q) for i, q in sorted(consumed.items()) if q),
        readiness=_readiness(details, refdata),
        missing_cards=tuple(missing),
    )


def _card(
    refdata: Any, proc: ProcedureRef, providers: tuple[str, ...]
) -> tuple[tuple[str, int], ...]:
    if refdata is None:
        return ()
    provider = proc.provider_id or (providers[0] if providers else "")
    card: tuple[tuple[str, int], ...] = refdata.preference_card(proc.code, provider or None)
    return card


_SEVERITY = {"ready": 0, "pending_authorization": 1, "not_covered": 2}


def _readiness(details: BookAppointment, refdata: Any) -> Readiness:
    """Worst readiness over the procedures; pending_coverage while no payer is known."""
    if not details.payer_id:
        return "pending_coverage"
    worst: Readiness = "ready"
    for proc in details.procedures:
        rule = refdata.payer_rule(details.payer_id, proc.code) if refdata is not None else None
        verdict: Readiness = "ready"
        if rule is not None and not rule.covered:
            verdict = "not_covered"
        elif rule is not None and rule.authorization_required:
            verdict = "pending_authorization"
        if _SEVERITY[verdict] > _SEVERITY[worst]:
            worst = verdict
    return worst


def _effects(
    before: AppointmentState, after: AppointmentState, command: Command[Any]
) -> tuple[Effect, ...]:
    """The plan to each owner that must hear of the change (absolute, so repeats converge)."""
    effects: list[Effect] = []
    old, new = before.plan, after.plan
    facilities = [f for f in dict.fromkeys((old.facility_id, new.facility_id)) if f]
    for facility in facilities:
        mine = new if facility == new.facility_id else Plan(facility_id=facility)
        prev = old if facility == old.facility_id else Plan(facility_id=facility)
        if (mine.reservations, mine.consumed) != (prev.reservations, prev.consumed):
            effects.append(
                Effect(
                    target=ActorRef("supply", after.id),
                    name="plan",
                    key=f"{command.key}:supply:{facility}",
                    payload={
                        "facility_id": facility,
                        "appointment_id": after.id,
                        "reservations": mine.reservations,
                        "consumed": mine.consumed,
                    },
                )
            )
        # Demand lines are the reservations on the date: _demand(mine) != _demand(prev).
        if mine.reservations != prev.reservations or (mine.reservations and mine.date != prev.date):
            demand = _demand(mine)
            effects.append(
                Effect(
                    target=ActorRef("erp", after.id),
                    name="demand",
                    key=f"{command.key}:erp:{facility}",
                    payload={"facility_id": facility, "appointment_id": after.id, "lines": demand},
                )
            )
    billing = _billing_view(after)
    if _billing_view(before) != billing:
        effects.append(
            Effect(
                target=ActorRef("billing", after.id),
                name="update",
                key=f"{command.key}:billing",
                payload=billing,
            )
        )
    if after.details is not None and after.details.visit_number and before.details is None:
        effects.append(
            Effect(
                target=ActorRef("visit", after.details.visit_number),
                name="link",
                key=f"{command.key}:visit",
                payload={"appointment_id": after.id},
            )
        )
    if _procedure_inputs(before) == _procedure_inputs(after):
        return tuple(effects)  # the same views (a move in time or place changes none)
    old_views = _procedure_views(before, command.refdata)
    new_views = _procedure_views(after, command.refdata)
    for code in sorted(set(old_views) | set(new_views)):
        view = new_views.get(code) or {**old_views[code], "status": "removed"}
        if view != old_views.get(code):
            effects.append(
                Effect(
                    target=ActorRef("procedure", f"{after.id}#{code}"),
                    name="update",
                    key=f"{command.key}:procedure:{code}",
                    payload=view,
                )
            )
    return tuple(effects)


def _procedure_inputs(state: AppointmentState) -> tuple[Any, ...]:
    """Everything of a state its procedure views are made of (with the reference data)."""
    details = state.details
    if details is None:
        return (None,)
    return (state.id, details.procedures, details.providers, state.status, state.charges)


def _procedure_views(state: AppointmentState, refdata: Any) -> dict[str, dict[str, Any]]:
    """Each procedure as its actor records it: card used, status, charges under its code."""
    details = state.details
    if details is None:
        return {}
    views: dict[str, dict[str, Any]] = {}
    for proc in details.procedures:
        provider = proc.provider_id or (details.providers[0] if details.providers else "")
        card = _card(refdata, proc, details.providers)
        general = refdata.preference_card(proc.code, None) if refdata is not None else ()
        source = "none" if not card else "provider" if provider and card != general else "general"
        views[proc.code] = {
            "appointment_id": state.id,
            "code": proc.code,
            "provider_id": provider,
            "card_source": source,
            "card": [{"item_id": i, "quantity": q} for i, q in card],
            "status": state.status,
            "charges": [msgspec.to_builtins(c) for c in state.charges if c.code == proc.code],
        }
    return views


def _demand(plan: Plan) -> tuple[dict[str, Any], ...]:
    """Demand lines for the date: what is still reserved (consumption is no longer demand)."""
    return tuple(
        {"item_id": line.item_id, "date": plan.date, "quantity": line.quantity}
        for line in plan.reservations
    )


def _billing_view(state: AppointmentState) -> dict[str, Any]:
    details = state.details
    return {
        "appointment_id": state.id,
        "status": state.status,
        "readiness": state.plan.readiness,
        "payer_id": details.payer_id if details else "",
        "procedures": [p.code for p in details.procedures] if details else [],
        "charges": [msgspec.to_builtins(c) for c in state.charges],
    }


def evolve(state: AppointmentState, event: Event) -> AppointmentState:
    """Apply one recorded event; never fails."""
    replace = msgspec.structs.replace
    if isinstance(event, Superseded):
        return state
    v = state.version + 1
    if isinstance(event, Booked):
        return replace(
            state,
            status="booked",
            details=event.details,
            source_ts=event.occurred_at,
            close_reason="",
            version=v,
            local_date=event.details.start.date().isoformat(),
        )
    if isinstance(event, Changed):
        return replace(
            state,
            details=event.details,
            source_ts=event.occurred_at,
            version=v,
            local_date=event.local_date,
        )
    if isinstance(event, Closed):
        return replace(
            state,
            status=event.status,
            close_reason=event.reason,
            source_ts=event.occurred_at,
            version=v,
        )
    if isinstance(event, CoverageKnown):
        if state.details is None:
            return state
        details = replace(
            state.details,
            payer_id=event.payer_id,
            patient_class=event.patient_class or state.details.patient_class,
        )
        return replace(state, details=details, version=v)
    if isinstance(event, ChargesPosted):
        return replace(
            state,
            status="completed",
            charges=(*state.charges, *event.lines),
            consumed_lines=(*state.consumed_lines, *event.consumed),
            version=v,
        )
    return replace(state, plan=event.plan)


KIND: EntityKind[AppointmentState, Event] = EntityKind(
    name="appointment",
    state_type=AppointmentState,
    commands={
        "book": BookAppointment,
        "sync": BookAppointment,
        "reschedule": RescheduleAppointment,
        "modify": ModifyAppointment,
        "cancel": CloseAppointment,
        "no_show": CloseAppointment,
        "delete": CloseAppointment,
        "coverage": Coverage,
        "post_charges": PostCharges,
    },
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="a scheduled procedure case",
)
