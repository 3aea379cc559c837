"""The routed fields of FHIR R4 resources, as msgspec Structs.

Only what caresync maps is decoded; every other field is skipped unread (unknown fields are
ignored, as FHIR's own extensibility needs).  Status codes are ``Literal`` types over the full
R4 value set, so that a code outside it fails with msgspec's JSON path (``$.status``), while a
known code that caresync does not route is told apart later (``unsupported_status``).

FHIR ``instant`` fields (``Appointment.start``/``end``, ``meta.lastUpdated``) are tz-aware
datetimes: a bare date or a time without an offset is a type error.  FHIR ``decimal`` fields are
``Decimal``, read from the JSON text, so ``40.10`` stays ``40.10``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

import msgspec

from caresync.codecs.scheduling import Timestamp

FhirId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9\-.]{1,64}$")]
"""A FHIR resource id (R4 ``id`` datatype)."""

CurrencyCode = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
"""An ISO 4217 currency code, as FHIR ``Money.currency`` requires."""

PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=2_147_483_647)]
"""FHIR ``positiveInt``."""

AppointmentStatus = Literal[
    "proposed",
    "pending",
    "booked",
    "arrived",
    "fulfilled",
    "cancelled",
    "noshow",
    "entered-in-error",
    "checked-in",
    "waitlist",
]
ChargeItemStatus = Literal[
    "planned", "billable", "not-billable", "aborted", "billed", "entered-in-error", "unknown"
]
SupplyRequestStatus = Literal[
    "draft", "active", "suspended", "cancelled", "completed", "entered-in-error", "unknown"
]
SupplyDeliveryStatus = Literal["in-progress", "completed", "abandoned", "entered-in-error"]
BundleType = Literal[
    "document",
    "message",
    "transaction",
    "transaction-response",
    "batch",
    "batch-response",
    "history",
    "searchset",
    "collection",
]


class _Element(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """Base of the decoded elements: frozen, keyword-only, FHIR's camelCase names on the wire,
    unknown fields ignored."""


class Coding(_Element, frozen=True, kw_only=True):
    """FHIR ``Coding``."""

    system: str = ""
    code: str = ""


class CodeableConcept(_Element, frozen=True, kw_only=True):
    """FHIR ``CodeableConcept``."""

    coding: tuple[Coding, ...] = ()
    text: str = ""


class Identifier(_Element, frozen=True, kw_only=True):
    """FHIR ``Identifier``."""

    system: str = ""
    value: str = ""


class Reference(_Element, frozen=True, kw_only=True):
    """FHIR ``Reference``: caresync resolves only literal references (``Location/1``)."""

    reference: str = ""
    display: str = ""


class Quantity(_Element, frozen=True, kw_only=True):
    """FHIR ``Quantity`` (and ``SimpleQuantity``)."""

    value: Decimal | None = None


class Money(_Element, frozen=True, kw_only=True):
    """FHIR ``Money``."""

    value: Decimal | None = None
    currency: CurrencyCode | None = None


class Meta(_Element, frozen=True, kw_only=True):
    """FHIR ``Meta``: ``lastUpdated`` is the command's ``occurred_at``."""

    last_updated: Timestamp | None = None


class _Resource(_Element, frozen=True, kw_only=True):
    """The fields every routed resource shares."""

    id: FhirId | None = None
    meta: Meta | None = None
    identifier: tuple[Identifier, ...] = ()


class Participant(_Element, frozen=True, kw_only=True):
    """``Appointment.participant``."""

    actor: Reference | None = None


class Appointment(_Resource, frozen=True, kw_only=True):
    """FHIR R4 ``Appointment``."""

    status: AppointmentStatus
    cancelation_reason: CodeableConcept | None = None
    service_type: tuple[CodeableConcept, ...] = ()
    start: Timestamp | None = None
    end: Timestamp | None = None
    minutes_duration: PositiveInt | None = None
    participant: tuple[Participant, ...] = ()


class ChargeItem(_Resource, frozen=True, kw_only=True):
    """FHIR R4 ``ChargeItem``."""

    status: ChargeItemStatus
    code: CodeableConcept
    context: Reference | None = None
    quantity: Quantity | None = None
    price_override: Money | None = None


class SupplyRequest(_Resource, frozen=True, kw_only=True):
    """FHIR R4 ``SupplyRequest``."""

    status: SupplyRequestStatus
    item_codeable_concept: CodeableConcept | None = None
    item_reference: Reference | None = None
    quantity: Quantity
    deliver_to: Reference | None = None


class SuppliedItem(_Element, frozen=True, kw_only=True):
    """``SupplyDelivery.suppliedItem``."""

    quantity: Quantity | None = None
    item_codeable_concept: CodeableConcept | None = None
    item_reference: Reference | None = None


class SupplyDelivery(_Resource, frozen=True, kw_only=True):
    """FHIR R4 ``SupplyDelivery``."""

    status: SupplyDeliveryStatus
    based_on: tuple[Reference, ...] = ()
    supplied_item: SuppliedItem | None = None
    destination: Reference | None = None


class BundleEntry(_Element, frozen=True, kw_only=True):
    """``Bundle.entry``: the resource is kept raw and decoded by its own type; empty (a
    zero-length ``Raw``) when the entry has none (DELETE, GET)."""

    resource: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


class Bundle(_Element, frozen=True, kw_only=True):
    """FHIR R4 ``Bundle``."""

    type: BundleType
    meta: Meta | None = None
    entry: tuple[BundleEntry, ...] = ()
