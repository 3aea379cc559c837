"""Cutting streams into HL7 messages: MLLP frames, broken frames, batches, blank lines, BOMs."""

from __future__ import annotations

import pytest

from caresync.codecs.hl7v2 import Frame, MllpReader, mllp_frame, split_messages

A = b"MSH|^~\\&|A|F|R|F|20260101||SIU^S12|1|P|2.5.1\rSCH||A1^H"
B = b"MSH|^~\\&|A|F|R|F|20260101||SIU^S15|2|P|2.5.1\rSCH||A1^H"
C = b"MSH|^~\\&|A|F|R|F|20260101||SIU^S26|3|P|2.5.1\rSCH||A1^H"


def by_bytes(data: bytes, reader: MllpReader | None = None) -> list[Frame]:
    """The frames an MllpReader finds when fed one byte at a time, then closed."""
    reader = reader or MllpReader()
    frames = [f for i in range(len(data)) for f in reader.feed(data[i : i + 1])]
    return frames + reader.close()


def assert_slices(data: bytes, frames: list[Frame]) -> None:
    for frame in frames:
        assert data[frame.offset : frame.offset + len(frame.data)] == frame.data


def test_empty_input_gives_no_frames() -> None:
    assert split_messages(b"") == []
    assert split_messages(b"\r\n \n") == []
    assert MllpReader().feed(b"") == []
    assert MllpReader().close() == []


def test_single_and_back_to_back_frames() -> None:
    one = mllp_frame(A)
    assert split_messages(one) == [Frame(A, 1)]
    stream = mllp_frame(A) + mllp_frame(B) + b"\r\n" + mllp_frame(C)
    frames = split_messages(stream)
    assert [f.data for f in frames] == [A, B, C]
    assert not any(f.error for f in frames)
    assert_slices(stream, frames)


def test_frame_without_end_is_an_error_frame_not_merged() -> None:
    stream = mllp_frame(A) + b"\x0b" + B
    frames = split_messages(stream)
    assert frames[0] == Frame(A, 1)
    assert frames[1].data == B
    assert frames[1].offset == len(mllp_frame(A)) + 1
    assert frames[1].error.startswith(f"MLLP frame at byte {len(mllp_frame(A))} has no end")


def test_new_start_inside_a_frame_breaks_it() -> None:
    stream = b"\x0b" + A[:20] + mllp_frame(B)
    frames = split_messages(stream)
    assert frames[0].data == A[:20]
    assert "cut off by a new frame start (0x0B) at byte 21" in frames[0].error
    assert frames[1] == Frame(B, 22)


def test_junk_between_frames_is_reported_apart() -> None:
    stream = b"junk" + mllp_frame(A) + b" noise\r\n" + mllp_frame(B)
    frames = split_messages(stream)
    assert [(f.data, bool(f.error)) for f in frames] == [
        (b"junk", True),
        (A, False),
        (b" noise\r\n", True),
        (B, False),
    ]
    assert "outside any MLLP frame" in frames[0].error
    assert_slices(stream, frames)


def test_frame_end_without_cr_and_empty_frames() -> None:
    assert split_messages(b"\x0b" + A + b"\x1c" + mllp_frame(B)) == [
        Frame(A, 1),
        Frame(B, len(A) + 3),
    ]
    frames = split_messages(b"\x0b\x1c\r" + mllp_frame(A))
    assert "is empty" in frames[0].error
    assert frames[1].data == A


CASES = [
    mllp_frame(A),
    mllp_frame(A) + mllp_frame(B),
    b"junk" + mllp_frame(A) + b"\r\n" + mllp_frame(B) + b"tail",
    b"\x0b" + A[:30] + mllp_frame(B) + b"\x0b" + C,
    b"\x0b" + A + b"\x1c" + b"\x0b" + B + b"\x1c\r",
    b"\x0b\x1c\r\x0b\x1c",
    b"\x1c\rjunk\x1c",
    mllp_frame(b"FHS|^~\\&\rBHS|^~\\&\r" + A + b"\r" + B + b"\rBTS|2\rFTS|1\r"),
]


@pytest.mark.parametrize("stream", CASES)
def test_reader_byte_by_byte_matches_split_messages(stream: bytes) -> None:
    assert by_bytes(stream) == split_messages(stream)


