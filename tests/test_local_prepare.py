"""A command a partition sends itself is prepared from the envelope it was encoded from
(``CommandDecoder.prepare_local``), not decoded again from the record's bytes.  That must give
exactly what the stream path (``CommandDecoder.prepare`` of the record) gives, or fail where it
fails: a rebuild and ``replay entity`` read the record, the live partition does not.

Checked over every command type of the default registry (payloads built by hypothesis, valid or
not), hostile entity ids, unknown kinds and commands, and times in any offset (msgpack carries
the instant only: the stream path gives UTC).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from caresync.actors import default_registry
from caresync.actors.contract import ActorRef, Command, Effect
from caresync.codecs import CodecError, Subjects, encode_envelope
from caresync.router.decoding import CommandDecoder, Prepared
from caresync.router.local_fanout import H_APPLIED_AT
from caresync.router.outbox_rows import effect_envelope
from caresync.router.transport import Inbound

REGISTRY = default_registry()
SUBJECTS = Subjects()
DECODER = CommandDecoder(REGISTRY, SUBJECTS)
COMMANDS = sorted(
    (kind.name, name, payload_type)
    for kind in REGISTRY.kinds.values()
    for name, payload_type in kind.commands.items()
)

ids = st.text(min_size=1, max_size=40) | st.sampled_from(["a.b", "50%", "x y", "é/ü", "*", ">"])
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
times = st.datetimes(timezones=st.just(UTC) | offsets)
plain = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=10)
loose = st.dictionaries(st.text(max_size=8), plain | st.lists(plain, max_size=3), max_size=4)


@st.composite
def effects(draw: st.DrawFn) -> tuple[str, Effect]:
    kind, name, payload_type = draw(st.sampled_from(COMMANDS))
    if draw(st.integers(0, 9)) == 0:  # mostly commands the kind has: they reach the actors
        kind = draw(st.sampled_from(["nosuch", "a.b", kind]))
        name = draw(st.sampled_from(["nosuch", "", "x.y", name]))
    payload = draw(st.builds(payload_type) if draw(st.integers(0, 4)) else (loose | st.none()))
    key = draw(st.text(min_size=1, max_size=20) | st.just("k" * 300))
    return kind, Effect(target=ActorRef(kind, draw(ids)), name=name, key=key, payload=payload)


def _outcome(prepare: Any) -> Prepared | type[Exception]:
    try:
        result: Prepared = prepare()
    except CodecError as exc:
        return type(exc)
    return result


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    effect=effects(),
    occurred_at=times,
    cause_id=ids,
    correlation=st.just("") | ids,
    timestamp_ns=st.integers(0, 2**62),
)
def test_local_prepare_is_the_stream_path(
    effect: tuple[str, Effect],
    occurred_at: Any,
    cause_id: str,
    correlation: str,
    timestamp_ns: int,
) -> None:
    kind, e = effect
    cause = Command(
        id=cause_id,
        name="book",
        entity="A-1",
        occurred_at=occurred_at,
        payload=None,
        correlation_id=correlation,
    )
    try:
        subject, envelope, fmt = effect_envelope(SUBJECTS, "appointment", cause, e)
        data = encode_envelope(envelope, fmt)
    except (CodecError, OverflowError):
        assume(False)  # not encodable: neither path is reached
        raise
    message = Inbound(
        subject, data, {H_APPLIED_AT: f"7.1.{timestamp_ns}"}, "S", 7, "", timestamp_ns, 1
    )
    stream = _outcome(lambda: DECODER.prepare(message))
    local = _outcome(lambda: DECODER.prepare_local(message, kind, envelope))
    if not isinstance(stream, Prepared):
        assert not isinstance(local, Prepared), f"the stream path refuses it ({stream.__name__})"
        return
    assert isinstance(local, Prepared), f"the stream path takes it, the local path: {local}"
    event("prepared")
    assert local == stream
    # Equality of datetimes ignores the offset, of structs the types of their sequences.
    assert repr(local.command) == repr(stream.command)
    assert repr(local.envelope.occurred_at) == repr(stream.envelope.occurred_at)
    assert local.command.occurred_at.tzinfo is UTC


@pytest.mark.parametrize("minutes", [0, 120, -330])
def test_local_command_time_is_in_utc_as_the_stream_gives_it(minutes: int) -> None:
    """A cause stamped in a local offset: the record carries the instant; both paths give UTC."""
    kind, name, payload_type = next(c for c in COMMANDS if c[:2] == ("erp", "demand"))
    at = datetime(2026, 3, 1, 9, 30, tzinfo=timezone(timedelta(minutes=minutes)))
    cause = Command(id="c1", name="reschedule", entity="A-1", occurred_at=at, payload=None)
    effect = Effect(
        target=ActorRef(kind, "A-1"),
        name=name,
        key="A-1/c1:erp",
        payload=payload_type(facility_id="F1"),
    )
    subject, envelope, fmt = effect_envelope(SUBJECTS, "appointment", cause, effect)
    message = Inbound(subject, encode_envelope(envelope, fmt), None, "S", 1, "", 0, 1)
    local = DECODER.prepare_local(message, kind, envelope)
    assert local == DECODER.prepare(message)
    assert local.command.occurred_at == at
    assert local.command.occurred_at.tzinfo is UTC
    assert local.envelope.occurred_at.tzinfo is UTC
