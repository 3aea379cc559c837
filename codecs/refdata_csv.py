"""Reference data from CSV files: every row checked, every problem reported, all or nothing.

The files of one set (``facilities.csv``, ``suppliers.csv``, ``items.csv``, ``stock.csv``,
``preference_cards.csv``, ``payer_rules.csv``; any subset) are UTF-8 with a header row.  A
problem names the file, the physical line (the header is line 1) and the column by header name
and 1-based index::

    items.csv:14: column 4 (unit_cost): '12,50' is not a number

:func:`parse_refdata` checks everything before building anything: a set with one problem
raises :class:`~caresync.codecs.errors.RefDataError` listing all of them, and yields nothing.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from caresync.codecs.errors import RefDataError
from caresync.codecs.refdata import (
    Facility,
    Item,
    PayerRule,
    PreferenceCardLine,
    RefDataSet,
    StockLevel,
    Supplier,
)

MAX_VALUE_LENGTH = 256
"""Longest value accepted in any cell, in characters."""
MAX_COUNT = 1_000_000_000
"""Largest quantity or stock figure accepted: far beyond any real one, within msgpack's ints."""

# C0 and C1 controls, DEL, and the invisible characters that make a value read differently
# from what it is (zero-width spaces, direction marks and overrides, a stray BOM).
_HOSTILE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_INTEGER = re.compile(r"[+-]?\d+")
_TRUE = frozenset(("true", "yes", "y", "1"))
_FALSE = frozenset(("false", "no", "n", "0"))


@dataclass(frozen=True, slots=True)
class RowProblem:
    """One thing wrong with a reference-data set, located as precisely as it can be."""

    file: str
    line: int
    """Physical line in the file (the header is line 1); 0 for the file as a whole."""
    column: str = ""
    """Header name of the column, if the problem is in one."""
    column_index: int = 0
    """1-based position of the column in the file; 0 when it has none (a missing column)."""
    message: str = ""

    def __str__(self) -> str:
        where = self.file if self.line == 0 else f"{self.file}:{self.line}"
        if self.column_index:
            where += f": column {self.column_index}" + (f" ({self.column})" if self.column else "")
        elif self.column:
            where += f": column {self.column}"
        return f"{where}: {self.message}" if where else self.message

    def as_dict(self) -> dict[str, Any]:
        """The problem as a JSON-ready object."""
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "column_index": self.column_index,
            "message": self.message,
        }


# -- value checks: each returns the value or raises _Bad with the message --------------------
class _Bad(Exception):
    """A cell's value is not acceptable (the message says why)."""


def _show(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:37] + "...")


def _text(value: str) -> str:
    if not value:
        raise _Bad("a value is required")
    return value


def _optional(value: str) -> str:
    return value


def _identifier(value: str) -> str:
    # '@' joins an item and a facility into one entity id (GAUZE@MAIN-OR).
    if "@" in _text(value):
        raise _Bad(f"{_show(value)} contains '@', which caresync uses in item@facility ids")
    return value


def _decimal(value: str) -> str:
    if not _DECIMAL.fullmatch(_text(value)):
        raise _Bad(f"{_show(value)} is not a number")
    amount = Decimal(value)
    if amount < 0:
        raise _Bad(f"{_show(value)} is negative")
    return format(amount.copy_abs(), "f")  # "-0" is zero


def _count(value: str, least: int = 0) -> int:
    if not _INTEGER.fullmatch(_text(value)):
        raise _Bad(f"{_show(value)} is not a whole number")
    number = int(value)
    if number < least:
        raise _Bad(f"{_show(value)} is negative" if least == 0 else f"must be at least {least}")
    if number > MAX_COUNT:
        raise _Bad(f"{_show(value)} is larger than {MAX_COUNT}")
    return number


def _positive(value: str) -> int:
    return _count(value, least=1)


