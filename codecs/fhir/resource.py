"""One resource on its way to a command: where it sits in the document, its bytes, its command
id; and its typed decoding, which tells an unknown status code (``bad_value``) from a known one
caresync does not route (``unsupported_status``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol, TypeVar

import msgspec

from caresync.codecs.fhir.model import Meta
from caresync.codecs.fhir.rejections import from_validation, reject, shown
from caresync.codecs.source import SourceError


class _HasStatus(Protocol):
    @property
    def status(self) -> str: ...


R = TypeVar("R", bound=_HasStatus)


class Resource(msgspec.Struct, frozen=True, kw_only=True):
    """A routed resource, the input of one mapping."""

    body: bytes
    """Its JSON text, exactly as sent (decimals keep their digits)."""
    tree: dict[str, Any]
    """Its parsed JSON (to quote a value as the sender wrote it)."""
    path: str
    """Its JSON path in the document: ``$``, or ``$.entry[2].resource`` in a Bundle."""
    command_id: str
    """``content_id`` of its canonical JSON."""
    fallback_at: datetime | None = None
    """``occurred_at`` when the resource has no ``meta.lastUpdated`` (the Bundle's)."""

    def at(self, field: str) -> str:
        """The JSON path of one of its fields."""
        return f"{self.path}.{field}"

    def occurred_at(self, meta: Meta | None) -> datetime | None:
        """``meta.lastUpdated``, else the Bundle's, else None (the time it entered the log)."""
        if meta is not None and meta.last_updated is not None:
            return meta.last_updated
        return self.fallback_at


class Routing(msgspec.Struct, frozen=True, kw_only=True):
    """How one resource type is routed: its name, every FHIR status and the routed ones."""

    resource_type: str
    statuses: tuple[str, ...]
    """The whole R4 value set of its ``status``."""
    kinds: Mapping[str, str]
    """Routed status -> command kind."""

    def kind_of(self, status: object) -> str:
        """The command kind of a status, ``""`` if not routed."""
        return self.kinds.get(status, "") if isinstance(status, str) else ""


def decode_routed(
    resource: Resource, decoder: msgspec.json.Decoder[R], routing: Routing
) -> tuple[R, str]:
    """The typed resource and its command kind, or the reason it is not routed."""
    status = resource.tree.get("status")
    try:
        decoded = decoder.decode(resource.body)
    except msgspec.ValidationError as exc:
        if isinstance(status, str) and status in routing.statuses and not routing.kind_of(status):
            # Refusing the status says more than a field caresync would not read anyway.
            raise _unsupported(resource, routing, status) from None
        raise from_validation(exc, resource.path, kind=routing.kind_of(status)) from None
    kind = routing.kind_of(decoded.status)
    if not kind:
        raise _unsupported(resource, routing, decoded.status)
    return decoded, kind


def _unsupported(resource: Resource, routing: Routing, status: str) -> SourceError:
    routed = ", ".join(routing.kinds)
    return reject(
        "unsupported_status",
        resource.at("status"),
        f"{routing.resource_type} status {shown(status)} is not routed (caresync maps {routed})",
    )
