"""The reference data actors decide with: an immutable, indexed view of one RefDataSet.

Built once per version by the router (see ``router/refdata.py``) and handed to actors as a
plain value: lookups are dictionary reads, there is no I/O and nothing changes after
construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TypeVar

from caresync.codecs.refdata import (
    Facility,
    Item,
    PayerRule,
    PreferenceCardLine,
    RefDataSet,
    StockLevel,
    Supplier,
)

ANY_PROCEDURE = "*"
"""The procedure code of a payer rule that applies to every procedure without its own rule."""

_K = TypeVar("_K")
_V = TypeVar("_V")


def _index(pairs: Iterable[tuple[_K, _V]]) -> Mapping[_K, _V]:
    return MappingProxyType(dict(pairs))


def _cards(
    lines: Iterable[PreferenceCardLine],
) -> Mapping[tuple[str, str], tuple[tuple[str, int], ...]]:
    cards: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for line in lines:
        cards.setdefault((line.procedure_code, line.provider_id), []).append(
            (line.item_id, line.quantity)
        )
    return MappingProxyType({key: tuple(items) for key, items in cards.items()})


class RefData:
    """Lookups over one reference-data version (``version`` 0 is :meth:`empty`)."""

    __slots__ = (
        "_cards",
        "_charge_codes",
        "_facilities",
        "_items",
        "_payer_rules",
        "_stock",
        "_suppliers",
        "dataset",
        "version",
    )

    def __init__(self, dataset: RefDataSet, *, version: int = 0) -> None:
        self.dataset = dataset
        """The set these lookups index."""
        self.version = version
        """The set's version (its reference-data stream sequence); 0 when it has none."""
        self._facilities = _index((f.facility_id, f) for f in dataset.facilities)
        self._suppliers = _index((s.supplier_id, s) for s in dataset.suppliers)
        self._items = _index((i.item_id, i) for i in dataset.items)
        self._charge_codes = _index((i.charge_code, i) for i in dataset.items if i.charge_code)
        self._stock = _index(((s.item_id, s.facility_id), s) for s in dataset.stock)
        self._cards = _cards(dataset.preference_cards)
        self._payer_rules = _index(((r.payer_id, r.procedure_code), r) for r in dataset.payer_rules)

    @classmethod
    def empty(cls) -> RefData:
        """No reference data at all: every lookup finds nothing."""
        return cls(RefDataSet(loaded_at=datetime(1970, 1, 1, tzinfo=UTC)))

    def facility(self, facility_id: str) -> Facility | None:
        """The facility with this id, or None."""
        return self._facilities.get(facility_id)

    def supplier(self, supplier_id: str) -> Supplier | None:
        """The supplier with this id, or None."""
        return self._suppliers.get(supplier_id)

    def item(self, item_id: str) -> Item | None:
        """The item with this id, or None."""
        return self._items.get(item_id)

    def item_by_charge_code(self, charge_code: str) -> Item | None:
        """The item billed under this chargemaster code, or None."""
        return self._charge_codes.get(charge_code)

    def preference_card(
        self, procedure_code: str, provider_id: str | None
    ) -> tuple[tuple[str, int], ...]:
        """(item id, quantity) lines of the card for a procedure, in file order.

        The provider's own card for the procedure wins over the general card; no card at all
        is an empty tuple.
        """
        if provider_id:
            own = self._cards.get((procedure_code, provider_id))
            if own is not None:
                return own
        return self._cards.get((procedure_code, ""), ())

    def payer_rule(self, payer_id: str, procedure_code: str) -> PayerRule | None:
        """The payer's rule for the procedure, else its ``*`` rule, else None."""
        rule = self._payer_rules.get((payer_id, procedure_code))
        if rule is None:
            rule = self._payer_rules.get((payer_id, ANY_PROCEDURE))
        return rule

    def stock_level(self, item_id: str, facility_id: str) -> StockLevel | None:
        """The stock row of one item at one facility, or None."""
        return self._stock.get((item_id, facility_id))

    def stock_levels(self) -> tuple[StockLevel, ...]:
        """Every stock row, in file order."""
        return tuple(self.dataset.stock)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.dataset.counts().items() if v)
        return f"RefData(version={self.version}{', ' + counts if counts else ''})"
