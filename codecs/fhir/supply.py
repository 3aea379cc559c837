"""FHIR R4 ``SupplyRequest`` -> ``item.request`` and ``SupplyDelivery`` ->
``item.goods_received``, both for the item entity ``<item code>@<Location id>``.

The facility must be a literal ``Location/<id>`` reference: a display name ("Location 1") does
not say which facility, and caresync does not guess one.
"""

from __future__ import annotations

from typing import get_args

import msgspec

from caresync.codecs.fhir.model import (
    CodeableConcept,
    Reference,
    SupplyDelivery,
    SupplyDeliveryStatus,
    SupplyRequest,
    SupplyRequestStatus,
)
from caresync.codecs.fhir.rejections import reject
from caresync.codecs.fhir.resource import Resource, Routing, decode_routed
from caresync.codecs.fhir.values import (
    any_reference_id,
    entity_id,
    first_code,
    first_identifier,
    positive_int,
    reference_id,
)
from caresync.codecs.scheduling import ReceiveSupply, RequestSupply
from caresync.codecs.source import SourceCommand

REQUEST_ROUTING = Routing(
    resource_type="SupplyRequest",
    statuses=get_args(SupplyRequestStatus),
    kinds={"active": "item.request"},
)
DELIVERY_ROUTING = Routing(
    resource_type="SupplyDelivery",
    statuses=get_args(SupplyDeliveryStatus),
    kinds={"completed": "item.goods_received"},
)
_REQUEST = msgspec.json.Decoder(SupplyRequest)
_DELIVERY = msgspec.json.Decoder(SupplyDelivery)


def map_supply_request(resource: Resource) -> SourceCommand:
    """An active SupplyRequest as ``item.request``: one requisition, one purchase order."""
    request, kind = decode_routed(resource, _REQUEST, REQUEST_ROUTING)
    item = _item(
        request.item_codeable_concept,
        request.item_reference,
        resource.at("itemCodeableConcept"),
        resource.at("itemReference"),
        kind,
    )
    entity = _item_entity(resource, item, request.deliver_to, "deliverTo", kind)
    # The logical id first: a SupplyDelivery names its request by reference (basedOn), so
    # both sides meet on ``SupplyRequest/<id>``; the business identifier only without one.
    identifier = first_identifier(request.identifier)
    if request.id is not None:
        request_id = f"SupplyRequest/{request.id}"
    elif identifier is not None:
        request_id = identifier.value
    else:
        raise reject(
            "missing_id",
            resource.at("identifier"),
            "no identifier with a value and no $.id: which requisition?",
            kind=kind,
            entity=entity,
        )
    quantity = positive_int(request.quantity, resource.at("quantity"))
    return SourceCommand(
        kind=kind,
        entity=entity,
        id=resource.command_id,
        payload=RequestSupply(request_id=request_id, quantity=quantity),
        occurred_at=resource.occurred_at(request.meta),
        source="fhir",
    )


def map_supply_delivery(resource: Resource) -> SourceCommand:
    """A completed SupplyDelivery as ``item.goods_received`` for the order it fulfils."""
    delivery, kind = decode_routed(resource, _DELIVERY, DELIVERY_ROUTING)
    supplied = delivery.supplied_item
    if supplied is None:
        raise reject("bad_value", resource.at("suppliedItem"), "no supplied item", kind=kind)
    item = _item(
        supplied.item_codeable_concept,
        supplied.item_reference,
        resource.at("suppliedItem.itemCodeableConcept"),
        resource.at("suppliedItem.itemReference"),
        kind,
    )
    entity = _item_entity(resource, item, delivery.destination, "destination", kind)
    po_id = ""
    if delivery.based_on:
        target = delivery.based_on[0]
        po_id = any_reference_id(target, resource.at("basedOn[0]"))
        if po_id and (target.reference or "").split("/")[-2:-1] == ["SupplyRequest"]:
            po_id = f"SupplyRequest/{po_id}"  # the request_id of that requisition's order
    if not po_id:
        identifier = first_identifier(delivery.identifier)
        po_id = identifier.value if identifier is not None else ""
    if not po_id:
        raise reject(
            "missing_id",
            resource.at("basedOn"),
            "no basedOn reference and no identifier value: which order?",
            kind=kind,
            entity=entity,
        )
    # No quantity: the whole order arrived (ReceiveSupply's 0).
    quantity = positive_int(supplied.quantity, resource.at("suppliedItem.quantity"), default=0)
    return SourceCommand(
        kind=kind,
        entity=entity,
        id=resource.command_id,
        payload=ReceiveSupply(po_id=po_id, quantity=quantity),
        occurred_at=resource.occurred_at(delivery.meta),
        source="fhir",
    )


def _item(
    concept: CodeableConcept | None,
    reference: Reference | None,
    concept_path: str,
    reference_path: str,
    kind: str,
) -> str:
    """The item: the code of ``item[x]`` as a CodeableConcept, else the referenced id."""
    code = first_code(concept) or any_reference_id(reference, reference_path)
    if not code:
        raise reject(
            "bad_value", concept_path, "no item code and no itemReference: which item?", kind=kind
        )
    return code


def _item_entity(
    resource: Resource, item: str, place: Reference | None, field: str, kind: str
) -> str:
    """``<item>@<facility>`` with the facility from a ``Location/<id>`` reference."""
    path = resource.at(field)
    facility = reference_id(place, "Location", path)
    if not facility:
        raise reject("missing_id", path, "no Location reference: which facility?", kind=kind)
    return entity_id(f"{item}@{facility}", path)
