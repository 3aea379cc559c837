"""Pure actor logic: one module per entity kind, and the contract they share."""

from __future__ import annotations

from caresync.actors import (
    appointment,
    billing,
    erp,
    item,
    procedure,
    purchasing,
    supply,
    visit,
)
from caresync.actors.contract import (
    Accepted,
    ActorRef,
    Command,
    Decision,
    Downstream,
    Effect,
    EntityKind,
    Registry,
    Rejected,
    Target,
    effect_key,
)


def default_registry() -> Registry:
    """The entity kinds a standard caresync router hosts."""
    return Registry.of(
        appointment.KIND,
        procedure.KIND,
        billing.KIND,
        supply.KIND,
        erp.KIND,
        purchasing.KIND,
        item.KIND,
        visit.KIND,
    )


__all__ = [
    "Accepted",
    "ActorRef",
    "Command",
    "Decision",
    "Downstream",
    "Effect",
    "EntityKind",
    "Registry",
    "Rejected",
    "Target",
    "default_registry",
    "effect_key",
]
