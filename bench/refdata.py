"""The bench's reference data: the peer's 20 locations and 10 procedures as a caresync network.

Facilities ``fac0``..``fac19``; procedures ``proc0``..``proc9``, each with a general preference
card of ``items`` items of its own (``item<p * items + j>``, quantity 1), so a booking reserves
exactly ``items`` items at its facility; every item stocked at every facility, so deep that no
purchase order is ever raised (no crossing: nothing depends on the order items hear of
appointments); one payer (``PAY-BENCH``) whose ``*`` rule covers everything without
authorization, so every booking is ``ready``.  Charge codes (``CDM-item<n>``) are never
procedure codes: a procedure charge line consumes nothing.

The set is written as CSV files (:func:`write_csv`) and loaded like any other
(``caresync refdata load DIR``); the pure model of the run reads the same files back
(:func:`read_back`), so both decide with the same data.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from caresync.actors.refdata import RefData
from caresync.codecs.refdata_csv import read_refdata_dir

FACILITIES = tuple(f"fac{i}" for i in range(20))
"""The peer's 20 locations."""
PROCEDURES = tuple(f"proc{p}" for p in range(10))
"""The peer's 10 procedures."""
PAYER = "PAY-BENCH"
SUPPLIER = "SUP-BENCH"
ON_HAND = 1_000_000
"""Far above anything the workload reserves: the projection never reaches the reorder point."""
REORDER_POINT = 0
REORDER_QUANTITY = 100


def card_items(procedure: str, items_per_procedure: int) -> tuple[str, ...]:
    """The items on a procedure's card: ``items_per_procedure`` of its own."""
    p = PROCEDURES.index(procedure)
    return tuple(f"item{p * items_per_procedure + j}" for j in range(items_per_procedure))


def all_items(items_per_procedure: int) -> tuple[str, ...]:
    """Every item of every card."""
    return tuple(i for p in PROCEDURES for i in card_items(p, items_per_procedure))


def _write(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_csv(directory: Path, items_per_procedure: int) -> int:
    """Write the set's CSV files into ``directory`` (created); returns the stock rows written."""
    directory.mkdir(parents=True, exist_ok=True)
    items = all_items(items_per_procedure)
    _write(
        directory / "facilities.csv",
        ("facility_id", "name", "cost_center"),
        [(f, f"Bench facility {f}", f"CC-{f}") for f in FACILITIES],
    )
    _write(directory / "suppliers.csv", ("supplier_id", "name"), [(SUPPLIER, "Bench supply")])
    _write(
        directory / "items.csv",
        ("item_id", "description", "unit", "unit_cost", "supplier_id", "charge_code"),
        [(i, f"Bench item {i}", "EA", "1.00", SUPPLIER, f"CDM-{i}") for i in items],
    )
    stock = [(f, i, ON_HAND, REORDER_POINT, REORDER_QUANTITY) for f in FACILITIES for i in items]
    _write(
        directory / "stock.csv",
        ("facility_id", "item_id", "on_hand", "reorder_point", "reorder_quantity"),
        stock,
    )
    _write(
        directory / "preference_cards.csv",
        ("procedure_code", "item_id", "quantity", "provider_id"),
        [(p, i, 1, "") for p in PROCEDURES for i in card_items(p, items_per_procedure)],
    )
    _write(
        directory / "payer_rules.csv",
        ("payer_id", "procedure_code", "authorization_required", "covered"),
        [(PAYER, "*", "no", "yes")],
    )
    return len(stock)


def read_back(directory: Path, version: int) -> RefData:
    """The set as the router indexes it once loaded as ``version`` (raises RefDataError)."""
    return RefData(read_refdata_dir(directory), version=version)
