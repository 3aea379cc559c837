"""From one raw source message (HL7 v2 or FHIR R4 bytes) to canonical commands or rejections.

Pure: no I/O.  An HL7 payload may hold several messages (MLLP frames back to back, a batch, a
file of messages); each becomes its own :class:`RawItem` with its own bytes, so one bad message
never takes its neighbours down with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, tzinfo

from caresync.codecs.source import SourceCommand, SourceError

FORMATS = ("hl7", "fhir")
"""Raw formats the ingest stage decodes (the token after ``<prefix>.raw.``)."""


@dataclass(frozen=True, slots=True)
class RawItem:
    """One message of a raw payload: the commands it became, or why it was rejected."""

    index: int
    data: bytes
    commands: tuple[SourceCommand, ...] = ()
    error: SourceError | None = None

    @property
    def kind(self) -> str:
        """The canonical event kind, as far as known (for verdicts of rejected messages)."""
        if self.commands:
            return self.commands[0].kind
        return self.error.kind if self.error is not None else ""

    @property
    def entity(self) -> str:
        """The entity id, as far as known."""
        if self.commands:
            return self.commands[0].entity
        return self.error.entity if self.error is not None else ""


def decode_raw(
    fmt: str,
    data: bytes,
    *,
    frame_error: str = "",
    default_tz: tzinfo = UTC,
    max_bytes: int = 1 << 20,
) -> list[RawItem]:
    """Decode one raw payload; never raises.  ``frame_error`` reports a broken MLLP frame
    (found by the sender's framing) so that the message is rejected, not half-decoded."""
    if fmt == "hl7":
        return _hl7(data, frame_error, default_tz, max_bytes)
    if fmt == "fhir":
        return [_fhir(data, max_bytes)]
    known = ", ".join(FORMATS)
    error = SourceError(f"unknown raw format {fmt!r}: caresync decodes {known}", code="bad_format")
    return [RawItem(0, data, error=error)]


def _hl7(data: bytes, frame_error: str, default_tz: tzinfo, max_bytes: int) -> list[RawItem]:
    from caresync.codecs.hl7v2 import decode_hl7, event_kind, split_messages

    if frame_error:
        error = SourceError(frame_error, code="broken_frame", kind=event_kind(data))
        return [RawItem(0, data, error=error)]
    if len(data) > max_bytes:
        error = SourceError(
            f"HL7 payload of {len(data)} bytes is over the {max_bytes}-byte limit",
            code="too_large",
        )
        return [RawItem(0, data[:max_bytes], error=error)]
    frames = split_messages(data)
    if not frames:
        return [RawItem(0, data, error=SourceError("empty HL7 payload: no MSH", code="malformed"))]
    items: list[RawItem] = []
    whole = len(frames) == 1  # dead letters keep the payload exactly as it was sent
    for i, frame in enumerate(frames):
        kept = data if whole else frame.data
        if frame.error:
            err = SourceError(frame.error, code="broken_frame", kind=event_kind(frame.data))
            items.append(RawItem(i, kept, error=err))
            continue
        try:
            commands = decode_hl7(frame.data, default_tz=default_tz, max_bytes=max_bytes)
        except SourceError as exc:
            if not exc.kind:
                exc.kind = event_kind(frame.data)
            items.append(RawItem(i, kept, error=exc))
            continue
        items.append(RawItem(i, kept, commands=commands))
    return items


def _fhir(data: bytes, max_bytes: int) -> RawItem:
    from caresync.codecs.fhir import decode_fhir, resource_kind

    try:
        return RawItem(0, data, commands=decode_fhir(data, max_bytes=max_bytes))
    except SourceError as exc:
        if not exc.kind:
            exc.kind = resource_kind(data)
        return RawItem(0, data, error=exc)
