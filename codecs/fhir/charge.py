"""FHIR R4 ``ChargeItem`` -> ``visit.post_charges`` with one charge line.

The visit is the Encounter in ``context``.  A billable or billed item is a charge; an item
entered in error or aborted is a credit reversing the same line.  The amount is
``priceOverride`` as sent: caresync never prices a charge itself.
"""

from __future__ import annotations

from typing import get_args

import msgspec

from caresync.codecs.fhir.model import ChargeItem, ChargeItemStatus
from caresync.codecs.fhir.rejections import reject
from caresync.codecs.fhir.resource import Resource, Routing, decode_routed
from caresync.codecs.fhir.values import (
    amount_text,
    entity_id,
    first_code,
    first_identifier,
    positive_int,
    reference_id,
)
from caresync.codecs.scheduling import ChargeLine, VisitCharges
from caresync.codecs.source import SourceCommand

KIND = "visit.post_charges"
ROUTING = Routing(
    resource_type="ChargeItem",
    statuses=get_args(ChargeItemStatus),
    kinds={"billable": KIND, "billed": KIND, "entered-in-error": KIND, "aborted": KIND},
)
_CREDITS = frozenset({"entered-in-error", "aborted"})
_DECODER = msgspec.json.Decoder(ChargeItem)


def credit_line_id(line_id: str) -> str:
    """The line id of the credit that reverses charge line ``line_id``."""
    return f"{line_id}:credit"


def map_charge_item(resource: Resource) -> SourceCommand:
    """One ChargeItem as ``visit.post_charges`` for its Encounter."""
    item, kind = decode_routed(resource, _DECODER, ROUTING)
    visit = reference_id(item.context, "Encounter", resource.at("context"))
    if not visit:
        raise reject(
            "missing_id", resource.at("context"), "no Encounter reference: which visit?", kind=kind
        )
    entity = entity_id(visit, resource.at("context"))
    line = _line(resource, item, kind, entity)
    return SourceCommand(
        kind=kind,
        entity=entity,
        id=resource.command_id,
        payload=VisitCharges(lines=(line,)),
        occurred_at=resource.occurred_at(item.meta),
        source="fhir",
    )


def _line(resource: Resource, item: ChargeItem, kind: str, entity: str) -> ChargeLine:
    identifier = first_identifier(item.identifier)
    if identifier is not None:
        line_id = identifier.value
    elif item.id is not None:
        line_id = f"ChargeItem/{item.id}"
    else:
        raise reject(
            "missing_id",
            resource.at("identifier"),
            "no identifier with a value and no $.id: which charge line?",
            kind=kind,
            entity=entity,
        )
    code = first_code(item.code)
    if not code:
        raise reject("bad_value", resource.at("code"), "no charge code", kind=kind, entity=entity)
    price = item.price_override
    if price is None or price.value is None:
        where = resource.at("priceOverride")
        raise reject(
            "bad_value",
            where if price is None else f"{where}.value",
            "no price; caresync never guesses a charge",
            kind=kind,
            entity=entity,
        )
    quantity = positive_int(item.quantity, resource.at("quantity"), default=1)
    amount = amount_text(price.value, resource.at("priceOverride.value"))
    currency = price.currency or "USD"
    if item.status in _CREDITS:
        return ChargeLine(
            line_id=credit_line_id(line_id),
            code=code,
            type="credit",
            quantity=quantity,
            amount=amount,
            currency=currency,
            reverses=line_id,
        )
    return ChargeLine(
        line_id=line_id, code=code, quantity=quantity, amount=amount, currency=currency
    )
