"""One HL7 v2 message as typed segments, with accessors that know where a value came from.

Our own tokenizer rather than python-hl7's: python-hl7 parses a 3.5 KB SIU about 650 times a
second on the project machine (the ingest target is 5,000), checks MSH-2 with an ``assert``
and splits every component up front.  Here segments split into fields only when read,
components only when asked for, and the caps are enforced before any of it.

Pre-parse, in order: size cap, MLLP framing and BOM dropped, MSH-1/MSH-2 checked, text decoded
strictly per MSH-18, CR/LF/CRLF normalised to CR, segment ids checked, caps on segments,
field size and repetitions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from caresync.codecs.hl7v2.charset import Delimiters, decode_text, read_charset, read_delimiters
from caresync.codecs.hl7v2.errors import MALFORMED, TOO_LARGE, Hl7Error
from caresync.codecs.hl7v2.framing import BOM
from caresync.codecs.hl7v2.values import unescape

MAX_SEGMENTS = 2000
MAX_FIELD_BYTES = 64 * 1024
MAX_REPETITIONS = 1000
MAX_FIELDS = 1000

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
_BLANK_LINES = re.compile(r"(?<=\r)[ \t]*\r")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class Segment:
    """One segment; ``value(n, c, s)`` reads field n, component c, sub-component s."""

    __slots__ = ("_fields", "_message", "line", "name", "number", "text")

    def __init__(self, message: Message, name: str, text: str, line: int, number: int) -> None:
        self._message = message
        self._fields: list[str] | None = None
        self.name = name
        """The segment id (``SCH``)."""
        self.text = text
        """The segment's text as received (after decoding)."""
        self.line = line
        """Line number of the segment in the message (1 is MSH)."""
        self.number = number
        """1 for the first segment with this id, 2 for the second..."""

    @property
    def fields(self) -> list[str]:
        """Raw fields, indexed by field number (``fields[2]`` is SEG-2)."""
        if self._fields is None:
            parts = self.text.split(self._message.delimiters.field)
            if self.name == "MSH":
                parts.insert(1, self._message.delimiters.field)
            self._fields = parts
        return self._fields

    def field(self, n: int) -> str:
        """Raw text of field n ('' when absent), delimiters and escapes untouched."""
        fields = self.fields
        return fields[n] if n < len(fields) else ""

    def value(self, n: int, component: int = 1, sub: int = 1, rep: int = 1) -> str:
        """Unescaped text of one sub-component; '' when absent or HL7 null (``""``)."""
        raw = self.field(n)
        if not raw or (self.name == "MSH" and n <= 2):
            return raw
        d = self._message.delimiters
        if d.repetition in raw or rep > 1:
            reps = raw.split(d.repetition)
            raw = reps[rep - 1] if rep <= len(reps) else ""
        raw = _part(raw, d.component, component)
        raw = _part(raw, d.subcomponent, sub)
        if not raw or raw == '""':
            return ""
        if d.escape not in raw:
            return raw
        return unescape(raw, d, self._message.codec, self.where(n, component, sub))

    def repetitions(self, n: int) -> int:
        """How many repetitions field n holds (0 when empty)."""
        raw = self.field(n)
        return raw.count(self._message.delimiters.repetition) + 1 if raw else 0

    def where(self, n: int, component: int = 0, sub: int = 0) -> str:
        """The location ``SEG-n.c.s`` (components only when asked for)."""
        text = f"{self.name}-{n}"
        if component:
            text += f".{component}"
            if sub > 1:
                text += f".{sub}"
        return text

    def at(self) -> str:
        """Where the segment is, for reasons: '' for a one-off, ' (line 9)' for a repeat."""
        return f" (line {self.line})" if self._message.count(self.name) > 1 else ""


def _part(raw: str, sep: str, index: int) -> str:
    if sep not in raw:
        return raw if index == 1 else ""
    parts = raw.split(sep)
    return parts[index - 1] if index <= len(parts) else ""


class Message:
    """A tokenized message: delimiters, character set and segments in order."""

    def __init__(self, delimiters: Delimiters, codec: str) -> None:
        self.delimiters = delimiters
        self.codec = codec
        """Python codec of the declared character set (MSH-18)."""
        self.segments: list[Segment] = []
        self._counts: dict[str, int] = {}

    @property
    def msh(self) -> Segment:
        """The MSH segment (always the first)."""
        return self.segments[0]

    def count(self, name: str) -> int:
        """How many segments have this id."""
        return self._counts.get(name, 0)

    def first(self, name: str) -> Segment | None:
        """The first segment with this id, if any."""
        if name not in self._counts:
            return None
        return next(seg for seg in self.segments if seg.name == name)

    def all(self, name: str) -> Iterator[Segment]:
        """Every segment with this id, in order."""
        return (seg for seg in self.segments if seg.name == name)

    def canonical_text(self) -> str:
        """The message with CR separators, blank lines dropped and MSH-10 blanked.

        Two sends of the same content under different control ids give the same text.
        """
        msh = list(self.msh.fields)
        if len(msh) > 10:
            msh[10] = ""
        head = self.delimiters.field.join(msh[:1] + msh[2:])
        return "\r".join([head, *(seg.text for seg in self.segments[1:])])

    def add(self, name: str, text: str, line: int) -> None:
        """Append a segment (used while tokenizing)."""
        number = self._counts.get(name, 0) + 1
        self._counts[name] = number
        self.segments.append(Segment(self, name, text, line, number))


