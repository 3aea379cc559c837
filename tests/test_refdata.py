"""Reference data without a broker: CSV checks located by file, line and column, the wire
Structs, the lookups actors use, and the catalog of versions by time."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

import caresync.config
from caresync.actors.refdata import RefData
from caresync.codecs import DecodeError, RefDataError
from caresync.codecs.refdata import (
    Facility,
    Item,
    PayerRule,
    PreferenceCardLine,
    RefDataSet,
    StockLevel,
    Supplier,
    decode_refdata_set,
    encode_refdata_set,
    refdata_digest,
)
from caresync.codecs.refdata_csv import RowProblem, parse_refdata, read_refdata_dir
from caresync.router.refdata import RefDataCatalog

DEMO = Path(caresync.config.__file__).parent / "demo"
WHEN = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


def csv(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def good_files() -> dict[str, bytes]:
    return {
        "facilities.csv": csv("facility_id,name,cost_center", "F1,Main,CC-1", "F2,North,CC-2"),
        "suppliers.csv": csv("supplier_id,name", "S1,Acme", "S2,Ortho"),
        "items.csv": csv(
            "item_id,description,unit,unit_cost,supplier_id,charge_code",
            "GAUZE,Gauze,PK,2.15,S1,C-1",
            "KIT,Knee kit,EA,4250.00,S2,C-2",
        ),
        "stock.csv": csv(
            "facility_id,item_id,on_hand,reorder_point,reorder_quantity",
            "F1,GAUZE,100,20,50",
            "F1,KIT,4,2,3",
            "F2,KIT,1,1,2",
        ),
        "preference_cards.csv": csv(
            "procedure_code,item_id,quantity,provider_id",
            "27447,KIT,1,",
            "27447,GAUZE,4,",
            "27447,KIT,1,DR-P",
            "27447,GAUZE,2,DR-P",
        ),
        "payer_rules.csv": csv(
            "payer_id,procedure_code,authorization_required,covered",
            "HMO,27447,yes,yes",
            "HMO,*,no,yes",
            "BASIC,66984,No,NO",
        ),
    }


def problems_of(files: dict[str, bytes]) -> list[RowProblem]:
    with pytest.raises(RefDataError) as info:
        parse_refdata(files, loaded_at=WHEN)
    return info.value.problems


def only_problem(files: dict[str, bytes]) -> str:
    problems = problems_of(files)
    assert len(problems) == 1, [str(p) for p in problems]
    return str(problems[0])


def with_file(name: str, *lines: str) -> dict[str, bytes]:
    return good_files() | {name: csv(*lines)}


# -- a good set -----------------------------------------------------------------------------------
def test_a_good_set_parses_into_typed_rows() -> None:
    data = parse_refdata(good_files(), loaded_at=WHEN, source="here")
    assert data.counts() == {
        "facilities": 2,
        "suppliers": 2,
        "items": 2,
        "stock": 3,
        "preference_cards": 4,
        "payer_rules": 3,
    }
    assert data.items[1] == Item(
        item_id="KIT",
        description="Knee kit",
        unit="EA",
        unit_cost="4250.00",
        supplier_id="S2",
        charge_code="C-2",
    )
    assert data.items[0].unit_cost_decimal == Decimal("2.15")
    assert data.stock[1] == StockLevel(
        facility_id="F1", item_id="KIT", on_hand=4, reorder_point=2, reorder_quantity=3
    )
    assert data.preference_cards[2].provider_id == "DR-P"
    assert data.payer_rules[2] == PayerRule(
        payer_id="BASIC", procedure_code="66984", authorization_required=False, covered=False
    )
    assert (data.loaded_at, data.source) == (WHEN, "here")


def test_extra_columns_are_kept_and_headers_and_values_are_trimmed() -> None:
    files = with_file(
        "facilities.csv",
        " Facility_ID , name,cost_center,region , GL Account",
        " F1 ,Main,CC-1, central ,6100",
        "F2,North,CC-2,,",
    )
    data = parse_refdata(files, loaded_at=WHEN)
    assert data.facilities[0] == Facility(
        facility_id="F1",
        name="Main",
        cost_center="CC-1",
        extra={"region": "central", "GL Account": "6100"},
    )
    assert data.facilities[1].extra == {"region": "", "GL Account": ""}


def test_a_utf8_bom_and_crlf_line_ends_are_tolerated() -> None:
    files = good_files() | {
        "suppliers.csv": "\ufeffsupplier_id,name\r\nS1,Acmé\r\nS2,Ortho\r\n".encode()
    }
    data = parse_refdata(files, loaded_at=WHEN)
    assert [s.name for s in data.suppliers] == ["Acmé", "Ortho"]


def test_booleans_accept_every_spelling_in_any_case() -> None:
    rows = [
        f"P,{code},{a},{b}"
        for code, (a, b) in enumerate(
            [("true", "FALSE"), ("Yes", "no"), ("Y", "n"), ("1", "0")], start=1
        )
    ]
    files = with_file(
        "payer_rules.csv", "payer_id,procedure_code,authorization_required,covered", *rows
    )
    data = parse_refdata(files, loaded_at=WHEN)
    assert [(r.authorization_required, r.covered) for r in data.payer_rules] == [(True, False)] * 4


def test_a_set_may_leave_files_out_and_suppliers_then_go_unchecked() -> None:
    files = good_files()
    del files["suppliers.csv"]
    data = parse_refdata(files, loaded_at=WHEN)
    assert data.suppliers == []
    assert [i.supplier_id for i in data.items] == ["S1", "S2"]


def test_the_demo_set_loads_clean() -> None:
    data = read_refdata_dir(DEMO)
    counts = data.counts()
    assert counts["facilities"] == 3
    assert counts["suppliers"] == 3
    assert counts["items"] == 12
    assert counts["stock"] == 36
    assert counts["payer_rules"] >= 3
    ref = RefData(data)
    assert {f.facility_id for f in data.facilities} == {"MAIN-OR", "ASC-NORTH", "ASC-SOUTH"}
    procedures = {line.procedure_code for line in data.preference_cards}
    assert {"27447", "27130", "66984", "29881", "47562", "45378"} <= procedures
    assert any(line.provider_id for line in data.preference_cards)
    assert ref.preference_card("27447", "DR-PATEL") != ref.preference_card("27447", None)
    hmo = ref.payer_rule("NORTHWIND-HMO", "27447")
    assert hmo is not None
    assert hmo.authorization_required
    basic = ref.payer_rule("BASIC-CARE", "66984")
    assert basic is not None
    assert not basic.covered
    # A few completions cross a reorder point somewhere.
    assert any(0 < s.on_hand - s.reorder_point <= 2 for s in data.stock)
    assert all(s.reorder_quantity > 0 for s in data.stock)


# -- every problem located by file, line and column ------------------------------------------------
def test_a_bad_number_names_file_line_and_column() -> None:
    rows = [f"I{n},Item {n},EA,1.00,S1,C{n}" for n in range(12)]
    files = with_file(
        "items.csv",
        "item_id,description,unit,unit_cost,supplier_id,charge_code",
        "GAUZE,Gauze,PK,2.15,S1,C-1",
        *rows,
        'KIT,Knee kit,EA,"12,50",S2,C-2',
    )
    assert only_problem(files) == "items.csv:15: column 4 (unit_cost): '12,50' is not a number"


@pytest.mark.parametrize(
    ("name", "lines", "expected"),
    [
        (
            "items.csv",
            [
                "item_id,description,unit,supplier_id,charge_code",
                "GAUZE,G,PK,S1,C-1",
                "KIT,K,EA,S2,C-2",
            ],
            "items.csv:1: column unit_cost: a required column is missing",
        ),
        (
            "facilities.csv",
            ["facility_id,name,cost_center", "F1,Main,CC-1", "F2,North,"],
            "facilities.csv:3: column 3 (cost_center): a value is required",
        ),
        (
            "facilities.csv",
            ["facility_id,name,cost_center", "F1,Main,CC-1", "F2,North"],
            "facilities.csv:3: column 3 (cost_center): a value is required",
        ),
        (
            "items.csv",
            [
                "item_id,description,unit,unit_cost,supplier_id,charge_code",
                "GAUZE,G,PK,-2.15,S1,C-1",
                "KIT,K,EA,1,S2,C-2",
            ],
            "items.csv:2: column 4 (unit_cost): '-2.15' is negative",
        ),
        (
            "items.csv",
            [
                "item_id,description,unit,unit_cost,supplier_id,charge_code",
                "GAUZE,G,PK,NaN,S1,C-1",
                "KIT,K,EA,1,S2,C-2",
            ],
            "items.csv:2: column 4 (unit_cost): 'NaN' is not a number",
        ),
        (
            "stock.csv",
            ["facility_id,item_id,on_hand,reorder_point,reorder_quantity", "F1,KIT,1.5,1,1"],
            "stock.csv:2: column 3 (on_hand): '1.5' is not a whole number",
        ),
        (
            "stock.csv",
            ["facility_id,item_id,on_hand,reorder_point,reorder_quantity", "F1,KIT,1,-1,1"],
            "stock.csv:2: column 4 (reorder_point): '-1' is negative",
        ),
        (
            "stock.csv",
            [
                "facility_id,item_id,on_hand,reorder_point,reorder_quantity",
                "F1,KIT,1,1,99999999999999999999999",
            ],
            "stock.csv:2: column 5 (reorder_quantity): '99999999999999999999999' is larger "
            "than 1000000000",
        ),
        (
            "preference_cards.csv",
            ["procedure_code,item_id,quantity,provider_id", "27447,KIT,0,"],
            "preference_cards.csv:2: column 3 (quantity): must be at least 1",
        ),
        (
            "payer_rules.csv",
            ["payer_id,procedure_code,authorization_required,covered", "HMO,*,maybe,yes"],
            "payer_rules.csv:2: column 3 (authorization_required): 'maybe' is not a boolean "
            "(true/false, yes/no, y/n or 1/0)",
        ),
        (
            "facilities.csv",
            ["facility_id,name,cost_center", "F1,Main,CC-1", "F2,North,CC-2", "F1,Again,CC-3"],
            "facilities.csv:4: column 1 (facility_id): duplicate facility_id 'F1' "
            "(first on line 2)",
        ),
        (
            "suppliers.csv",
            ["supplier_id,name", "S1,Acme", "S2,Ortho", "S2,Ortho again"],
            "suppliers.csv:4: column 1 (supplier_id): duplicate supplier_id 'S2' (first on line 3)",
        ),
        (
            "items.csv",
            [
                "item_id,description,unit,unit_cost,supplier_id,charge_code",
                "GAUZE,G,PK,1,S1,C-1",
                "KIT,K,EA,1,S2,C-2",
                "GAUZE,G2,PK,1,S1,C-3",
            ],
            "items.csv:4: column 1 (item_id): duplicate item_id 'GAUZE' (first on line 2)",
        ),
        (
            "items.csv",
            [
                "item_id,description,unit,unit_cost,supplier_id,charge_code",
                "GAUZE,G,PK,1,S1,C-1",
                "KIT,K,EA,1,S2,C-1",
            ],
            "items.csv:3: column 6 (charge_code): duplicate charge_code 'C-1' (first on line 2)",
        ),
        (
            "stock.csv",
            [
                "facility_id,item_id,on_hand,reorder_point,reorder_quantity",
                "F1,KIT,1,1,1",
                "F2,KIT,1,1,1",
                "F1,KIT,2,1,1",
            ],
            "stock.csv:4: column 1 (facility_id): duplicate (facility_id, item_id) "
            "('F1', 'KIT') (first on line 2)",
        ),
        (
            "preference_cards.csv",
            [
                "procedure_code,item_id,quantity,provider_id",
                "27447,KIT,1,",
                "27447,KIT,1,DR-P",
                "27447,KIT,2,",
            ],
            "preference_cards.csv:4: column 1 (procedure_code): duplicate "
            "(procedure_code, item_id, provider_id) ('27447', 'KIT', '') (first on line 2)",
        ),
        (
            "payer_rules.csv",
            [
                "payer_id,procedure_code,authorization_required,covered",
                "HMO,*,no,yes",
                "HMO,*,yes,yes",
            ],
            "payer_rules.csv:3: column 1 (payer_id): duplicate (payer_id, procedure_code) "
            "('HMO', '*') (first on line 2)",
        ),
        (
            "items.csv",
            [
                "item_id,description,unit,unit_cost,supplier_id,charge_code",
                "GAUZE,G,PK,1,S1,C-1",
                "KIT,K,EA,1,S9,C-2",
            ],
            "items.csv:3: column 5 (supplier_id): unknown supplier 'S9' (not in suppliers.csv)",
        ),
        (
            "stock.csv",
            ["facility_id,item_id,on_hand,reorder_point,reorder_quantity", "F1,NOPE,1,1,1"],
            "stock.csv:2: column 2 (item_id): unknown item 'NOPE' (not in items.csv)",
        ),
        (
            "stock.csv",
            ["facility_id,item_id,on_hand,reorder_point,reorder_quantity", "F9,KIT,1,1,1"],
            "stock.csv:2: column 1 (facility_id): unknown facility 'F9' (not in facilities.csv)",
        ),
        (
            "preference_cards.csv",
            ["procedure_code,item_id,quantity,provider_id", "27447,NOPE,1,"],
            "preference_cards.csv:2: column 2 (item_id): unknown item 'NOPE' (not in items.csv)",
        ),
        (
            "facilities.csv",
            ["facility_id,name,cost_center", "F1,Main\x07,CC-1", "F2,North,CC-2"],
            "facilities.csv:2: column 2 (name): contains the control character U+0007",
        ),
        (
            "facilities.csv",
            ["facility_id,name,cost_center", "F1,Main\u202e,CC-1", "F2,North,CC-2"],
            "facilities.csv:2: column 2 (name): contains the control character U+202E",
        ),
        (
            "facilities.csv",
            ["facility_id,name,cost_center", "F1," + "x" * 257 + ",CC-1", "F2,North,CC-2"],
            "facilities.csv:2: column 2 (name): is 257 characters long (at most 256)",
        ),
        (
            "facilities.csv",
            ["facility_id,name,cost_center,note", "F1,Main,CC-1,a\x00b", "F2,North,CC-2,"],
            "facilities.csv:2: column 4 (note): contains the control character U+0000",
        ),
        (
            "items.csv",
            [
                "item_id,description,unit,unit_cost,supplier_id,charge_code",
                "GAUZE,G,PK,1,S1,C-1",
                "KIT,K,EA,1,S2,C-2",
                "KIT@F1,K,EA,1,S2,C-3",
            ],
            "items.csv:4: column 1 (item_id): 'KIT@F1' contains '@', which caresync uses in "
            "item@facility ids",
        ),
        (
            "suppliers.csv",
            ["supplier_id,name", "S1,Acme", "S2,Ortho,surplus"],
            "suppliers.csv:3: column 3: the row has 3 values but the header has 2 columns",
        ),
        (
            "suppliers.csv",
            ["supplier_id,name", "S1,Acme", 'S2,"Ortho'],
            "suppliers.csv:3: malformed CSV: unexpected end of data",
        ),
        (
            "suppliers.csv",
            ["supplier_id,name,name", "S1,Acme,x", "S2,Ortho,y"],
            "suppliers.csv:1: column 3 (name): the column appears twice (also column 2)",
        ),
        ("suppliers.csv", [""], "suppliers.csv:1: the header row is missing or empty"),
    ],
)
def test_each_rule_reports_file_line_and_column(name: str, lines: list[str], expected: str) -> None:
    assert only_problem(with_file(name, *lines)) == expected


def test_an_empty_file_has_no_header() -> None:
    files = good_files() | {"suppliers.csv": b""}
    assert only_problem(files) == "suppliers.csv:1: the header row is missing or empty"


def test_bytes_that_are_not_utf8_are_located_by_line() -> None:
    files = good_files() | {"suppliers.csv": b"supplier_id,name\nS1,Acme\nS2,Ort\xffho\n"}
    assert only_problem(files) == "suppliers.csv:3: not UTF-8: byte 0xff at offset 31"


def test_line_numbers_are_physical_lines() -> None:
    files = with_file(
        "suppliers.csv",
        "supplier_id,name",
        "",
        'S1,"Acme',
        'Surgical"',
        "",
        "S2,",
    )
    problems = [str(p) for p in problems_of(files)]
    assert problems == [
        "suppliers.csv:3: column 2 (name): contains the control character U+000A",
        "suppliers.csv:6: column 2 (name): a value is required",
    ]


def test_blank_and_spreadsheet_empty_rows_are_skipped() -> None:
    files = with_file("suppliers.csv", "supplier_id,name", "S1,Acme", ",", "", "S2,Ortho", " , ")
    assert [s.supplier_id for s in parse_refdata(files, loaded_at=WHEN).suppliers] == ["S1", "S2"]


def test_references_need_the_referenced_file_in_the_set() -> None:
    files = good_files()
    del files["items.csv"]
    problems = [str(p) for p in problems_of(files)]
    assert problems == [
        "stock.csv:1: column 2 (item_id): item ids cannot be checked: items.csv is not in this set",
        "preference_cards.csv:1: column 2 (item_id): item ids cannot be checked: items.csv is "
        "not in this set",
    ]


def test_an_unknown_file_is_a_problem() -> None:
    files = good_files() | {"item.csv": b"item_id\n"}
    assert only_problem(files) == (
        "item.csv: unknown file (expected facilities.csv, suppliers.csv, items.csv, stock.csv, "
        "preference_cards.csv, payer_rules.csv)"
    )


def test_an_empty_set_is_a_problem() -> None:
    assert [p.message for p in problems_of({})] == [
        "no reference data files (expected facilities.csv, suppliers.csv, items.csv, "
        "stock.csv, preference_cards.csv, payer_rules.csv)"
    ]


def test_every_problem_in_every_file_is_reported_and_nothing_is_built() -> None:
    files = good_files()
    files["items.csv"] = csv(
        "item_id,description,unit,unit_cost,supplier_id,charge_code",
        "GAUZE,Gauze,PK,2.15,S1,C-1",
        "KIT,Knee kit,EA,lots,S2,C-2",
        "CEMENT,,EA,96.50,S7,C-3",
    )
    files["payer_rules.csv"] = csv(
        "payer_id,procedure_code,authorization_required,covered",
        "HMO,27447,yes,perhaps",
    )
    problems = problems_of(files)
    assert [(p.file, p.line, p.column, p.column_index) for p in problems] == [
        ("items.csv", 3, "unit_cost", 4),
        ("items.csv", 4, "description", 2),
        ("items.csv", 4, "supplier_id", 5),
        ("payer_rules.csv", 2, "covered", 4),
    ]
    assert problems[0].as_dict() == {
        "file": "items.csv",
        "line": 3,
        "column": "unit_cost",
        "column_index": 4,
        "message": "'lots' is not a number",
    }
    with pytest.raises(RefDataError) as info:
        parse_refdata(files)
    assert str(info.value).splitlines() == [str(p) for p in problems]


def test_read_refdata_dir_reads_csv_files_and_reports_misnamed_ones(tmp_path: Path) -> None:
    for name, data in good_files().items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "README.md").write_text("not data")
    data = read_refdata_dir(tmp_path, loaded_at=WHEN)
    assert data.source == str(tmp_path)
    assert data.counts()["stock"] == 3
    (tmp_path / "Stock-2.csv").write_bytes(b"x\n")
    with pytest.raises(RefDataError) as info:
        read_refdata_dir(tmp_path)
    assert [(p.file, p.line) for p in info.value.problems] == [("Stock-2.csv", 0)]
    with pytest.raises(RefDataError) as info:
        read_refdata_dir(tmp_path / "missing")
    assert str(info.value) == f"{tmp_path / 'missing'}: no such directory"


# -- the wire --------------------------------------------------------------------------------------
WIRE_VALUES: list[Any] = [
    Facility(facility_id="F1", name="Main", cost_center="CC-1", extra={"region": "c"}),
    Supplier(supplier_id="S1", name="Acme"),
    Item(
        item_id="I",
        description="d",
        unit="EA",
        unit_cost="12.50",
        supplier_id="S1",
        charge_code="C",
        extra={"catalog_number": "X-1"},
    ),
    StockLevel(facility_id="F1", item_id="I", on_hand=3, reorder_point=1, reorder_quantity=2),
    PreferenceCardLine(procedure_code="27447", item_id="I", quantity=2, provider_id="DR"),
    PayerRule(payer_id="P", procedure_code="*", authorization_required=True, covered=False),
]


@pytest.mark.parametrize("value", [*WIRE_VALUES, "set"], ids=lambda v: type(v).__name__)
def test_wire_structs_round_trip_in_json_and_msgpack(value: Any) -> None:
    if value == "set":
        value = parse_refdata(good_files(), loaded_at=WHEN, source="dir")
    kind = type(value)
    assert msgspec.json.decode(msgspec.json.encode(value), type=kind) == value
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=kind) == value


def test_readers_ignore_fields_they_do_not_know() -> None:
    raw = msgspec.to_builtins(parse_refdata(good_files(), loaded_at=WHEN))
    raw["items"][0]["shelf_life_days"] = 30
    raw["future_table"] = [{"a": 1}]
    decoded = decode_refdata_set(msgspec.msgpack.encode(raw))
    assert decoded.items[0].item_id == "GAUZE"
    assert decoded == parse_refdata(good_files(), loaded_at=WHEN)


def test_the_published_set_round_trips_and_its_digest_ignores_when_and_where() -> None:
    first = parse_refdata(good_files(), loaded_at=WHEN, source="a")
    again = parse_refdata(good_files(), loaded_at=datetime.now(UTC), source="b")
    assert decode_refdata_set(encode_refdata_set(first)) == first
    assert refdata_digest(first) == refdata_digest(again)
    changed = parse_refdata(
        with_file("suppliers.csv", "supplier_id,name", "S1,Acme", "S2,Ortho Inc"), loaded_at=WHEN
    )
    assert refdata_digest(changed) != refdata_digest(first)
    with pytest.raises(DecodeError):
        decode_refdata_set(b"\x81\xa5items\x01")


# -- lookups ---------------------------------------------------------------------------------------
@pytest.fixture
def ref() -> RefData:
    return RefData(parse_refdata(good_files(), loaded_at=WHEN), version=7)


def test_lookups_by_id_and_charge_code(ref: RefData) -> None:
    assert ref.version == 7
    facility = ref.facility("F1")
    assert facility is not None
    assert facility.cost_center == "CC-1"
    supplier = ref.supplier("S2")
    assert supplier is not None
    assert supplier.name == "Ortho"
    item = ref.item("KIT")
    assert item is not None
    assert item.unit_cost_decimal == Decimal("4250.00")
    assert ref.item_by_charge_code("C-1") == ref.item("GAUZE")
    stock = ref.stock_level("KIT", "F2")
    assert stock is not None
    assert (stock.on_hand, stock.reorder_point) == (1, 1)
    assert [(s.item_id, s.facility_id) for s in ref.stock_levels()] == [
        ("GAUZE", "F1"),
        ("KIT", "F1"),
        ("KIT", "F2"),
    ]
    assert ref.facility("F9") is None
    assert ref.item("NOPE") is None
    assert ref.item_by_charge_code("C-9") is None
    assert ref.stock_level("GAUZE", "F2") is None


def test_a_provider_card_wins_over_the_general_card(ref: RefData) -> None:
    assert ref.preference_card("27447", "DR-P") == (("KIT", 1), ("GAUZE", 2))
    assert ref.preference_card("27447", "DR-OTHER") == (("KIT", 1), ("GAUZE", 4))
    assert ref.preference_card("27447", None) == (("KIT", 1), ("GAUZE", 4))
    assert ref.preference_card("27447", "") == (("KIT", 1), ("GAUZE", 4))
    assert ref.preference_card("99999", "DR-P") == ()


def test_a_provider_card_alone_serves_only_that_provider() -> None:
    files = with_file(
        "preference_cards.csv", "procedure_code,item_id,quantity,provider_id", "29881,KIT,1,DR-P"
    )
    ref = RefData(parse_refdata(files, loaded_at=WHEN))
    assert ref.preference_card("29881", "DR-P") == (("KIT", 1),)
    assert ref.preference_card("29881", None) == ()


def test_an_exact_payer_rule_wins_over_the_wildcard(ref: RefData) -> None:
    exact = ref.payer_rule("HMO", "27447")
    assert exact is not None
    assert exact.authorization_required
    fallback = ref.payer_rule("HMO", "45378")
    assert fallback is not None
    assert fallback.procedure_code == "*"
    assert not fallback.authorization_required
    basic = ref.payer_rule("BASIC", "66984")
    assert basic is not None
    assert not basic.covered
    assert ref.payer_rule("BASIC", "27447") is None
    assert ref.payer_rule("NOBODY", "27447") is None


def test_empty_reference_data_finds_nothing() -> None:
    empty = RefData.empty()
    assert empty.version == 0
    assert empty.item("GAUZE") is None
    assert empty.preference_card("27447", "DR-P") == ()
    assert empty.payer_rule("HMO", "27447") is None
    assert empty.stock_levels() == ()


# -- the catalog of versions ----------------------------------------------------------------------
def named(name: str) -> RefDataSet:
    files = with_file("suppliers.csv", "supplier_id,name", f"S1,{name}", "S2,Ortho")
    return parse_refdata(files, loaded_at=WHEN)


def supplier_name(data: RefData) -> str | None:
    supplier = data.supplier("S1")
    return supplier.name if supplier is not None else None


def test_the_catalog_answers_with_the_version_in_force_at_a_time() -> None:
    catalog = RefDataCatalog()
    assert catalog.at(10**18).version == 0
    assert catalog.add(3, 3_000, named("three"))
    assert catalog.add(1, 1_000, named("one"))
    assert catalog.add(2, 2_000, named("two"))
    assert not catalog.add(2, 2_500, named("again"))  # a version is added once
    assert catalog.latest_version == 3
    assert catalog.versions() == [(1, 1_000), (2, 2_000), (3, 3_000)]
    assert catalog.at(999).version == 0
    assert supplier_name(catalog.at(999)) is None
    assert [catalog.at(t).version for t in (1_000, 1_999, 2_000, 2_999, 3_000, 10**18)] == [
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    assert supplier_name(catalog.at(2_500)) == "two"
    assert catalog.latest().version == 3


def test_two_versions_at_the_same_instant_resolve_to_the_later_one() -> None:
    catalog = RefDataCatalog()
    catalog.add(5, 1_000, named("five"))
    catalog.add(4, 1_000, named("four"))
    assert catalog.at(1_000).version == 5
