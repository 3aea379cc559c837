"""Billing actor: the billing conversation of one appointment, keyed by appointment id.

The appointment sends its whole billing view on every change; this actor works out what the
billing system has not been told yet — readiness, new charge lines and credits, and, when the
case is cancelled, a no-show or deleted, the flag that pre-billing tasks must be reversed — and
sends exactly that downstream, keeping the sync ledger.  Claim status flows back from billing.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import msgspec

from caresync.actors.contract import Accepted, Command, Downstream, Effect, EntityKind, Rejected
from caresync.actors.ledger import DownstreamAck, Ledger, acknowledged, sent
from caresync.codecs.scheduling import ChargeLine

_CLOSED = ("cancelled", "no_show", "deleted")


class Update(msgspec.Struct, kw_only=True, frozen=True):
    """The appointment's billing view (absolute: repeats converge)."""

    appointment_id: str
    status: str
    readiness: str = ""
    payer_id: str = ""
    procedures: tuple[str, ...] = ()
    charges: tuple[ChargeLine, ...] = ()


class ClaimStatus(msgspec.Struct, kw_only=True, frozen=True):
    """Billing's word on the claim (``billing.claim_status``)."""

    appointment_id: str = ""
    status: Literal["released", "denied"]
    claim_id: str = ""
    reason: str = ""


class Told(msgspec.Struct, kw_only=True, frozen=True, tag="told"):
    """Billing was sent these changes."""

    readiness: str
    payer_id: str
    status: str
    lines: tuple[ChargeLine, ...]
    reversal: bool
    keys: tuple[str, ...]


class Claimed(msgspec.Struct, kw_only=True, frozen=True, tag="claimed"):
    status: str
    claim_id: str
    reason: str


class Acked(msgspec.Struct, kw_only=True, frozen=True, tag="acked"):
    ack: DownstreamAck


Event = Told | Claimed | Acked


class BillingState(msgspec.Struct, kw_only=True, frozen=True):
    """What billing has been told about one appointment, and what it said back."""

    id: str
    status: str = ""
    readiness: str = ""
    payer_id: str = ""
    lines: tuple[ChargeLine, ...] = ()
    reversal_flagged: bool = False
    claim_status: str = ""
    claim_id: str = ""
    claim_reason: str = ""
    ledger: Ledger = msgspec.field(default_factory=Ledger)

    @property
    def total(self) -> Decimal:
        """Charges minus credits."""
        total = Decimal(0)
        for line in self.lines:
            amount = _decimal(line.amount)
            total += -amount if line.type == "credit" else amount
        return total


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        return Decimal(0)


def initial(entity: str) -> BillingState:
    """An appointment billing has not heard of."""
    return BillingState(id=entity)


def decide(state: BillingState, command: Command[Any]) -> Accepted[Event] | Rejected:
    """Work out what billing must be told, or record what it said."""
    p = command.payload
    if isinstance(p, Update):
        return _update(state, command, p)
    if isinstance(p, ClaimStatus):
        return Accepted(events=(Claimed(status=p.status, claim_id=p.claim_id, reason=p.reason),))
    if isinstance(p, DownstreamAck):
        return Accepted(events=(Acked(ack=p),))
    return Rejected(f"billing does not handle {type(p).__name__}")


def _update(state: BillingState, command: Command[Any], p: Update) -> Accepted[Event]:
    effects: list[Effect] = []

    def send(operation: str, payload: dict[str, Any], suffix: str) -> None:
        effects.append(
            Effect(
                target=Downstream("billing", state.id),
                name=operation,
                key=f"{command.key}:billing:{suffix}",
                payload=payload,
            )
        )

    known = {line.line_id for line in state.lines}
    new_lines = tuple(line for line in p.charges if line.line_id not in known)
    if (p.readiness, p.payer_id) != (state.readiness, state.payer_id) and p.status not in _CLOSED:
        send(
            "readiness",
            {
                "appointment_id": state.id,
                "readiness": p.readiness,
                "payer_id": p.payer_id,
                "procedures": list(p.procedures),
            },
            "readiness",
        )
    for line in new_lines:
        operation = "credit" if line.type == "credit" else "charge"
        send(
            operation,
            {
                "appointment_id": state.id,
                "line_id": line.line_id,
                "code": line.code,
                "quantity": line.quantity,
                "amount": line.amount,
                "currency": line.currency,
                "reverses_line_id": line.reverses,
            },
            f"{operation}:{line.line_id}",
        )
    reversal = p.status in _CLOSED and not state.reversal_flagged
    if reversal:
        send("reversal", {"appointment_id": state.id, "reason": p.status}, "reversal")
    if not effects and p.status == state.status:
        return Accepted()
    told = Told(
        readiness=p.readiness,
        payer_id=p.payer_id,
        status=p.status,
        lines=new_lines,
        reversal=reversal,
        keys=tuple(e.key for e in effects),
    )
    return Accepted(events=(told,), effects=tuple(effects))


def evolve(state: BillingState, event: Event) -> BillingState:
    """Apply one recorded event; never fails."""
    replace = msgspec.structs.replace
    if isinstance(event, Told):
        return replace(
            state,
            status=event.status,
            readiness=event.readiness,
            payer_id=event.payer_id,
            lines=(*state.lines, *event.lines),
            # Booked again after a closure: the next closure must be reversed again.
            reversal_flagged=event.reversal or (state.reversal_flagged and event.status in _CLOSED),
            ledger=sent(state.ledger, event.keys),
        )
    if isinstance(event, Claimed):
        return replace(
            state, claim_status=event.status, claim_id=event.claim_id, claim_reason=event.reason
        )
    return replace(state, ledger=acknowledged(state.ledger, event.ack))


KIND: EntityKind[BillingState, Event] = EntityKind(
    name="billing",
    state_type=BillingState,
    commands={"update": Update, "claim_status": ClaimStatus, "downstream_ack": DownstreamAck},
    initial=initial,
    decide=decide,
    evolve=evolve,
    description="the billing conversation of one appointment",
)
