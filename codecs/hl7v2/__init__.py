"""HL7 v2 source codec: streams to messages, messages to canonical commands, and ACKs.

::

    split_messages(data) / MllpReader.feed(chunk)  ->  Frame (one message, or broken bytes)
    decode_hl7(frame.data)                          ->  tuple[SourceCommand, ...] or Hl7Error
    build_ack(frame.data, "AA" | "AE" | "AR", reason)  ->  the ACK to send back

Routed: SIU S12/S13/S14/S15/S17/S26 (appointments), DFT P03/P11 (charges), ADT A01/A04/A08
(visits), HL7 v2.3 to v2.8.  Everything else is refused with an ``Hl7Error`` whose ``code``
is one of ``CODES`` and whose reason names the segment and field or the byte offset.
"""

from __future__ import annotations

from caresync.codecs.hl7v2.ack import build_ack
from caresync.codecs.hl7v2.decode import decode_hl7
from caresync.codecs.hl7v2.errors import (
    BAD_CHARSET,
    BAD_ENCODING,
    BAD_VALUE,
    CODES,
    MALFORMED,
    MISSING_FIELD,
    MISSING_ID,
    MISSING_SEGMENT,
    TOO_LARGE,
    UNSUPPORTED_EVENT,
    UNSUPPORTED_MESSAGE,
    UNSUPPORTED_VERSION,
    Hl7Error,
)
from caresync.codecs.hl7v2.events import event_kind
from caresync.codecs.hl7v2.framing import Frame, mllp_frame, split_messages
from caresync.codecs.hl7v2.mllp import MllpReader

__all__ = [
    "BAD_CHARSET",
    "BAD_ENCODING",
    "BAD_VALUE",
    "CODES",
    "MALFORMED",
    "MISSING_FIELD",
    "MISSING_ID",
    "MISSING_SEGMENT",
    "TOO_LARGE",
    "UNSUPPORTED_EVENT",
    "UNSUPPORTED_MESSAGE",
    "UNSUPPORTED_VERSION",
    "Frame",
    "Hl7Error",
    "MllpReader",
    "build_ack",
    "decode_hl7",
    "event_kind",
    "mllp_frame",
    "split_messages",
]