def _boolean(value: str) -> bool:
    word = _text(value).lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise _Bad(f"{_show(value)} is not a boolean (true/false, yes/no, y/n or 1/0)")


def _hostile(value: str) -> str | None:
    if (found := _HOSTILE.search(value)) is not None:
        return f"contains the control character U+{ord(found.group()):04X}"
    if len(value) > MAX_VALUE_LENGTH:
        return f"is {len(value)} characters long (at most {MAX_VALUE_LENGTH})"
    return None


# -- file layouts -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Layout:
    columns: tuple[tuple[str, Callable[[str], Any]], ...]
    keys: tuple[tuple[str, ...], ...]
    """Column groups whose values must be unique in the file."""


_LAYOUTS: dict[str, _Layout] = {
    "facilities.csv": _Layout(
        (("facility_id", _identifier), ("name", _text), ("cost_center", _text)),
        (("facility_id",),),
    ),
    "suppliers.csv": _Layout(
        (("supplier_id", _identifier), ("name", _text)),
        (("supplier_id",),),
    ),
    "items.csv": _Layout(
        (
            ("item_id", _identifier),
            ("description", _text),
            ("unit", _text),
            ("unit_cost", _decimal),
            ("supplier_id", _text),
            ("charge_code", _text),
        ),
        # Charge lines are matched to items by charge code: it must name one item.
        (("item_id",), ("charge_code",)),
    ),
    "stock.csv": _Layout(
        (
            ("facility_id", _text),
            ("item_id", _text),
            ("on_hand", _count),
            ("reorder_point", _count),
            ("reorder_quantity", _count),
        ),
        (("facility_id", "item_id"),),
    ),
    "preference_cards.csv": _Layout(
        (
            ("procedure_code", _text),
            ("item_id", _text),
            ("quantity", _positive),
            ("provider_id", _optional),
        ),
        (("procedure_code", "item_id", "provider_id"),),
    ),
    "payer_rules.csv": _Layout(
        (
            ("payer_id", _text),
            ("procedure_code", _text),
            ("authorization_required", _boolean),
            ("covered", _boolean),
        ),
        (("payer_id", "procedure_code"),),
    ),
}

KNOWN_FILES: tuple[str, ...] = tuple(_LAYOUTS)
"""The file names of a reference-data set, in the order they are checked."""

_OPTIONAL_COLUMNS = frozenset({("preference_cards.csv", "provider_id")})

# (file, column) -> (referenced file, its key column, what it is called in messages)
_REFERENCES: tuple[tuple[str, str, str, str, str], ...] = (
    ("items.csv", "supplier_id", "suppliers.csv", "supplier_id", "supplier"),
    ("stock.csv", "facility_id", "facilities.csv", "facility_id", "facility"),
    ("stock.csv", "item_id", "items.csv", "item_id", "item"),
    ("preference_cards.csv", "item_id", "items.csv", "item_id", "item"),
)
# A supplier is only checked when suppliers.csv is in the set; items, facilities always are.
_REFERENCE_OPTIONAL = frozenset({"suppliers.csv"})


@dataclass(slots=True)
class _Row:
    line: int
    values: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Table:
    name: str
    index: dict[str, int] = field(default_factory=dict)
    """Known column name -> its 1-based position."""
    rows: list[_Row] = field(default_factory=list)


class _Problems:
    def __init__(self) -> None:
        self.found: list[RowProblem] = []

    def add(self, file: str, line: int, message: str, column: str = "", index: int = 0) -> None:
        self.found.append(RowProblem(file, line, column, index, message))


def _decode(name: str, data: bytes, problems: _Problems) -> str | None:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        problems.add(name, line, f"not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}")
        return None


