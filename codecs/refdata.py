"""Reference data on the wire: facilities, suppliers, items, stock, preference cards, payer rules.

One load of reference data is one :class:`RefDataSet`, published as one msgpack message on the
reference-data stream; its stream sequence is its version.  Every row keeps the columns its CSV
file had beyond the known ones in ``extra``.

Wire schema: never forbid unknown fields, new fields get defaults and go last, types never
change (see docs/contracts.md).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated

import msgspec

from caresync.codecs.errors import DecodeError


class Facility(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """A place where procedures happen and supplies are stocked."""

    facility_id: str
    name: str
    cost_center: str
    """Cost center the facility's supply cost is posted to."""
    extra: dict[str, str] = {}
    """Columns of the CSV row beyond the known ones, by header name."""


class Supplier(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """A vendor purchase orders go to."""

    supplier_id: str
    name: str
    extra: dict[str, str] = {}
    """Columns of the CSV row beyond the known ones, by header name."""


class Item(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """One entry of the item master."""

    item_id: str
    description: str
    unit: str
    """Unit of issue (EA, BX, PK...)."""
    unit_cost: str
    """Cost of one unit as a decimal string (``"12.50"``): exact on the wire, unlike a float."""
    supplier_id: str
    charge_code: str
    """Chargemaster code billing uses for this item; charge lines are matched to items by it."""
    extra: dict[str, str] = {}
    """Columns of the CSV row beyond the known ones, by header name."""

    @property
    def unit_cost_decimal(self) -> Decimal:
        """``unit_cost`` as a Decimal."""
        return Decimal(self.unit_cost)


class StockLevel(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Stock of one item at one facility, and when to reorder it."""

    facility_id: str
    item_id: str
    on_hand: int
    reorder_point: int
    """Projected available stock at or below which a purchase order is raised."""
    reorder_quantity: int
    """How many units one purchase order asks for."""
    extra: dict[str, str] = {}
    """Columns of the CSV row beyond the known ones, by header name."""


class PreferenceCardLine(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """One line of a preference card: an item and how many a procedure uses."""

    procedure_code: str
    item_id: str
    quantity: int
    provider_id: str = ""
    """The provider whose own card this is; empty for the general card of the procedure."""
    extra: dict[str, str] = {}
    """Columns of the CSV row beyond the known ones, by header name."""


class PayerRule(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Whether a payer covers a procedure and needs an authorization first."""

    payer_id: str
    procedure_code: str
    """A procedure code, or ``*`` for every procedure without a rule of its own."""
    authorization_required: bool
    covered: bool
    extra: dict[str, str] = {}
    """Columns of the CSV row beyond the known ones, by header name."""


class RefDataSet(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """One load of reference data: everything in force from its version on."""

    facilities: list[Facility] = []
    suppliers: list[Supplier] = []
    items: list[Item] = []
    stock: list[StockLevel] = []
    preference_cards: list[PreferenceCardLine] = []
    payer_rules: list[PayerRule] = []
    loaded_at: Annotated[datetime, msgspec.Meta(tz=True)]
    """When the set was read (timezone-aware); the stream timestamp decides when it applies."""
    source: str = ""
    """Where it was read from (a directory), for people."""

    def counts(self) -> dict[str, int]:
        """Rows per table, by the table's file stem."""
        return {
            "facilities": len(self.facilities),
            "suppliers": len(self.suppliers),
            "items": len(self.items),
            "stock": len(self.stock),
            "preference_cards": len(self.preference_cards),
            "payer_rules": len(self.payer_rules),
        }


_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder(RefDataSet)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode_refdata_set(dataset: RefDataSet) -> bytes:
    """The set in msgpack, as published on the reference-data stream."""
    return _msgpack_encoder.encode(dataset)


def decode_refdata_set(data: bytes) -> RefDataSet:
    """Decode a published set; raises DecodeError naming the problem."""
    try:
        return _msgpack_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"reference data set does not match the schema: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed msgpack reference data set: {exc}") from exc


def refdata_digest(dataset: RefDataSet) -> str:
    """sha256 (hex) of the set's content: the same rows give the same digest.

    ``loaded_at`` and ``source`` are left out, so that loading the same files again, later or
    from another directory, is recognised as a duplicate (it is the set's ``Nats-Msg-Id``).
    """
    content = msgspec.structs.replace(dataset, loaded_at=_EPOCH, source="")
    return hashlib.sha256(encode_refdata_set(content)).hexdigest()
