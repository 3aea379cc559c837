"""Hostile input: random bytes, mutated samples, huge repetitions.  The splitter and the MLLP
reader never raise, ``decode_hl7`` raises nothing but ``Hl7Error``, in bounded time and memory.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from caresync.codecs.hl7v2 import (
    Frame,
    Hl7Error,
    MllpReader,
    build_ack,
    decode_hl7,
    event_kind,
    split_messages,
)
from caresync.codecs.source import SourceCommand, SourceError

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples" / "hl7v2"
BOOK = (
    b"MSH|^~\\&|SCHED|MAIN|CS|MAIN|20261124081500-0500||SIU^S12|C1|P|2.5.1\r"
    b"SCH||A1001^HOSP||||RSN^Knee\rTQ1|||||||20261202073000-0500|20261202093000-0500\r"
    b"PID|1||MRN-1||DOE^JANE\rPV1|1|O|OR^3^^MAIN||||||||||||||||V-1\r"
    b"RGS|1\rAIS|1|A|27447^Knee^CPT\rAIL|1|A|OR^3^^MAIN\rAIP|1|A|DR-P\r"
)
DFT = (
    b"MSH|^~\\&|BILL|MAIN|CS|MAIN|20261202120000||DFT^P03|D1|P|2.5\r"
    b"PV1|1|O|||||||||||||||||V-1\rFT1|1|TX-1||20261202||CG|99213|||2|100&USD||||||||||||A1^H\r"
)
SEEDS = [BOOK, DFT] + (
    [p.read_bytes() for p in sorted(SAMPLES.iterdir())] if SAMPLES.is_dir() else []
)
HOSTILE = settings(max_examples=300, deadline=500, suppress_health_check=[HealthCheck.too_slow])


def attempt(data: bytes) -> tuple[SourceCommand, ...] | Hl7Error:
    """The commands of a message, or the Hl7Error refusing it; anything else propagates."""
    try:
        return decode_hl7(data)
    except Hl7Error as exc:
        return exc


def decode_or_refuse(data: bytes) -> None:
    """decode_hl7 either succeeds with well-formed commands or raises Hl7Error, nothing else."""
    result = attempt(data)
    if isinstance(result, Hl7Error):
        assert isinstance(result, SourceError)
        assert result.reason
        assert "\n" not in result.reason
        return
    for cmd in result:
        assert cmd.entity.strip()
        assert cmd.id.startswith("hl7:")
        assert cmd.occurred_at is not None
        assert cmd.occurred_at.tzinfo is not None


def check_frames(data: bytes, frames: list[Frame]) -> None:
    end = 0
    for frame in frames:
        assert data[frame.offset : frame.offset + len(frame.data)] == frame.data
        assert frame.offset >= end  # in order, never overlapping
        end = frame.offset + len(frame.data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A sample with random bytes flipped, inserted, deleted or delimiters scattered."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "delimiter", "duplicate"]))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "delimiter":
            data[pos:pos] = draw(st.sampled_from([b"|", b"^", b"~", b"&", b"\\", b"\r", b"\n"]))
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


framing_bytes = st.lists(
    st.one_of(
        st.sampled_from([b"\x0b", b"\x1c", b"\x1c\r", b"\r", b"\n", b"\xef\xbb\xbf"]),
        st.sampled_from([BOOK, DFT, b"MSH|^~\\&|", b"FHS|", b"BHS|", b"BTS|1", b"junk"]),
        st.binary(max_size=20),
    ),
    max_size=20,
).map(b"".join)


@HOSTILE
@given(st.binary(max_size=2048))
@example(b"\x0b")
@example(b"\x1c\r")
@example(b"MSH")
@example(b"\xef\xbb\xbf")
def test_splitter_never_raises_on_random_bytes(data: bytes) -> None:
    check_frames(data, split_messages(data))


@HOSTILE
@given(framing_bytes)
def test_splitter_on_framing_soup(data: bytes) -> None:
    frames = split_messages(data)
    check_frames(data, frames)
    for frame in frames:
        if not frame.error:
            assert frame.data.startswith(b"MSH")
            decode_or_refuse(frame.data)


@HOSTILE
@given(framing_bytes, st.lists(st.integers(1, 64), min_size=1, max_size=30))
def test_reader_matches_splitter_for_any_chunking(data: bytes, sizes: list[int]) -> None:
    reader = MllpReader()
    frames: list[Frame] = []
    pos, i = 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        frames += reader.feed(data[pos : pos + size])
        pos, i = pos + size, i + 1
    frames += reader.close()
    if b"\x0b" in data or b"\x1c" in data:
        assert frames == split_messages(data)
    else:
        assert all(f.error for f in frames)  # plain text is junk to an MLLP reader


@HOSTILE
@given(st.binary(max_size=4096))
@example(b"MSH|^~\\&|" + b"|" * 20)
@example(b"MSH|^~\\&" + b"\r" * 3000)
def test_decode_raises_only_hl7_errors_on_random_bytes(data: bytes) -> None:
    decode_or_refuse(data)
    decode_or_refuse(b"MSH|^~\\&|" + data)


@HOSTILE
@given(mutated())
def test_decode_raises_only_hl7_errors_on_mutated_samples(data: bytes) -> None:
    decode_or_refuse(data)
    assert isinstance(event_kind(data), str)
    assert build_ack(data, "AE", "x|y^z", control_id="C").startswith(b"MSH|^~\\&|")


@HOSTILE
@given(st.text(max_size=200))
def test_ack_text_always_comes_back_intact(text: str) -> None:
    ack = build_ack(BOOK, "AE", text, control_id="C")
    segments = ack.split(b"\r")
    assert len(segments) == 4
    assert segments[-1] == b""
    assert segments[1].count(b"|") == 3  # MSA|AE|C1|text: the text added no field


HUGE: list[tuple[str, Callable[[], bytes], str]] = [
    ("repetitions", lambda: BOOK + b"NTE|1||" + b"A~" * 30_000, "30,001 repetitions"),
    ("empty repetitions", lambda: BOOK + b"NTE|1||" + b"~" * 900_000, "900,000 bytes"),
    ("components", lambda: BOOK + b"NTE|1||" + b"^&" * 400_000, "bytes"),
    ("one field", lambda: BOOK + b"NTE|1||" + b"A" * 900_000, "900,000 bytes"),
    ("segments", lambda: BOOK + b"NTE|1\r" * 150_000, "segments"),
    ("fields", lambda: BOOK + b"NTE" + b"|" * 900_000, "fields"),
    ("escapes", lambda: BOOK + b"NTE|1||" + b"\\X41\\" * 150_000, "bytes"),
    ("blank lines", lambda: BOOK + b"\n" * 900_000, ""),
    ("many groups", lambda: BOOK + b"RGS|1\rAIS|1||1\r" * 990, ""),
]


@pytest.mark.parametrize(("name", "build", "says"), HUGE, ids=[h[0] for h in HUGE])
def test_huge_inputs_are_refused_in_bounded_memory(
    name: str, build: Callable[[], bytes], says: str
) -> None:
    data = build()
    assert len(data) <= 1 << 20
    tracemalloc.start()
    try:
        result = attempt(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if says:
        assert isinstance(result, Hl7Error), f"{name} was accepted"
        assert says in result.reason
    else:
        assert not isinstance(result, Hl7Error), result.reason
    assert peak < 12 * (1 << 20), f"{name}: peak {peak:,} bytes"


def test_two_megabytes_are_split_and_refused_in_bounded_memory() -> None:
    big = BOOK + b"NTE|1||" + b"x" * (2 << 20)
    stream = b"\x0b" + big + b"\x1c\r" + b"\x0b" + BOOK + b"\x1c\r"
    tracemalloc.start()
    try:
        frames = split_messages(stream)
        reader = MllpReader(max_frame_bytes=1 << 20)
        chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
        streamed = [f for chunk in chunks for f in reader.feed(chunk)] + reader.close()
        with pytest.raises(Hl7Error, match="over the 1,048,576-byte limit"):
            decode_hl7(frames[0].data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [f.data == BOOK.rstrip(b"\r") for f in frames] == [False, True]
    assert "longer than 1,048,576 bytes" in streamed[0].error
    assert streamed[-1].data == BOOK.rstrip(b"\r")
    assert peak < 8 * len(stream), f"peak {peak:,} bytes for {len(stream):,}"
