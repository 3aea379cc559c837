"""What a source-format codec (HL7 v2, FHIR R4) turns one message into: canonical commands.

A codec is a pure function from the bytes of one source message to a tuple of
``SourceCommand``; the router's ingest stage wraps each in the canonical envelope and
publishes it on ``cs.in.<kind>.<entity>``, so that a command decoded from HL7 or FHIR meets the
same actors, verdicts and dead letters as one published in canonical JSON.

A message that cannot become commands raises ``SourceError`` (a ``CodecError``) whose
``reason`` names the problem where a person can find it: the segment and field (``SCH-2``),
the JSON path (``$.participant[2].actor``) or the byte offset.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

import msgspec

from caresync.codecs.errors import CodecError


class SourceCommand(msgspec.Struct, kw_only=True, frozen=True):
    """One canonical command decoded from a source message."""

    kind: str
    """``<entity kind>.<command>``, such as ``appointment.book``."""
    entity: str
    """The entity id (never empty, never invented: it comes from the message)."""
    id: str
    """Deterministic command id derived from the message content (see ``content_id``)."""
    payload: Any
    """The command's payload: a msgspec Struct or a plain dict, encodable by msgspec."""
    occurred_at: datetime | None = None
    """Source timestamp (MSH-7, meta.lastUpdated...); None: the time it entered the log."""
    source: str = ""
    """Sending system, such as ``hl7:SCHApp`` or ``fhir``."""


class SourceError(CodecError):
    """A source message that cannot become commands; dead-lettered with its raw bytes.

    ``kind`` and ``entity`` are filled when the codec got far enough to know them (an SIU S15
    for a known appointment whose start is malformed), so the verdict can say what was refused.
    """

    code = "bad_source"

    def __init__(self, reason: str, *, code: str | None = None, kind: str = "", entity: str = ""):
        super().__init__(reason, code=code)
        self.kind = kind
        self.entity = entity


def content_id(prefix: str, *parts: bytes | str) -> str:
    """A command id that is a digest of the message content: a resend of the same content
    (under a new control id) is the same command, any change in content a new one."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return f"{prefix}:{digest.hexdigest()[:32]}"
