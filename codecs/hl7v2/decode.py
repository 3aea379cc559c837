"""The entry point: one HL7 v2 message in, its canonical commands out (or an Hl7Error)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, tzinfo

from caresync.codecs.hl7v2.adt import decode_adt
from caresync.codecs.hl7v2.context import Context, read_header, refusing
from caresync.codecs.hl7v2.dft import decode_dft
from caresync.codecs.hl7v2.errors import UNSUPPORTED_EVENT, UNSUPPORTED_MESSAGE, Hl7Error
from caresync.codecs.hl7v2.events import ADT_EVENTS, DFT_EVENTS, SIU_KINDS, kind_of
from caresync.codecs.hl7v2.message import parse_message
from caresync.codecs.hl7v2.siu import decode_siu
from caresync.codecs.source import SourceCommand

Mapper = Callable[[Context], tuple[SourceCommand, ...]]

_MAPPERS: dict[str, tuple[Mapper, tuple[str, ...]]] = {
    "SIU": (decode_siu, tuple(SIU_KINDS)),
    "DFT": (decode_dft, DFT_EVENTS),
    "ADT": (decode_adt, ADT_EVENTS),
}


def decode_hl7(
    message: bytes, *, default_tz: tzinfo = UTC, max_bytes: int = 1 << 20
) -> tuple[SourceCommand, ...]:
    """Decode one HL7 v2 message (no MLLP framing needed; BOM, CR, LF, CRLF accepted).

    A timestamp without a UTC offset is read in ``default_tz``.  Raises ``Hl7Error`` (a
    ``SourceError``) whose reason names the segment and field or the byte offset.
    """
    parsed = parse_message(message, max_bytes=max_bytes)
    header = read_header(parsed)
    routed = _MAPPERS.get(header.message_type)
    if routed is None:
        raise Hl7Error(
            f"MSH-9 message type {header.event} is not routed: caresync maps SIU, DFT and ADT",
            code=UNSUPPORTED_MESSAGE,
            location="MSH-9",
        )
    mapper, events = routed
    if header.trigger not in events:
        raise Hl7Error(
            f"{header.event} is not routed: caresync maps {header.message_type} "
            f"{', '.join(events)}",
            code=UNSUPPORTED_EVENT,
            location="MSH-9.2",
        )
    with refusing(kind_of(header.message_type, header.trigger)):
        return mapper(Context(parsed, header, default_tz))
