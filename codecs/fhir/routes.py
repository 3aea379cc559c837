"""Which FHIR resource types caresync routes, and the mapping of each to a command."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec

from caresync.codecs.fhir.appointment import ROUTING as APPOINTMENT
from caresync.codecs.fhir.appointment import map_appointment
from caresync.codecs.fhir.charge import ROUTING as CHARGE_ITEM
from caresync.codecs.fhir.charge import map_charge_item
from caresync.codecs.fhir.json_checks import canonical_json
from caresync.codecs.fhir.rejections import reject, shown
from caresync.codecs.fhir.resource import Resource, Routing
from caresync.codecs.fhir.supply import (
    DELIVERY_ROUTING,
    REQUEST_ROUTING,
    map_supply_delivery,
    map_supply_request,
)
from caresync.codecs.source import SourceCommand, content_id

WHAT_IS_ROUTED = (
    "caresync maps Appointment, ChargeItem, SupplyDelivery, SupplyRequest and Bundles of them"
)


class Route(msgspec.Struct, frozen=True):
    """A routed resource type: its statuses and kinds, and its mapping."""

    routing: Routing
    mapping: Callable[[Resource], SourceCommand]


ROUTES: dict[str, Route] = {
    "Appointment": Route(APPOINTMENT, map_appointment),
    "ChargeItem": Route(CHARGE_ITEM, map_charge_item),
    "SupplyRequest": Route(REQUEST_ROUTING, map_supply_request),
    "SupplyDelivery": Route(DELIVERY_ROUTING, map_supply_delivery),
}


def resource_type(node: Any, path: str) -> str:
    """The ``resourceType`` of a JSON node that must be a resource."""
    if not isinstance(node, dict):
        raise reject(
            "bad_value", path, f"expected a FHIR resource (an object), got {json_type(node)}"
        )
    value = node.get("resourceType")
    if value is None:
        raise reject("bad_value", f"{path}.resourceType", "missing: what resource is this?")
    if not isinstance(value, str):
        raise reject(
            "bad_value", f"{path}.resourceType", f"expected a string, got {json_type(value)}"
        )
    return value


def map_node(
    node: dict[str, Any],
    body: bytes,
    path: str,
    *,
    canonical: bytes | None = None,
    fallback_at: datetime | None = None,
) -> SourceCommand | None:
    """The command of one resource (``node`` parsed, ``body`` its bytes), None if its type is
    not routed.  Its id digests ``canonical`` (computed from ``node`` when not given)."""
    route = ROUTES.get(node["resourceType"])
    if route is None:
        return None
    digest_of = canonical if canonical is not None else canonical_json(node)
    resource = Resource(
        body=body,
        tree=node,
        path=path,
        command_id=content_id("fhir", digest_of),
        fallback_at=fallback_at,
    )
    return route.mapping(resource)


def not_routed(resource_type: str) -> str:
    """The reason a resource type is refused."""
    return f"resourceType {shown(resource_type)} is not routed: {WHAT_IS_ROUTED}"


def kind_of_node(node: Any) -> str:
    """Best-effort command kind of a resource node, ``""`` if unknown; never raises."""
    if not isinstance(node, dict):
        return ""
    name = node.get("resourceType")
    route = ROUTES.get(name) if isinstance(name, str) else None
    return route.routing.kind_of(node.get("status")) if route is not None else ""


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    return "null" if value is None else "number"
