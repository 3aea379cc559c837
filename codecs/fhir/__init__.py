"""FHIR R4 JSON source codec: Appointment, ChargeItem, SupplyRequest and SupplyDelivery (alone
or in a transaction, batch or collection Bundle) -> canonical ``SourceCommand`` tuples."""

from __future__ import annotations

from caresync.codecs.fhir.decode import DEFAULT_MAX_BYTES, decode_fhir, resource_kind

__all__ = ["DEFAULT_MAX_BYTES", "decode_fhir", "resource_kind"]
