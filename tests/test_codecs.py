"""Wire contracts: the envelope's JSON/msgpack codecs, its validation, and subject tokens."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from caresync.codecs import (
    ContractError,
    DecodeError,
    EntityAddress,
    Envelope,
    SubjectError,
    Subjects,
    WireFormat,
    decode_envelope,
    decode_token,
    encode_envelope,
    encode_token,
    make_envelope,
    sniff_format,
)
from caresync.router.memory_transport import subject_matches

WHEN = datetime(2027, 1, 2, 3, 4, 5, 678000, tzinfo=timezone(timedelta(hours=2)))
FORMATS = [WireFormat.JSON, WireFormat.MSGPACK]


def fields(**overrides: Any) -> dict[str, Any]:
    """A valid envelope as a plain mapping (JSON-friendly), with overrides."""
    base: dict[str, Any] = {
        "id": "cmd-1",
        "kind": "appointment.book",
        "entity": "A1",
        "occurred_at": "2027-01-02T03:04:05Z",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def as_json(**overrides: Any) -> bytes:
    return msgspec.json.encode(fields(**overrides))


# -- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_envelope_round_trips_every_field_with_data(fmt: WireFormat) -> None:
    payload = {"procedure": "knee", "items": ["gauze", "suture"], "n": 3, "ok": True}
    env = make_envelope(
        id="cmd-1",
        kind="appointment.book",
        entity="HOSP:A 1.2",
        payload=payload,
        occurred_at=WHEN,
        source="emr",
        correlation_id="flow-9",
        causation_id="cmd-0",
        schema_version=3,
        fmt=fmt,
    )

    decoded, sniffed = decode_envelope(encode_envelope(env, fmt))

    assert sniffed is fmt
    assert decoded == env
    assert decoded.occurred_at == WHEN
    assert decoded.occurred_at.utcoffset() is not None
    decode = msgspec.json.decode if fmt is WireFormat.JSON else msgspec.msgpack.decode
    assert decode(decoded.payload_bytes) == payload
    assert (decoded.entity_kind, decoded.command, decoded.correlation) == (
        "appointment",
        "book",
        "flow-9",
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_envelope_round_trips_without_data_and_with_defaults(fmt: WireFormat) -> None:
    env = make_envelope(
        id="c2", kind="appointment.complete", entity="A1", occurred_at=WHEN, fmt=fmt
    )
    raw = encode_envelope(env, fmt)

    decoded, _ = decode_envelope(raw)

    assert decoded == env
    assert decoded.data is msgspec.UNSET
    assert decoded.payload_bytes == b""
    assert (decoded.source, decoded.correlation_id, decoded.causation_id) == ("", "", "")
    assert decoded.schema_version == 1
    assert decoded.correlation == "c2"  # falls back to the id
    assert b"data" not in raw  # defaults are omitted on the wire


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_fields_are_accepted(fmt: WireFormat) -> None:
    extra = {"priority": 5, "future": {"nested": [1, 2]}, "tags": ["a"], "zz": None}
    if fmt is WireFormat.JSON:
        raw = msgspec.json.encode({**extra, **fields(data={"x": 1})})
    else:
        raw = msgspec.msgpack.encode({**fields(occurred_at=WHEN, data={"x": 1}), **extra})

    env, sniffed = decode_envelope(raw)

    assert sniffed is fmt
    assert (env.id, env.kind, env.entity) == ("cmd-1", "appointment.book", "A1")
    decode = msgspec.json.decode if fmt is WireFormat.JSON else msgspec.msgpack.decode
    assert decode(env.payload_bytes) == {"x": 1}


def test_wire_schema_does_not_forbid_unknown_fields() -> None:
    assert not Envelope.__struct_config__.forbid_unknown_fields


# -- sniffing -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (b"{}", WireFormat.JSON),
        (b' \r\n\t {"id": 1}', WireFormat.JSON),
        (bytes([0x80]), WireFormat.MSGPACK),  # empty fixmap
        (bytes([0x8F]), WireFormat.MSGPACK),  # fixmap of 15
        (bytes([0xDE, 0x00, 0x10]), WireFormat.MSGPACK),  # map16
        (bytes([0xDF, 0, 0, 0, 0x20]), WireFormat.MSGPACK),  # map32
    ],
)
def test_sniff_format_tells_json_from_msgpack(data: bytes, fmt: WireFormat) -> None:
    assert sniff_format(data) is fmt


def test_a_msgpack_map16_envelope_decodes() -> None:
    many = {f"x{i}": i for i in range(12)}  # 4 envelope fields + 12 unknown ones: map16
    raw = msgspec.msgpack.encode({**fields(occurred_at=WHEN), **many})
    assert raw[0] == 0xDE

    env, fmt = decode_envelope(raw)

    assert fmt is WireFormat.MSGPACK
    assert env.id == "cmd-1"


@pytest.mark.parametrize(
    ("data", "byte"),
    [(b"\x01garbage", "0x01"), (b"[1, 2]", "0x5b"), (b"\x90", "0x90"), (b"null", "0x6e")],
)
def test_sniff_format_rejects_garbage_naming_the_byte_and_offset(data: bytes, byte: str) -> None:
    with pytest.raises(DecodeError, match="offset 0") as info:
        sniff_format(data)
    assert byte in info.value.reason
    assert info.value.code == "undecodable"


@pytest.mark.parametrize(
    ("data", "present", "absent"),
    [
        (b"  \x01", "offset 2", "offset 0"),
        (b" \x81\xa1a\x01", "offset 1", "offset 0"),  # msgpack has no leading whitespace
        (b" \n ", "whitespace", "0x00"),
    ],
)
def test_sniff_format_names_the_real_offset_after_whitespace(
    data: bytes, present: str, absent: str
) -> None:
    with pytest.raises(DecodeError) as info:
        sniff_format(data)
    assert present in info.value.reason
    assert absent not in info.value.reason


def test_empty_payload_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="empty payload"):
        decode_envelope(b"")


# -- decode errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b'{"id": ', "malformed json"),
        (bytes([0x81, 0xA2]) + b"id", "malformed msgpack"),
        (as_json(id=...), "missing required field `id`"),
        (as_json(occurred_at="2027-01-02T03:04:05"), r"timezone.*\$\.occurred_at"),
        (as_json(schema_version="1"), r"\$\.schema_version"),
        (as_json(entity=7), r"\$\.entity"),
    ],
)
def test_undecodable_envelopes_raise_decode_error_naming_the_problem(
    raw: bytes, match: str
) -> None:
    with pytest.raises(DecodeError, match=match) as info:
        decode_envelope(raw)
    assert info.value.code == "undecodable"


@pytest.mark.parametrize(
    ("overrides", "code", "path"),
    [
        ({"id": ""}, "missing_id", "$.id"),
        ({"id": "   "}, "missing_id", "$.id"),
        ({"id": "x" * 257}, "bad_id", "$.id"),
        ({"entity": ""}, "missing_entity", "$.entity"),
        ({"kind": "appointment"}, "bad_kind", "$.kind"),
        ({"kind": ".book"}, "bad_kind", "$.kind"),
        ({"kind": "appointment."}, "bad_kind", "$.kind"),
        ({"schema_version": 0}, "bad_version", "$.schema_version"),
        ({"schema_version": -3}, "bad_version", "$.schema_version"),
    ],
)
def test_contract_violations_raise_contract_error_with_a_code(
    overrides: dict[str, Any], code: str, path: str
) -> None:
    with pytest.raises(ContractError) as info:
        decode_envelope(as_json(**overrides))
    assert info.value.code == code
    assert path in info.value.reason


def test_a_naive_datetime_is_rejected_in_msgpack_too() -> None:
    raw = msgspec.msgpack.encode(fields(occurred_at="2027-01-02T03:04:05"))
    with pytest.raises(DecodeError, match="timezone"):
        decode_envelope(raw)


# -- subject tokens -----------------------------------------------------------------------------
FORBIDDEN_IN_TOKEN = set(".*> \t\r\n\f\v")  # NATS token separators, wildcards, ASCII whitespace


@given(st.text(min_size=1, max_size=80))
@example("HOSP:A123")
@example("OR 2.1")
@example("a.b.c")
@example("*")
@example(">")
@example("%")
@example("%41")
@example("100%25")
@example("a/b\\c")
@example("ünïcödé 日本 🏥")
@example("tab\there\nnew\rline\f\v")
@example("\x00\x01\x1f\x7f")
def test_tokens_round_trip_and_never_contain_reserved_characters(value: str) -> None:
    token = encode_token(value)

    assert decode_token(token) == value
    assert not FORBIDDEN_IN_TOKEN & set(token)
    assert all(ord(ch) >= 0x20 and ord(ch) != 0x7F for ch in token)
    s = Subjects()
    assert s.parse_address(s.command("appointment", value)) == EntityAddress(
        "appointment", value, internal=False
    )
    assert s.parse_address(s.internal("supply", value)) == EntityAddress(
        "supply", value, internal=True
    )


def test_plain_ids_are_left_as_they_are() -> None:
    assert encode_token("HOSP:A123-x_y") == "HOSP:A123-x_y"
    assert encode_token("a.b") == "a%2Eb"
    assert encode_token("50%") == "50%25"


def test_an_empty_id_cannot_be_a_token() -> None:
    with pytest.raises(SubjectError):
        encode_token("")


@pytest.mark.parametrize("token", ["%", "A%", "%G1", "a%zz", "%-1", "%C3", "%%41"])
def test_decode_token_rejects_malformed_escapes(token: str) -> None:
    with pytest.raises(SubjectError) as info:
        decode_token(token)
    assert info.value.code == "bad_id"


@pytest.mark.parametrize("token", ["ab%4", "%+4", "% 4"])
def test_decode_token_rejects_truncated_or_signed_escapes(token: str) -> None:
    with pytest.raises(SubjectError):
        decode_token(token)


# -- subjects -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("subjects", "subject", "address"),
    [
        (Subjects(), "cs.in.appointment.A1", EntityAddress("appointment", "A1", False)),
        (Subjects(), "cs.int.supply.F1:gauze", EntityAddress("supply", "F1:gauze", True)),
        (Subjects(), "cs.in.appointment.OR%202%2E1", EntityAddress("appointment", "OR 2.1", False)),
        (Subjects(), "cs.part.3.int.erp.F1", EntityAddress("erp", "F1", True)),
        (Subjects(prefix="org.cs"), "org.cs.in.erp.F1", EntityAddress("erp", "F1", False)),
    ],
)
def test_parse_address_of_input_and_internal_subjects(
    subjects: Subjects, subject: str, address: EntityAddress
) -> None:
    assert subjects.parse_address(subject) == address


@pytest.mark.parametrize(
    "subject",
    [
        "xx.in.appointment.A1",
        "csx.in.appointment.A1",
        "cs",
        "cs.in",
        "cs.in.appointment",
        "cs.in.appointment.A.B",
        "cs.in..A1",
        "cs.in.appointment.",
        "cs.out.billing.A1",
        "cs.dlq.rejected.A1",
        "cs.ctl.health.x",
    ],
)
def test_parse_address_rejects_other_subjects(subject: str) -> None:
    with pytest.raises(SubjectError) as info:
        Subjects().parse_address(subject)
    assert subject in info.value.reason
    assert info.value.code == "bad_subject"


def test_parse_address_rejects_a_bad_escape_in_the_entity() -> None:
    with pytest.raises(SubjectError, match="bad escape"):
        Subjects().parse_address("cs.in.appointment.A%zz")


def test_one_partition_needs_no_mappings() -> None:
    s = Subjects(partitions=1)
    assert s.partition_mappings() == {}
    assert s.input_stream(0) == "CARESYNC_IN"
    assert s.input_stream_subjects(0) == ["cs.in.>", "cs.int.>"]


_FUNC = re.compile(r"^\{\{(\w+)\(([\d,]*)\)\}\}$")


def _map(template: str, source: str, partition: int) -> str:
    """Apply a server subject mapping template the way nats-server would (partition given)."""
    wildcards = source.split(".")[2:]  # <prefix>.<role>.*.*
    out = []
    for token in template.split("."):
        m = _FUNC.match(token)
        if m is None:
            out.append(token)
        elif m.group(1) == "wildcard":
            out.append(wildcards[int(m.group(2)) - 1])
        else:
            assert m.group(1) == "partition"
            n, *which = (int(x) for x in m.group(2).split(","))
            assert n == 4
            assert sorted(which) == [1, 2]  # kind and entity together pick the partition
            out.append(str(partition))
    return ".".join(out)


def test_four_partitions_map_input_and_internal_subjects_into_their_partition_streams() -> None:
    s = Subjects(partitions=4)
    mappings = s.partition_mappings()

    assert set(mappings) == {"cs.in.*.*", "cs.int.*.*"}
    assert [s.input_stream(p) for p in range(4)] == [f"CARESYNC_IN_P{p}" for p in range(4)]
    for source, internal in (
        (s.command("appointment", "A 1.2"), False),
        (s.internal("supply", "F1:gauze"), True),
    ):
        pattern = next(p for p in mappings if subject_matches(p, source))
        for partition in range(4):
            mapped = _map(mappings[pattern], source, partition)
            owners = [
                p
                for p in range(4)
                if any(subject_matches(f, mapped) for f in s.input_stream_subjects(p))
            ]
            assert owners == [partition]
            # the mapped subject still parses to the same entity
            assert s.parse_address(mapped) == s.parse_address(source)
            assert s.parse_address(mapped).internal is internal