def parse_message(data: bytes, *, max_bytes: int) -> Message:
    """Tokenize one message (no framing needed, BOM and any line ending accepted)."""
    if len(data) > max_bytes:
        raise Hl7Error(
            f"the message is {len(data):,} bytes: over the {max_bytes:,}-byte limit",
            code=TOO_LARGE,
        )
    raw, skipped = unwrap(data)
    if not raw.startswith(b"MSH"):
        shown = raw[:16].decode("ascii", "backslashreplace")
        raise Hl7Error(
            f"the message does not start with an MSH segment (byte {skipped} starts with "
            f"{shown!r}): this is not an HL7 v2 message",
            code=MALFORMED,
        )
    delimiters = read_delimiters(raw)
    codec = read_charset(raw, delimiters)
    text = decode_text(raw, codec, offset=skipped)
    bad = _CONTROL.search(text)
    if bad:
        byte = skipped + len(text[: bad.start()].encode(codec, "replace"))
        raise Hl7Error(
            f"byte {byte} is the control character 0x{ord(bad.group()):02x}: HL7 text holds "
            "none (binary data must be base64 or \\X..\\ escaped)",
            code=MALFORMED,
        )
    message = Message(delimiters, codec)
    for number, line in _lines(text.replace("\r\n", "\r").replace("\n", "\r")):
        _check_segment(message, line, number)
    return message


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the non-blank lines; refuses too many segments up front."""
    if text.count("\r") >= MAX_SEGMENTS:
        segments = _BLANK_LINES.sub("", text).strip("\r").count("\r") + 1
        if segments > MAX_SEGMENTS:
            raise Hl7Error(
                f"the message has {segments:,} segments: over the {MAX_SEGMENTS:,} limit; "
                "split it into smaller messages",
                code=TOO_LARGE,
            )
    for number, line in enumerate(text.split("\r"), 1):
        if line.strip():
            yield number, line


def unwrap(data: bytes) -> tuple[bytes, int]:
    """Drop MLLP framing, a BOM and leading blank lines; return the rest and its offset."""
    start, end = 0, len(data)
    if data[:1] == b"\x0b":
        start = 1
        if data.endswith(b"\x1c\r"):
            end -= 2
        elif data.endswith(b"\x1c"):
            end -= 1
    if data.startswith(BOM, start):
        start += len(BOM)
    rest = data[start:end].lstrip(b"\r\n")
    return rest, end - len(rest)


def _check_segment(message: Message, line: str, number: int) -> None:
    name = line[:3]
    if not _SEGMENT_ID.fullmatch(name):
        if _SEGMENT_ID.fullmatch(name.upper()):
            why = "segment ids are upper-case"
        else:
            why = "a segment starts with a 3-character id of capital letters and digits"
        raise Hl7Error(f"segment {name!r} at line {number}: {why}", code=MALFORMED)
    d = message.delimiters
    if len(line) > 3 and line[3] != d.field:
        raise Hl7Error(
            f"segment {line[:8]!r} at line {number}: the id is not followed by the field "
            f"separator {d.field!r} declared in MSH-1",
            code=MALFORMED,
        )
    if message.segments and name == "MSH":
        raise Hl7Error(
            f"a second MSH segment at line {number}: one message per decode (split the "
            "stream with split_messages first)",
            code=MALFORMED,
        )
    if line.count(d.field) > MAX_FIELDS:
        raise Hl7Error(
            f"segment {name} at line {number} has {line.count(d.field):,} fields: over the "
            f"{MAX_FIELDS:,} limit for one segment",
            code=TOO_LARGE,
        )
    if len(message.segments) >= MAX_SEGMENTS:
        raise Hl7Error(
            f"the message has more than {MAX_SEGMENTS:,} segments (line {number}): "
            "split it into smaller messages",
            code=TOO_LARGE,
        )
    message.add(name, line, number)
    if len(line) > MAX_FIELD_BYTES // 4 or line.count(d.repetition) >= MAX_REPETITIONS:
        _check_fields(message.segments[-1], d.repetition)


def _check_fields(segment: Segment, rep: str) -> None:
    for n, field in enumerate(segment.fields):
        if n == 0 or (segment.name == "MSH" and n <= 2):
            continue
        size = len(field.encode("utf-8", "replace")) if len(field) > MAX_FIELD_BYTES // 4 else 0
        if size > MAX_FIELD_BYTES:
            raise Hl7Error(
                f"{segment.where(n)}{segment.at()} is {size:,} bytes: over the "
                f"{MAX_FIELD_BYTES:,}-byte limit for one field",
                code=TOO_LARGE,
                location=segment.where(n),
            )
        reps = field.count(rep) + 1
        if reps > MAX_REPETITIONS:
            raise Hl7Error(
                f"{segment.where(n)}{segment.at()} has {reps:,} repetitions: over the "
                f"{MAX_REPETITIONS:,} limit for one field",
                code=TOO_LARGE,
                location=segment.where(n),
            )
