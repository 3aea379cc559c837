"""Submitting raw source messages (HL7 v2, FHIR) and waiting for the router's verdict.

Used by ``caresync publish --format hl7|fhir`` and by the MLLP listener: publish the bytes to
``<prefix>.raw.<format>`` with ``Nats-Msg-Id`` = a digest of the bytes (a retried publish is
stored once), then ask the router (``<prefix>.ctl.verdict``) what became of it until it has
decided or the wait runs out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from caresync.codecs import Subjects
from caresync.router.ingest import H_FRAME_ERROR
from caresync.router.verdicts import FINAL, poll_verdict


@dataclass(slots=True)
class RawVerdict:
    """What became of one raw message."""

    verdict: str
    """accepted, duplicate, rejected, parked, pending (no verdict in time) or failed (not
    stored: the broker refused it or is unreachable)."""
    reason: str = ""
    code: str = ""
    stream: str = ""
    seq: int = 0
    items: list[dict[str, Any]] = field(default_factory=list)
    """One per message inside the raw payload: index, verdict, kind, entity, reason, code,
    commands."""

    @property
    def kind(self) -> str:
        """The canonical event kind of the first message, as far as known."""
        return str(self.items[0].get("kind", "")) if self.items else ""

    @property
    def entity(self) -> str:
        """The entity id of the first message, as far as known."""
        return str(self.items[0].get("entity", "")) if self.items else ""


class RawSubmitter:
    """Publishes raw messages on one connection and waits for their verdicts."""

    def __init__(
        self,
        nc: NatsClient,
        subjects: Subjects,
        *,
        wait_s: float = 10.0,
        stop_waiting_without_router: bool = False,
    ) -> None:
        """``stop_waiting_without_router``: once a whole wait passed with no router answering,
        store the next messages without waiting (a CLI with a file of messages)."""
        self._stop_waiting = stop_waiting_without_router
        self._nc = nc
        self._js = nc.jetstream()
        self._subjects = subjects
        self._wait_s = wait_s

    async def submit(
        self, fmt: str, data: bytes, *, frame_error: str = "", source: str = ""
    ) -> RawVerdict:
        """Publish one raw message and wait (up to ``wait_s``) for its verdict."""
        headers = {"Nats-Msg-Id": "raw:" + hashlib.sha256(data).hexdigest()[:40]}
        if frame_error:
            headers[H_FRAME_ERROR] = frame_error[:1000]
        try:
            ack = await self._js.publish(
                self._subjects.raw(fmt, source), data, timeout=5.0, headers=headers
            )
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            return RawVerdict("failed", reason=f"not stored: {type(exc).__name__}: {exc}")
        result = RawVerdict("pending", stream=ack.stream, seq=ack.seq)
        if self._wait_s <= 0:
            result.reason = "published; not waiting for the verdict"
            return result
        found = await self._await(ack.stream, ack.seq)
        result.verdict = found.get("verdict", "pending")
        result.items = list(found.get("items", []))
        if ack.duplicate:
            # The very same bytes were published before: this copy changes nothing.
            for item in result.items:
                if item.get("verdict") == "accepted":
                    item["verdict"] = "duplicate"
            if result.verdict == "accepted":
                result.verdict = "duplicate"
        problem = next((i for i in result.items if i.get("reason")), None)
        if problem is not None:
            result.reason, result.code = str(problem["reason"]), str(problem.get("code", ""))
        elif found.get("no_router"):
            result.reason = (
                f"stored as {ack.stream} seq {ack.seq}; no router answered, it will be decided "
                "when one runs (not waiting for the next messages)"
            )
        elif result.verdict == "pending":
            result.reason = (
                f"stored as {ack.stream} seq {ack.seq}, no verdict from the router within "
                f"{self._wait_s:g} s"
            )
        return result

    async def _await(self, stream: str, seq: int) -> dict[str, Any]:
        found, answered = await poll_verdict(
            self._nc,
            self._subjects.control("verdict"),
            {"stream": stream, "seq": seq, "raw": True},
            self._wait_s,
            lambda f: f.get("verdict") in FINAL or f.get("verdict") == "unknown",
        )
        if found is not None:
            return found
        if not answered and self._stop_waiting:
            # No router at all: the next messages are stored without waiting in vain for each.
            self._wait_s = 0
            return {"verdict": "pending", "no_router": True}
        return {"verdict": "pending"}
