"""Cutting a file or byte stream into single HL7 messages, one ``Frame`` each.

Two layouts are read:

* MLLP: ``0x0B <message> 0x1C 0x0D``, several frames back to back.  Bytes outside frames, a
  frame cut off by a new ``0x0B`` and a frame without its end become error frames: they are
  reported (and dead-lettered) on their own, never glued to the next message.
* Plain text: messages one after the other, each starting at a segment that begins with
  ``MSH``; CR, LF or CRLF end segments and blank lines are allowed.

In both, a UTF-8 byte order mark is dropped and batch envelopes (``FHS``/``BHS`` ...
``BTS``/``FTS``) are removed so that each message of a batch becomes its own frame.

Invariant: ``frame.data == input[frame.offset : frame.offset + len(frame.data)]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

START_BLOCK = 0x0B
"""MLLP start of a frame (VT)."""
END_BLOCK = 0x1C
"""MLLP end of a frame (FS), followed by a carriage return."""
CR = 0x0D
BOM = b"\xef\xbb\xbf"

_EOL = re.compile(rb"\r\n|\r|\n")
_BLANK = b" \t\r\n"
_SEGMENT_START = rb"((?:\xef\xbb\xbf)?)(MSH|FHS|BHS|BTS|FTS)(?![A-Za-z0-9])"
_FIRST = re.compile(_SEGMENT_START)
_BOUNDARY = re.compile(rb"[\r\n]" + _SEGMENT_START)
"""A line that starts a message (MSH) or is a batch envelope segment, after an optional BOM."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One message cut out of a stream, or bytes that could not be one (``error`` set)."""

    data: bytes
    """The message's bytes without MLLP framing or BOM; for an error frame the bad bytes."""
    offset: int
    """Where ``data`` starts in the input (or in the stream, for ``MllpReader``)."""
    error: str = ""
    """Why these bytes are not a message (a broken frame, junk between frames); '' if fine."""


def mllp_frame(message: bytes) -> bytes:
    """Wrap one message in MLLP framing; raises ValueError if it holds a framing byte."""
    if START_BLOCK in message or END_BLOCK in message:
        raise ValueError("an HL7 message cannot hold the MLLP framing bytes 0x0B or 0x1C")
    return b"\x0b" + message + b"\x1c\r"


def split_messages(data: bytes) -> list[Frame]:
    """Cut a whole file or byte stream into messages (MLLP framed or not); never raises."""
    if START_BLOCK in data or END_BLOCK in data:
        return _split_mllp(data)
    return split_text(data, 0)


def _split_mllp(data: bytes) -> list[Frame]:
    frames: list[Frame] = []
    pos, size = 0, len(data)
    while pos < size:
        start = data.find(b"\x0b", pos)
        frames.extend(outside_frames(data[pos : size if start < 0 else start], pos))
        if start < 0:
            break
        body = start + 1
        end = data.find(b"\x1c", body)
        restart = data.find(b"\x0b", body)
        if restart >= 0 and (end < 0 or restart < end):
            frames.append(Frame(data[body:restart], body, cut_off(start, restart)))
            pos = restart
            continue
        if end < 0:
            frames.append(Frame(data[body:], body, no_end(start)))
            break
        frames.extend(frame_content(data[body:end], body, start))
        pos = end + 1
        if pos < size and data[pos] == CR:
            pos += 1
    return frames


def cut_off(start: int, restart: int) -> str:
    """Reason for a frame broken by a new start byte before its end."""
    return (
        f"MLLP frame at byte {start} was cut off by a new frame start (0x0B) at byte {restart} "
        "before its end (0x1C 0x0D): the sender must resend the whole message"
    )


def no_end(start: int) -> str:
    """Reason for a frame whose end never came."""
    return (
        f"MLLP frame at byte {start} has no end (0x1C 0x0D): the message is incomplete, "
        "the sender must resend it"
    )


def too_long(start: int, limit: int) -> str:
    """Reason for a frame over the size limit."""
    return (
        f"MLLP frame at byte {start} is longer than {limit:,} bytes: "
        "split the message or raise the limit"
    )


def outside_frames(junk: bytes, offset: int) -> list[Frame]:
    """An error frame for bytes found between MLLP frames, unless they are only whitespace."""
    if not junk.strip(_BLANK):
        return []
    return [
        Frame(
            junk,
            offset,
            f"{len(junk):,} bytes at byte {offset} are outside any MLLP frame "
            "(a frame starts with 0x0B): they were not read as a message",
        )
    ]


def frame_content(content: bytes, offset: int, start: int) -> list[Frame]:
    """The messages inside one complete MLLP frame (a batch in a frame gives several)."""
    if not content.strip(_BLANK):
        return [Frame(content, offset, f"MLLP frame at byte {start} is empty: no message in it")]
    return split_text(content, offset)


def split_text(data: bytes, base: int) -> list[Frame]:
    """Cut unframed text into messages at each ``MSH`` segment, dropping batch segments.

    Text before the first MSH (other than blank lines and batch headers) becomes an error
    frame.  ``base`` is added to every offset.  Only segment starts are searched (by regex),
    so the cost does not grow with the number of lines in Python.
    """
    frames: list[Frame] = []
    pos = 0
    message = False
    for line_start, start, is_msh in _boundaries(data):
        _region(data, pos, line_start, message, base, frames)
        message = is_msh
        pos = start if message else _line_end(data, start)
    _region(data, pos, len(data), message, base, frames)
    return frames


def _boundaries(data: bytes) -> Iterator[tuple[int, int, bool]]:
    """(line start, segment start after any BOM, is MSH) of each message or batch line."""
    first = _FIRST.match(data)
    if first:
        yield 0, first.start(2), first.group(2) == b"MSH"
    for found in _BOUNDARY.finditer(data):
        yield found.start() + 1, found.start(2), found.group(2) == b"MSH"


def _region(data: bytes, start: int, stop: int, message: bool, base: int, out: list[Frame]) -> None:
    """The bytes from ``start`` to ``stop``: a message (when ``message``) or junk, trimmed of
    blank lines; nothing if they are all blank."""
    chunk = data[start:stop]
    body = chunk.rstrip(_BLANK)
    if not body:
        return
    end = start + _line_end(chunk, len(body))  # keeps trailing spaces of the last line
    if message:
        out.append(Frame(data[start:end], base + start))
        return
    text = start + len(chunk) - len(chunk.lstrip(_BLANK))
    first = max(data.rfind(b"\r", start, text), data.rfind(b"\n", start, text), start - 1) + 1
    out.append(
        Frame(
            data[first:end],
            base + first,
            f"{end - first:,} bytes at byte {base + first} are not part of an HL7 message: a "
            "message starts with an MSH segment",
        )
    )


def _line_end(data: bytes, pos: int) -> int:
    """Where the line holding ``pos`` ends (before its CR or LF)."""
    found = _EOL.search(data, pos)
    return found.start() if found else len(data)