@pytest.mark.parametrize("stream", CASES)
def test_reader_in_one_chunk_matches_split_messages(stream: bytes) -> None:
    reader = MllpReader()
    assert reader.feed(stream) + reader.close() == split_messages(stream)


def test_reader_reports_oversize_frames_and_recovers() -> None:
    big = b"MSH|^~\\&|" + b"X" * 500
    stream = mllp_frame(big) + mllp_frame(A)
    frames = by_bytes(stream, MllpReader(max_frame_bytes=100))
    assert frames[0].data == big[:100]
    assert "longer than 100 bytes" in frames[0].error
    assert frames[1] == Frame(A, len(big) + 4)


def test_reader_bounds_junk_too() -> None:
    reader = MllpReader(max_frame_bytes=100)
    junk = b"x" * 250
    frames = [f for i in range(0, 250, 7) for f in reader.feed(junk[i : i + 7])]
    frames += reader.feed(mllp_frame(A))
    assert frames[0].data == junk[:100]
    assert frames[0].offset == 0
    assert frames[0].error
    assert frames[1:] == [Frame(A, 251)]


def test_reader_keeps_stream_offsets_across_chunks() -> None:
    reader = MllpReader()
    assert reader.feed(mllp_frame(A)[:10]) == []
    assert reader.feed(mllp_frame(A)[10:] + mllp_frame(B)[:3]) == [Frame(A, 1)]
    assert reader.feed(mllp_frame(B)[3:]) == [Frame(B, len(A) + 4)]
    assert reader.feed(b"\x0bMSH|partial") == []
    (broken,) = reader.close()
    assert broken.data == b"MSH|partial"
    assert "has no end" in broken.error


def test_batch_envelopes_are_removed() -> None:
    batch = b"FHS|^~\\&|A\rBHS|^~\\&|A\r" + A + b"\r" + B + b"\rBTS|2\rFTS|1\r"
    assert [f.data for f in split_messages(batch)] == [A, B]
    framed = split_messages(mllp_frame(batch))
    assert [f.data for f in framed] == [A, B]
    assert_slices(mllp_frame(batch), framed)


def test_plain_text_messages_split_at_msh_with_blank_lines() -> None:
    text = b"\n" + A.replace(b"\r", b"\n") + b"\n\n" + B.replace(b"\r", b"\r\n") + b"\r\n"
    frames = split_messages(text)
    assert [f.data for f in frames] == [
        A.replace(b"\r", b"\n"),
        B.replace(b"\r", b"\r\n"),
    ]
    assert_slices(text, frames)


def test_blank_lines_inside_a_message_do_not_split_it() -> None:
    text = b"MSH|^~\\&|A\n\nSCH||1\n\nPID|1\n"
    assert split_messages(text) == [Frame(b"MSH|^~\\&|A\n\nSCH||1\n\nPID|1", 0)]


def test_bom_is_dropped() -> None:
    bom = b"\xef\xbb\xbf"
    assert split_messages(bom + A) == [Frame(A, 3)]
    assert split_messages(mllp_frame(bom + A)) == [Frame(A, 4)]
    assert split_messages(bom + A + b"\r" + bom + B)[1].data == B


def test_text_before_the_first_msh_is_an_error_frame() -> None:
    frames = split_messages(b"hello\rworld\r" + A)
    assert frames[0].data == b"hello\rworld"
    assert "not part of an HL7 message" in frames[0].error
    assert frames[1].data == A
    assert split_messages(b"\x00\x01garbage")[0].error


def test_segment_named_like_msh_prefix_is_not_a_message_start() -> None:
    text = A + b"\rMSHX|not a header\r"
    assert len(split_messages(text)) == 1


def test_mllp_frame_refuses_framing_bytes() -> None:
    with pytest.raises(ValueError, match="0x0B"):
        mllp_frame(b"MSH|\x0b")
    with pytest.raises(ValueError, match="max_frame_bytes"):
        MllpReader(max_frame_bytes=0)


def test_last_line_keeps_its_trailing_spaces_and_junk_starts_at_its_line() -> None:
    assert split_messages(A + b"\rNTE|1||note  \r\n\r\n")[0].data == A + b"\rNTE|1||note  "
    frames = split_messages(b"\r\n\r\n  junk line\r\n" + A)
    assert frames[0].offset == 4
    assert frames[0].data == b"  junk line"
    assert frames[1] == Frame(A, 17)
