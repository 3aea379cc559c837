"""HL7 acknowledgements (ACK) for a received message, even one that is garbage.

The ACK uses the standard delimiters whatever the original used; every value taken from the
original or from a reason is unescaped from the original and escaped again, so a reason
holding ``|`` or ``^`` cannot break the ACK.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from caresync.codecs.hl7v2 import errors
from caresync.codecs.hl7v2.charset import (
    STANDARD,
    Delimiters,
    read_charset,
    read_delimiters,
)
from caresync.codecs.hl7v2.errors import Hl7Error
from caresync.codecs.hl7v2.message import unwrap
from caresync.codecs.hl7v2.values import escape, unescape

DEFAULT_VERSION = "2.5.1"
MAX_TEXT = 1000

HL7_ERROR_CODES = {
    errors.MALFORMED: ("100", "Segment sequence error"),
    errors.BAD_ENCODING: ("102", "Data type error"),
    errors.BAD_CHARSET: ("102", "Data type error"),
    errors.UNSUPPORTED_VERSION: ("203", "Unsupported version id"),
    errors.UNSUPPORTED_MESSAGE: ("200", "Unsupported message type"),
    errors.UNSUPPORTED_EVENT: ("201", "Unsupported event code"),
    errors.MISSING_SEGMENT: ("100", "Segment sequence error"),
    errors.MISSING_ID: ("101", "Required field missing"),
    errors.MISSING_FIELD: ("101", "Required field missing"),
    errors.BAD_VALUE: ("102", "Data type error"),
    errors.TOO_LARGE: ("104", "Value too long"),
}
"""Our error codes to HL7 table 0357 (ERR-3); anything else is 207 (internal error)."""
_INTERNAL = ("207", "Application internal error")

_LOCATION = re.compile(r"([A-Z][A-Z0-9]{2})(?:-(\d{1,4})(?:\.(\d{1,4})(?:\.(\d{1,4}))?)?)?")
_ERL = re.compile(r"[A-Z][A-Z0-9]{2}(?:\^\d{0,4}){0,5}")
_VERSION = re.compile(r"2\.\d(?:\.\d{1,2})?")
_TRIGGER = re.compile(r"[A-Z0-9]{3}")


@dataclass(frozen=True, slots=True)
class _Original:
    """What an ACK echoes from the original MSH (all re-escaped in standard delimiters)."""

    sender: tuple[str, str] = ("", "")
    receiver: tuple[str, str] = ("", "")
    control_id: str = ""
    trigger: str = ""
    processing_id: str = "P"
    version: str = DEFAULT_VERSION
    charset_label: str = ""
    codec: str = "utf-8"


def build_ack(
    original: bytes,
    code: Literal["AA", "AE", "AR"],
    text: str = "",
    *,
    error_location: str = "",
    control_id: str = "",
    reason_code: str = "",
    now: datetime | None = None,
) -> bytes:
    """An ACK for ``original`` (CR separators, no MLLP framing); never raises on bad input.

    ``error_location`` is ``SCH-2.1`` or an ERL such as ``SCH^1^2``; ``reason_code`` an
    ``Hl7Error.code`` mapped to HL7 table 0357 for ERR-3.  ``control_id`` defaults to a new
    random id and ``now`` (MSH-7) to the current time.
    """
    orig = _read_original(original)
    ctrl = escape(control_id or uuid.uuid4().hex[:20], STANDARD)
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S%z")
    message_type = f"ACK^{orig.trigger}^ACK" if orig.trigger else "ACK"
    said = escape(text[:MAX_TEXT], STANDARD)
    msh = [
        "MSH",
        "^~\\&",
        *orig.receiver,
        *orig.sender,
        stamp,
        "",
        message_type,
        ctrl,
        orig.processing_id,
        orig.version,
    ]
    body = f"{'|'.join(msh)}\rMSA|{code}|{orig.control_id}|{said}\r"
    if code != "AA":
        number, name = HL7_ERROR_CODES.get(reason_code, _INTERNAL)
        erl = _erl(error_location)
        body += f"ERR||{erl}|{number}^{name}^HL70357|E||||{said}\r"
    return _encode(body, orig)


def _encode(body: str, orig: _Original) -> bytes:
    if orig.codec != "utf-8":
        head, rest = body.split("\r", 1)
        head += "|" * 6 + orig.charset_label
        return f"{head}\r{rest}".encode(orig.codec, "replace")
    if not body.isascii():
        head, rest = body.split("\r", 1)
        return f"{head}{'|' * 6}UNICODE UTF-8\r{rest}".encode()
    return body.encode()


def _erl(location: str) -> str:
    if _ERL.fullmatch(location):
        return location
    match = _LOCATION.fullmatch(location)
    if match is None:
        return ""
    segment, field, component, sub = match.groups()
    parts = [segment, "1"]
    if field:
        parts.append(field)
        if component:
            parts += ["1", component]
            if sub:
                parts.append(sub)
    return "^".join(parts)


def _read_original(original: bytes) -> _Original:
    raw, _ = unwrap(original)
    if not raw.startswith(b"MSH") or len(raw) < 4:
        return _Original()
    try:
        delims = read_delimiters(raw)
    except Hl7Error:
        if not 0x21 <= raw[3] <= 0x7E or chr(raw[3]).isalnum():
            return _Original()
        sep = chr(raw[3])  # unusable MSH-2: split fields only, never within them
        delims = Delimiters(sep, sep, sep, sep, sep)
    try:
        codec = read_charset(raw, delims)
    except Hl7Error:
        codec = "utf-8"
    line = re.split(rb"[\r\n]", raw, maxsplit=1)[0]
    fields = line.decode(codec, "replace").split(delims.field)
    fields.insert(1, delims.field)

    def clean(text: str, n: int) -> str:
        try:
            text = unescape(text, delims, codec, f"MSH-{n}")
        except Hl7Error:
            pass  # a malformed hex escape in the original: echo it as it came
        return escape(text[:200], STANDARD)

    def value(n: int, component: int = 1) -> str:
        """Component ``component`` of field n (0: the whole first repetition), re-escaped."""
        if n >= len(fields):
            return ""
        part = fields[n].split(delims.repetition)[0]
        if not component:  # an ST field: delimiters in it are data
            return clean(part, n)
        parts = part.split(delims.component)
        part = parts[component - 1] if component <= len(parts) else ""
        return "&".join(clean(sub, n) for sub in part.split(delims.subcomponent))

    def hd(n: int) -> str:
        return "^".join(value(n, c) for c in (1, 2, 3)).rstrip("^")

    trigger = value(9, 2).upper()
    version = value(12)
    processing = value(11)
    return _Original(
        sender=(hd(3), hd(4)),
        receiver=(hd(5), hd(6)),
        control_id=value(10, 0),
        trigger=trigger if _TRIGGER.fullmatch(trigger) else "",
        processing_id=processing if processing in ("P", "D", "T") else "P",
        version=version if _VERSION.fullmatch(version) else DEFAULT_VERSION,
        charset_label=value(18) if codec != "utf-8" else "",
        codec=codec,
    )