def _read_table(name: str, data: bytes, problems: _Problems) -> _Table | None:
    layout = _LAYOUTS[name]
    text = _decode(name, data, problems)
    if text is None:
        return None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    table = _Table(name)
    try:
        header = next(reader, None)
        if not header or not any(cell.strip() for cell in header):
            problems.add(name, 1, "the header row is missing or empty")
            return None
        header_names = _read_header(name, header, layout, table, problems)
        if header_names is None:
            return None
        previous = reader.line_num
        for cells in reader:
            line, previous = previous + 1, reader.line_num
            if not any(cell.strip() for cell in cells):
                continue  # a blank line, or an empty row as spreadsheets export them (",,,")
            table.rows.append(_read_row(name, line, cells, header_names, table, problems))
    except csv.Error as exc:
        problems.add(name, reader.line_num, f"malformed CSV: {exc}")
        return None
    return table


def _read_header(
    name: str, header: Sequence[str], layout: _Layout, table: _Table, problems: _Problems
) -> list[str] | None:
    names: list[str] = []
    seen: dict[str, int] = {}
    ok = True
    for i, cell in enumerate(header, start=1):
        label = cell.strip()
        if (why := _hostile(cell)) is not None:
            problems.add(name, 1, f"the column name {why}", "", i)
            ok = False
        key = label.lower()
        if key and key in seen:
            problems.add(name, 1, f"the column appears twice (also column {seen[key]})", label, i)
            ok = False
        seen.setdefault(key, i)
        known = key if key in dict(layout.columns) else None
        if known is not None:
            table.index.setdefault(known, i)
        names.append(known or label)
    for column, _ in layout.columns:
        if column not in table.index and (name, column) not in _OPTIONAL_COLUMNS:
            problems.add(name, 1, "a required column is missing", column)
            ok = False
    return names if ok or table.index else None


def _read_row(
    name: str,
    line: int,
    cells: Sequence[str],
    header: Sequence[str],
    table: _Table,
    problems: _Problems,
) -> _Row:
    row = _Row(line)
    if len(cells) > len(header):
        problems.add(
            name,
            line,
            f"the row has {len(cells)} values but the header has {len(header)} columns",
            "",
            len(header) + 1,
        )
        row.bad.add("")
    checks = dict(_LAYOUTS[name].columns)
    for i, label in enumerate(header, start=1):
        raw = cells[i - 1] if i <= len(cells) else ""
        if (why := _hostile(raw)) is not None:
            problems.add(name, line, why, label, i)
            row.bad.add(label)
            continue
        value = raw.strip()
        check = checks.get(label) if table.index.get(label) == i else None
        if check is None:
            if not label and value:
                problems.add(name, line, f"{_show(value)} is in a column without a name", "", i)
                row.bad.add(label)
            elif label:
                row.extra[label] = value
            continue
        try:
            row.values[label] = check(value)
        except _Bad as exc:
            problems.add(name, line, str(exc), label, i)
            row.bad.add(label)
    for column, check in checks.items():
        if column not in table.index and (name, column) in _OPTIONAL_COLUMNS:
            row.values[column] = check("")  # an optional column the file does not have
    return row


def _check_keys(table: _Table, problems: _Problems) -> None:
    for key in _LAYOUTS[table.name].keys:
        first: dict[tuple[Any, ...], int] = {}
        for row in table.rows:
            if any(column in row.bad or column not in row.values for column in key):
                continue
            value = tuple(row.values[column] for column in key)
            if value in first:
                what = key[0] if len(key) == 1 else "(" + ", ".join(key) + ")"
                shown = _show(value[0]) if len(key) == 1 else repr(value)
                problems.add(
                    table.name,
                    row.line,
                    f"duplicate {what} {shown} (first on line {first[value]})",
                    key[0],
                    table.index.get(key[0], 0),
                )
            else:
                first[value] = row.line


