"""Reading FHIR datatypes into caresync values: references, codes, identifiers, quantities and
money.  Every reader names the JSON path it was given when it refuses a value."""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal

from caresync.codecs.fhir.model import CodeableConcept, Identifier, Quantity, Reference
from caresync.codecs.fhir.rejections import reject, shown

MAX_ENTITY_CHARS = 256
"""The envelope's limit on entity ids."""
MAX_QUANTITY = 1_000_000
"""Far above any real count of procedures or supplies; keeps ``int()`` of a hostile
``1e999999999`` from ever running."""
_MAX_AMOUNT_DIGITS = 15
_MAX_AMOUNT_DECIMALS = 6

_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def parse_reference(text: str, path: str) -> tuple[str, str] | None:
    """``(type, id)`` of a literal reference (``Location/1``, ``http://x/fhir/Location/1``,
    ``Location/1/_history/2``), or None for what caresync cannot resolve on its own: an empty
    string, a contained (``#p1``), ``urn:uuid:``/``urn:oid:`` or conditional (``Patient?...``)
    reference.  A ``Type/id`` whose id is not a FHIR id is a ``bad_value``."""
    if not text or text.startswith(("#", "urn:")) or "?" in text:
        return None
    parts = text.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or not _TYPE.fullmatch(parts[-2]):
        return None
    if not _ID.fullmatch(parts[-1]):
        raise reject("bad_value", path, f"{shown(text)} does not end in a FHIR id")
    return parts[-2], parts[-1]


def reference_id(reference: Reference | None, resource_type: str, path: str) -> str:
    """The id of ``reference`` if it points at a ``resource_type``, else ``""``."""
    if reference is None:
        return ""
    target = parse_reference(reference.reference, f"{path}.reference")
    if target is None or target[0] != resource_type:
        return ""
    return target[1]


def any_reference_id(reference: Reference | None, path: str) -> str:
    """The id of a literal reference to any resource type, else ``""``."""
    if reference is None:
        return ""
    target = parse_reference(reference.reference, f"{path}.reference")
    return "" if target is None else target[1]


def first_code(concept: CodeableConcept | None) -> str:
    """The code of the first coding that has one (``coding[0].code`` in practice), or ``""``."""
    if concept is None:
        return ""
    return next((c.code for c in concept.coding if c.code.strip()), "")


def first_identifier(identifiers: Iterable[Identifier]) -> Identifier | None:
    """The first identifier with a value."""
    return next((i for i in identifiers if i.value.strip()), None)


def entity_id(text: str, path: str) -> str:
    """``text`` as an entity id: at most 256 characters, kept verbatim."""
    if len(text) > MAX_ENTITY_CHARS:
        raise reject(
            "bad_value", path, f"id {shown(text)} is longer than {MAX_ENTITY_CHARS} characters"
        )
    return text


def positive_int(quantity: Quantity | None, path: str, *, default: int | None = None) -> int:
    """``quantity.value`` as a positive integer (``10`` and ``10.0`` both count); ``default``
    when there is no quantity at all, a ``bad_value`` if no default."""
    if quantity is None or quantity.value is None:
        if default is not None:
            return default
        where = path if quantity is None else f"{path}.value"
        raise reject("bad_value", where, "no quantity")
    value = quantity.value
    if not (value.is_finite() and 1 <= value <= MAX_QUANTITY and value == value.to_integral()):
        raise reject(
            "bad_value",
            f"{path}.value",
            f"quantity {shown(value)} is not a positive integer (at most {MAX_QUANTITY})",
        )
    return int(value)


def amount_text(value: Decimal, path: str) -> str:
    """A money value as exact decimal text (``40.10`` stays ``40.10``), never in exponent form."""
    if not value.is_finite():
        raise reject("bad_value", path, f"amount {shown(value)} is not a number")
    if value < 0:
        raise reject("bad_value", path, f"amount {shown(value)} is negative")
    exponent = value.as_tuple().exponent  # an int: the value is finite
    too_fine = isinstance(exponent, int) and exponent < -_MAX_AMOUNT_DECIMALS
    if value.adjusted() >= _MAX_AMOUNT_DIGITS or too_fine:
        raise reject(
            "bad_value",
            path,
            f"amount {shown(value)} is out of range (under 10^{_MAX_AMOUNT_DIGITS}, "
            f"at most {_MAX_AMOUNT_DECIMALS} decimals)",
        )
    return format(abs(value), "f")
