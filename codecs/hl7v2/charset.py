"""Reading the delimiters (MSH-1, MSH-2) and the character set (MSH-18) from raw bytes.

Both must be known before the message can be decoded to text, so they are read from the
bytes of the MSH segment itself.  The text is then decoded strictly in the declared character
set: a byte that does not decode is refused with its offset, never guessed as Latin-1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from caresync.codecs.hl7v2.errors import BAD_CHARSET, BAD_ENCODING, MALFORMED, Hl7Error

_EOL = re.compile(rb"\r\n|\r|\n")
_ISO_8859 = {f"8859/{n}": f"iso8859_{n}" for n in (*range(1, 12), 13, 14, 15)}
_CHARSETS = {"": "utf-8", "ASCII": "utf-8", "UNICODE UTF-8": "utf-8", "UTF-8": "utf-8"}
_CHARSETS.update(_ISO_8859)


@dataclass(frozen=True, slots=True)
class Delimiters:
    """The separators a message declares in MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""
    """The v2.7+ truncation character (fifth in MSH-2), '' when absent."""


STANDARD = Delimiters()
"""The usual ``|^~\\&`` delimiters."""


def read_delimiters(raw: bytes) -> Delimiters:
    """MSH-1 and MSH-2 of a message whose bytes start with ``MSH``; raises Hl7Error."""
    if len(raw) < 4:
        raise Hl7Error(
            "the message ends inside MSH: MSH-1 (field separator) is missing",
            code=MALFORMED,
            location="MSH-1",
        )
    sep = raw[3]
    if not _usable(sep):
        raise Hl7Error(
            f"MSH-1 (field separator) is byte 0x{sep:02x}: it must be one printable ASCII "
            "character that is not a letter or digit, such as '|'",
            code=BAD_ENCODING,
            location="MSH-1",
        )
    end = len(raw)
    for stop in (sep, 0x0D, 0x0A):
        found = raw.find(bytes((stop,)), 4)
        if 0 <= found < end:
            end = found
    chars = raw[4:end]
    shown = chars[:12].decode("ascii", "backslashreplace")
    if len(chars) not in (4, 5):
        raise Hl7Error(
            f"MSH-2 (encoding characters) is {shown!r}: it must be 4 characters (such as "
            "'^~\\&'), or 5 from v2.7 with the truncation character",
            code=BAD_ENCODING,
            location="MSH-2",
        )
    for i, char in enumerate(chars):
        if not _usable(char):
            raise Hl7Error(
                f"MSH-2 (encoding characters) {shown!r} holds byte 0x{char:02x}: each must be "
                "a printable ASCII character that is not a letter or digit",
                code=BAD_ENCODING,
                location="MSH-2",
            )
        if char == sep:
            raise Hl7Error(
                f"MSH-2 (encoding characters) {shown!r} repeats the field separator "
                f"{chr(sep)!r}: every delimiter must be different",
                code=BAD_ENCODING,
                location="MSH-2",
            )
        if char in chars[:i]:
            raise Hl7Error(
                f"MSH-2 (encoding characters) {shown!r} holds {chr(char)!r} twice: every "
                "delimiter must be different (a doubled escape character is a sender bug)",
                code=BAD_ENCODING,
                location="MSH-2",
            )
    text = chars.decode("ascii")
    return Delimiters(chr(sep), text[0], text[1], text[2], text[3], text[4:])


def read_charset(raw: bytes, delimiters: Delimiters) -> str:
    """The Python codec for MSH-18 (read from the raw MSH bytes); raises Hl7Error."""
    line_end = len(raw)
    for stop in (b"\r", b"\n"):
        found = raw.find(stop)
        if 0 <= found < line_end:
            line_end = found
    fields = raw[:line_end].split(delimiters.field.encode())
    # fields[0] is "MSH" and fields[1] MSH-2, so MSH-n is fields[n - 1].
    value = fields[17] if len(fields) > 17 else b""
    for sep in (delimiters.repetition, delimiters.component):
        value = value.split(sep.encode(), 1)[0]
    label = value.strip().decode("ascii", "backslashreplace")
    codec = _CHARSETS.get(label.upper())
    if codec is None:
        raise Hl7Error(
            f"MSH-18 (character set) {label[:40]!r} is not read by caresync: send ASCII, "
            "UNICODE UTF-8 or 8859/1 to 8859/15",
            code=BAD_CHARSET,
            location="MSH-18",
        )
    return codec


def decode_text(raw: bytes, codec: str, *, offset: int = 0) -> str:
    """Decode the whole message strictly; ``offset`` is added to byte offsets in reasons."""
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        line = len(_EOL.findall(raw, 0, exc.start)) + 1
        raise Hl7Error(
            f"byte {offset + exc.start} (0x{bad}, around line {line}) is not valid {codec}, "
            "the character set MSH-18 declares: fix MSH-18 or the text",
            code=BAD_CHARSET,
            location="MSH-18",
        ) from None


def _usable(byte: int) -> bool:
    """A delimiter must be printable ASCII and neither a letter nor a digit."""
    return 0x21 <= byte <= 0x7E and not chr(byte).isalnum()