def _check_references(tables: Mapping[str, _Table], problems: _Problems) -> None:
    for source, column, target, target_column, noun in _REFERENCES:
        table = tables.get(source)
        if table is None or column not in table.index:
            continue
        index = table.index[column]
        known = tables.get(target)
        if known is not None and target_column not in known.index:
            continue  # the missing column is reported already; every row would be "unknown"
        if known is None:
            if target in _REFERENCE_OPTIONAL:
                continue
            if table.rows:
                problems.add(
                    source,
                    1,
                    f"{noun} ids cannot be checked: {target} is not in this set",
                    column,
                    index,
                )
            continue
        ids = {r.values[target_column] for r in known.rows if target_column in r.values}
        for row in table.rows:
            if column in row.values and row.values[column] not in ids:
                problems.add(
                    source,
                    row.line,
                    f"unknown {noun} {_show(row.values[column])} (not in {target})",
                    column,
                    index,
                )


def _build(tables: Mapping[str, _Table], loaded_at: datetime, source: str) -> RefDataSet:
    def rows(name: str) -> list[_Row]:
        table = tables.get(name)
        return table.rows if table is not None else []

    return RefDataSet(
        facilities=[Facility(**r.values, extra=r.extra) for r in rows("facilities.csv")],
        suppliers=[Supplier(**r.values, extra=r.extra) for r in rows("suppliers.csv")],
        items=[Item(**r.values, extra=r.extra) for r in rows("items.csv")],
        stock=[StockLevel(**r.values, extra=r.extra) for r in rows("stock.csv")],
        preference_cards=[
            PreferenceCardLine(**r.values, extra=r.extra) for r in rows("preference_cards.csv")
        ],
        payer_rules=[PayerRule(**r.values, extra=r.extra) for r in rows("payer_rules.csv")],
        loaded_at=loaded_at,
        source=source,
    )


def parse_refdata(
    files: Mapping[str, bytes], *, loaded_at: datetime | None = None, source: str = ""
) -> RefDataSet:
    """Check and build one reference-data set from its files' bytes, keyed by file name.

    Raises :class:`RefDataError` listing every problem (unknown file names included); nothing
    is built when there is one.  ``loaded_at`` defaults to now.
    """
    problems = _Problems()
    if not files:
        problems.add("", 0, "no reference data files (expected " + ", ".join(KNOWN_FILES) + ")")
    for name in sorted(set(files) - set(_LAYOUTS)):
        problems.add(name, 0, "unknown file (expected " + ", ".join(KNOWN_FILES) + ")")
    tables: dict[str, _Table] = {}
    for name in KNOWN_FILES:
        if name in files and (table := _read_table(name, files[name], problems)) is not None:
            tables[name] = table
    for table in tables.values():
        _check_keys(table, problems)
    _check_references(tables, problems)
    if problems.found:
        order = {name: i for i, name in enumerate(KNOWN_FILES)}
        raise RefDataError(
            sorted(
                problems.found,
                key=lambda p: (order.get(p.file, -1), p.file, p.line, p.column_index),
            )
        )
    return _build(tables, loaded_at or datetime.now(UTC), source)


def read_refdata_dir(path: Path, *, loaded_at: datetime | None = None) -> RefDataSet:
    """Read and check the ``*.csv`` files of a directory (see :func:`parse_refdata`).

    Every ``.csv`` file is read, so that a misnamed one is reported rather than ignored; other
    files (a README) are left alone.  Raises :class:`RefDataError`.
    """
    if not path.is_dir():
        raise RefDataError([RowProblem(str(path), 0, message="no such directory")])
    files = {
        p.name: p.read_bytes()
        for p in sorted(path.iterdir())
        if p.is_file() and p.suffix.lower() == ".csv"
    }
    if not files:
        raise RefDataError(
            [
                RowProblem(
                    str(path),
                    0,
                    message="no reference data files (expected " + ", ".join(KNOWN_FILES) + ")",
                )
            ]
        )
    return parse_refdata(files, loaded_at=loaded_at, source=str(path))


__all__ = [
    "KNOWN_FILES",
    "MAX_VALUE_LENGTH",
    "RefDataError",
    "RowProblem",
    "parse_refdata",
    "read_refdata_dir",
]
