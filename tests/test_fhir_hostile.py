"""The FHIR codec against hostile input: whatever the bytes, only ``SourceError`` escapes, in
bounded time, and whatever it accepts is a well-formed command."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caresync.codecs.fhir import decode_fhir, resource_kind
from caresync.codecs.source import SourceCommand, SourceError

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples" / "fhir"
KINDS = {
    "appointment.sync",
    "appointment.cancel",
    "appointment.no_show",
    "appointment.delete",
    "visit.post_charges",
    "item.request",
    "item.goods_received",
}
CODES = {
    "malformed",
    "bad_value",
    "unsupported_resource",
    "unsupported_status",
    "missing_id",
    "too_large",
}
HOSTILE = settings(
    deadline=timedelta(milliseconds=500),
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def outcome(data: bytes) -> tuple[SourceCommand, ...] | SourceError:
    """decode_fhir's result or its SourceError, checked; any other exception fails the test."""
    kind = resource_kind(data)
    assert isinstance(kind, str)
    error: SourceError | None = None
    commands: tuple[SourceCommand, ...] = ()
    try:
        commands = decode_fhir(data)
    except SourceError as caught:
        error = caught
    if error is not None:
        assert error.code in CODES, error.code
        assert "unexpected decoder failure" not in error.reason, error.reason
        assert error.reason.isprintable()
        assert 0 < len(error.reason) <= 1000
        return error
    assert commands
    for command in commands:
        assert command.kind in KINDS
        assert command.entity
        assert len(command.entity) <= 256
        assert command.id.startswith("fhir:")
        assert command.source == "fhir"
        assert command.occurred_at is None or command.occurred_at.tzinfo is not None
        msgspec.json.encode(command)  # the payload is wire-encodable
    return commands


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.decimals(allow_nan=False, allow_infinity=False, places=3).map(float)
    | st.text(max_size=20)
    | st.sampled_from(["2013-12-10T09:00:00Z", "2016-12-31", "Location/1", "booked", "Encounter/e"])
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
FIELDS = [
    "id", "meta", "identifier", "status", "start", "end", "participant", "serviceType",
    "cancelationReason", "minutesDuration", "code", "context", "quantity", "priceOverride",
    "itemCodeableConcept", "itemReference", "deliverTo", "basedOn", "suppliedItem",
    "destination", "type", "entry", "resource", "actor", "reference", "value", "coding",
    "currency", "lastUpdated", "system",
]  # fmt: skip
resource_like = st.fixed_dictionaries(
    {
        "resourceType": st.sampled_from(
            ["Appointment", "ChargeItem", "SupplyRequest", "SupplyDelivery", "Bundle", "Slot"]
        )
    },
    optional=dict.fromkeys(FIELDS, json_values),
)


@HOSTILE
@given(st.binary(max_size=3000))
def test_random_bytes(data: bytes) -> None:
    outcome(data)


@HOSTILE
@given(json_values)
def test_random_json_values(value: Any) -> None:
    outcome(orjson.dumps(value))


@settings(HOSTILE, max_examples=150)  # generating these is what takes the time
@given(resource_like)
def test_random_resources(value: dict[str, Any]) -> None:
    outcome(orjson.dumps(value))


def samples() -> list[bytes]:
    if not SAMPLES.is_dir():
        return [b'{"resourceType": "Appointment", "status": "booked"}']
    return [p.read_bytes() for p in sorted(SAMPLES.glob("*.json"))]


def nodes(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON tree."""
    found = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            found += nodes(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += nodes(child, (*path, index))
    return found


def replaced(tree: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, *rest = path
    copy = dict(tree) if isinstance(tree, dict) else list(tree)
    copy[head] = replaced(tree[head], tuple(rest), new)
    return copy


@HOSTILE
@given(st.sampled_from(samples()), st.data())
def test_samples_with_a_node_replaced(sample: bytes, data: st.DataObject) -> None:
    tree = orjson.loads(sample)
    path = data.draw(st.sampled_from(nodes(tree)))
    mutated = orjson.dumps(replaced(tree, path, data.draw(json_values)))
    first = outcome(mutated)
    again = outcome(mutated)
    assert type(first) is type(again)
    if isinstance(first, tuple):
        assert first == again  # deterministic, ids included


@HOSTILE
@given(
    st.sampled_from(samples()),
    st.lists(st.tuples(st.integers(0, 5000), st.binary(max_size=4)), min_size=1, max_size=4),
    st.integers(0, 5000),
)
def test_samples_with_bytes_spliced(
    sample: bytes, splices: list[tuple[int, bytes]], cut: int
) -> None:
    data = bytearray(sample)
    for at, chunk in splices:
        at %= len(data) + 1
        data[at : at + len(chunk) // 2] = chunk
    outcome(bytes(data[: max(cut, len(data) // 2)]))


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 10_000 + b"]" * 10_000,
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b"[" * 10_000,
        b'{"resourceType": "Appointment", "status": "booked", "extension": '
        + b"[" * 10_000
        + b"]" * 10_000
        + b"}",
        b'{"resourceType": "Bundle", "type": "batch", "entry": [{"resource": '
        + b'{"x": ' * 5_000
        + b"0"
        + b"}" * 5_000
        + b"}]}",
    ],
)
def test_deep_nesting_is_malformed_not_a_recursion_error(data: bytes) -> None:
    error = outcome(data)
    assert isinstance(error, SourceError)
    assert error.code == "malformed"
    assert resource_kind(data) in ("", "appointment.sync")


def test_nesting_just_under_the_limit_still_decodes() -> None:
    deep = "[" * 250 + "]" * 250
    data = orjson.dumps(
        {
            "resourceType": "Appointment",
            "status": "cancelled",
            "id": "a1",
            "extension": orjson.Fragment(deep.encode()),
        }
    )
    [command] = decode_fhir(data)
    assert command.kind == "appointment.cancel"


def test_a_wide_document_under_the_size_limit() -> None:
    participants = [{"actor": {"reference": f"Practitioner/dr-{i}"}} for i in range(30_000)]
    doc = {
        "resourceType": "Appointment",
        "id": "wide",
        "status": "booked",
        "start": "2026-01-01T08:00:00Z",
        "participant": [*participants, {"actor": {"reference": "Location/or"}}],
    }
    data = orjson.dumps(doc)
    [command] = decode_fhir(data, max_bytes=len(data))
    assert len(command.payload.providers) == 30_000
    error = outcome(data)  # the default limit, 1 MiB
    assert isinstance(error, SourceError)
    assert error.code == "too_large"
