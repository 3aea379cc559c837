"""What every mapping needs from a routed message: its header, ids, times and command maker."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, tzinfo

from caresync.codecs.hl7v2.errors import MALFORMED, UNSUPPORTED_VERSION, Hl7Error
from caresync.codecs.hl7v2.message import Message, Segment
from caresync.codecs.hl7v2.values import parse_ts
from caresync.codecs.source import SourceCommand, content_id

_VERSION = re.compile(r"2\.([3-8])(?:\.(\d{1,2}))?")


@dataclass(frozen=True, slots=True)
class Header:
    """The routing facts of MSH: type, event, version and sender."""

    message_type: str
    """MSH-9.1, such as ``SIU``."""
    trigger: str
    """MSH-9.2, such as ``S12``."""
    version: tuple[int, int, int]
    """MSH-12.1 as numbers: ``2.5.1`` is (2, 5, 1)."""
    sender: str
    """MSH-3.1, the sending application ('' when not given)."""

    @property
    def event(self) -> str:
        """``SIU^S12``."""
        return f"{self.message_type}^{self.trigger}"


def read_header(message: Message) -> Header:
    """Check MSH-9 and MSH-12 and read them; raises Hl7Error."""
    msh = message.msh
    last = len(msh.fields) - 1
    for n, name in ((9, "message type"), (12, "version id")):
        if last < n:
            raise Hl7Error(
                f"MSH-{n} ({name}) is missing: the MSH segment ends after MSH-{last}, the "
                "message is truncated",
                code=MALFORMED,
                location=f"MSH-{n}",
            )
    message_type, trigger = msh.value(9, 1).strip(), msh.value(9, 2).strip()
    if not message_type or not trigger:
        which = "9.1 (message type)" if not message_type else "9.2 (trigger event)"
        raise Hl7Error(
            f"MSH-{which} is empty: MSH-9 must read like SIU^S12",
            code=MALFORMED,
            location=f"MSH-{which.split(' ')[0]}",
        )
    text = msh.value(12, 1).strip()
    match = _VERSION.fullmatch(text)
    if match is None:
        raise Hl7Error(
            f"MSH-12 (version id) {text[:20]!r} is not supported: caresync reads HL7 v2.3 to v2.8",
            code=UNSUPPORTED_VERSION,
            location="MSH-12",
        )
    version = (2, int(match.group(1)), int(match.group(2) or 0))
    truncation = message.delimiters.truncation
    if truncation and version < (2, 7, 0):
        raise Hl7Error(
            f"MSH-2 has a fifth encoding character {truncation!r} (truncation), which exists "
            f"only from v2.7 but MSH-12 says {text}: send 4 encoding characters",
            code=MALFORMED,
            location="MSH-2",
        )
    return Header(message_type.upper(), trigger.upper(), version, msh.value(3, 1).strip())


class Context:
    """A routed message with its header, time zone and the rules for ids and commands."""

    def __init__(self, message: Message, header: Header, default_tz: tzinfo) -> None:
        self.message = message
        self.header = header
        self.default_tz = default_tz
        self._basis: str | None = None
        self._occurred_at: datetime | None = None

    @property
    def source(self) -> str:
        """``hl7:<MSH-3.1>``, or ``hl7`` when MSH-3 is empty."""
        return f"hl7:{self.header.sender}" if self.header.sender else "hl7"

    @property
    def occurred_at(self) -> datetime:
        """MSH-7 (required and validated)."""
        if self._occurred_at is None:
            msh = self.message.msh
            text = msh.value(7, 1)
            if not text.strip():
                raise Hl7Error(
                    "MSH-7 (date/time of message) is empty: caresync orders changes by it",
                    code=MALFORMED,
                    location="MSH-7",
                )
            self._occurred_at = parse_ts(text, "MSH-7", self.default_tz)
        return self._occurred_at

    def command_id(self, index: int) -> str:
        """Content id of the index-th command: same content under a new MSH-10, same id."""
        if self._basis is None:
            self._basis = self.message.canonical_text()
        return content_id("hl7", self._basis, str(index))

    def command(self, index: int, kind: str, entity: str, payload: object) -> SourceCommand:
        """The index-th command decoded from this message."""
        return SourceCommand(
            kind=kind,
            entity=entity,
            id=self.command_id(index),
            payload=payload,
            occurred_at=self.occurred_at,
            source=self.source,
        )

    def qualified(self, ident: str, namespace: str) -> str:
        """``NAMESPACE:ID``, the namespace defaulting to MSH-3.1 (just ``ID`` without one)."""
        space = namespace or self.header.sender
        return f"{space}:{ident}" if space else ident

    def timestamp(self, segment: Segment, n: int, component: int = 1) -> datetime | None:
        """A TS field as an aware datetime, None when empty; raises Hl7Error if invalid."""
        text = segment.value(n, component)
        if not text.strip():
            return None
        where = segment.where(n, component if component > 1 else 0)
        return parse_ts(text, where, self.default_tz, segment.at())


@contextmanager
def refusing(kind: str, entity: str = "") -> Iterator[None]:
    """Fill in the kind and entity of an Hl7Error raised inside, if not set yet."""
    try:
        yield
    except Hl7Error as exc:
        exc.kind = exc.kind or kind
        exc.entity = exc.entity or entity
        raise
