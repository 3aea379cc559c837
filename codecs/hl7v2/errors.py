"""Why an HL7 v2 message is refused: the error class and its machine-readable codes.

::

    CodecError                       (caresync.codecs.errors)
    └── SourceError                  (caresync.codecs.source) a source message that cannot
        │                            become commands: dead-lettered with its raw bytes
        └── Hl7Error                 the same, plus ``location`` (``SCH-2.1``) for ACK ERR-2

``Hl7Error.code`` is one of the constants below; ``reason`` is one sentence naming the
segment and field (``SCH-2.1``), the line or the byte offset, and what to do about it.
"""

from __future__ import annotations

from caresync.codecs.source import SourceError

MALFORMED = "malformed"
"""The bytes are not an HL7 v2 message: no MSH, truncated MSH, bad segment ids, control bytes."""
BAD_ENCODING = "bad_encoding"
"""MSH-1 or MSH-2 (the delimiters) are missing, repeated, alphanumeric or otherwise unusable."""
BAD_CHARSET = "bad_charset"
"""MSH-18 names a character set caresync does not read, or the bytes do not decode in it."""
UNSUPPORTED_VERSION = "unsupported_version"
"""MSH-12 is not a version from 2.3 to 2.8."""
UNSUPPORTED_MESSAGE = "unsupported_message"
"""MSH-9 names a message type that is not routed (ORU, MFN, RDE, RSP, BAR...)."""
UNSUPPORTED_EVENT = "unsupported_event"
"""MSH-9 names a routed message type but an event that is not (SIU^S16, ADT^A03...)."""
MISSING_SEGMENT = "missing_segment"
"""A segment the mapping needs (SCH in an SIU, FT1 in a DFT, PV1 in an ADT) is absent."""
MISSING_ID = "missing_id"
"""The entity id (SCH-2.1, PV1-19.1, FT1-23/PV1-19 link) is empty: caresync never invents one."""
MISSING_FIELD = "missing_field"
"""Another required value is empty (a booking's start or facility, a charge's amount or code)."""
BAD_VALUE = "bad_value"
"""A value does not parse: an impossible date, a non-numeric quantity, an unknown code."""
TOO_LARGE = "too_large"
"""The message, one field, a field's repetitions or the segment count exceed the caps."""

CODES = (
    MALFORMED,
    BAD_ENCODING,
    BAD_CHARSET,
    UNSUPPORTED_VERSION,
    UNSUPPORTED_MESSAGE,
    UNSUPPORTED_EVENT,
    MISSING_SEGMENT,
    MISSING_ID,
    MISSING_FIELD,
    BAD_VALUE,
    TOO_LARGE,
)
"""Every ``Hl7Error.code`` this codec raises."""


class Hl7Error(SourceError):
    """Raised by ``decode_hl7`` for a message that cannot become commands.

    ``location`` names the field at fault in HL7 notation (``SCH-2.1``, ``MSH-12``), empty
    when the problem is not one field (a byte offset, the whole message).
    """

    code = MALFORMED

    def __init__(
        self,
        reason: str,
        *,
        code: str,
        location: str = "",
        kind: str = "",
        entity: str = "",
    ) -> None:
        super().__init__(one_line(reason), code=code, kind=kind, entity=entity)
        self.location = location


MAX_REASON = 1000
"""Reasons travel in a dead-letter header (at most 1 KiB) and in ACK ERR-8."""
_CONTROLS = {n: f"\\x{n:02x}" for n in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS |= {0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def one_line(reason: str) -> str:
    """The reason on one line, control characters (from message values) shown escaped."""
    text = reason.translate(_CONTROLS)
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."
