"""What a connector reports back to the actor that owns a downstream conversation."""

from __future__ import annotations

from typing import Literal

import msgspec

AckOutcome = Literal["created", "duplicate", "failed"]


class DownstreamAck(msgspec.Struct, kw_only=True, frozen=True):
    """Payload of ``<owner kind>.downstream_ack``: what became of one effect downstream.

    Wire schema: unknown fields are ignored, new fields get defaults and go last.
    """

    effect_key: str
    system: str
    operation: str = ""
    outcome: AckOutcome
    """``created``, ``duplicate`` (the system had it already) or ``failed`` (given up)."""
    reference: str = ""
    """The system's reference for what it created; empty when it failed."""
    error: str = ""
    """Why it failed (the last error); empty on success."""
    attempts: int = 0
    """Calls made for this effect, over all its deliveries."""
