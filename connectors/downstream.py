"""What every connector does, whatever carries the call: the seam, its result, the reply.

A call sends one effect envelope (JSON) with an ``Idempotency-Key`` header equal to the
envelope id.  The system answers with a :class:`DownstreamReply`: an ``outcome`` (``created``,
or ``duplicate`` when it had seen the key before) and its ``reference``, or an ``error`` and
whether it is ``transient``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec

from caresync.connectors.errors import PermanentError, TransientError

IDEMPOTENCY_HEADER = "Idempotency-Key"

Outcome = Literal["created", "duplicate"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """A call that succeeded: what the system did and its reference for the record."""

    outcome: Outcome
    reference: str = ""


class Downstream(Protocol):
    """One downstream system, reached over NATS or HTTP."""

    async def call(self, operation: str, idempotency_key: str, body: bytes) -> Delivery:
        """Send ``body`` (an effect envelope) as ``operation``; raises TransientError or
        PermanentError when the system did not take it."""
        ...

    async def aclose(self) -> None:
        """Release connections (idempotent)."""
        ...


class DownstreamReply(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """A downstream system's answer to a call.

    Wire schema: unknown fields are ignored, new fields get defaults and go last.
    """

    outcome: str = ""
    """``created`` or ``duplicate`` on success; empty on error."""
    system: str = ""
    operation: str = ""
    reference: str | int = ""
    """The system's own id for what it created (a PO number, a charge id)."""
    attempts: int = 0
    """How many times the system has seen this idempotency key."""
    error: str = ""
    """Why the call failed; empty on success."""
    transient: bool = False
    """With ``error``: whether the same call may succeed later."""


_reply_decoder = msgspec.json.Decoder(DownstreamReply)


def decode_reply(data: bytes) -> DownstreamReply | None:
    """The reply in ``data``, or None when it is not a JSON reply of the contract."""
    try:
        return _reply_decoder.decode(data)
    except msgspec.DecodeError:  # ValidationError included
        return None


def interpret_reply(reply: DownstreamReply, what: str) -> Delivery:
    """The delivery a reply reports; raises TransientError or PermanentError for an error."""
    if reply.error:
        error = TransientError if reply.transient else PermanentError
        raise error(f"{what}: {reply.error}")
    if reply.outcome == "created":
        return Delivery("created", str(reply.reference))
    if reply.outcome == "duplicate":
        return Delivery("duplicate", str(reply.reference))
    raise PermanentError(f"{what}: reply has neither an error nor a known outcome: {reply!r}")


def split_header(text: str) -> tuple[str, str] | None:
    """``"Authorization: Bearer x"`` as (name, value); None for an empty setting."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        return None
    return name.strip(), value.strip()
