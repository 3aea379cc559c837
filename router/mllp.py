"""The MLLP listener: HL7 v2 senders connect over TCP, each message gets an HL7 ACK.

Every message is submitted to the raw stream like ``caresync publish --format hl7`` does, and
the ACK carries the router's verdict (original-mode acknowledgement):

- ``AA`` accepted, or a duplicate of a message already accepted;
- ``AR`` rejected before reaching an actor: the message cannot be decoded or is not routed
  (malformed, wrong version, unsupported event, missing id...), MSA-3 and ERR say why;
- ``AE`` an application error: an actor refused the command (cancel of an unknown
  appointment), parked it, or no verdict came in time (the message is stored: a resend is a
  duplicate, never a second booking).

Messages of one connection are answered in order, one at a time, as HL7 senders expect.  The
frame reader never merges two messages: a broken frame is answered and dead-lettered on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import structlog
from anyio.abc import SocketStream, TaskStatus

from caresync.router.raw_client import RawSubmitter, RawVerdict

log = structlog.get_logger("caresync.mllp")

READ_CHUNK = 65536


def ack_code(verdict: RawVerdict) -> str:
    """The MSA-1 acknowledgement code of a verdict."""
    if verdict.verdict in ("accepted", "duplicate"):
        return "AA"
    if verdict.verdict == "rejected" and not any(i.get("commands") for i in verdict.items):
        return "AR"  # refused by the decoder: no command was made of it
    return "AE"


def ack_text(verdict: RawVerdict) -> str:
    """MSA-3 / ERR-8: what happened, in words."""
    if verdict.verdict in ("accepted", "duplicate"):
        what = " ".join(x for x in (verdict.kind, verdict.entity) if x)
        return f"{verdict.verdict} {what}".strip()
    return f"{verdict.verdict}: {verdict.reason}" if verdict.reason else verdict.verdict


class MllpServer:
    """Serves MLLP connections; ``submit`` is the raw submitter's bound method."""

    def __init__(self, submitter: RawSubmitter, *, max_frame_bytes: int = 1 << 20) -> None:
        self._submitter = submitter
        self._max_frame_bytes = max_frame_bytes
        self.port = 0
        self.handled = 0

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen until cancelled; ``task_status.started(port)`` once bound."""
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        async with listener:
            self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
            log.info("mllp_listening", host=host, port=self.port)
            task_status.started(self.port)
            await listener.serve(self.handle)

    async def handle(self, stream: SocketStream) -> None:
        """One connection: frames in, ACKs out, in order, until the peer closes."""
        from caresync.codecs.hl7v2 import MllpReader

        peer = _peer(stream)
        reader = MllpReader(max_frame_bytes=self._max_frame_bytes)
        log.info("mllp_connected", peer=peer)
        async with stream:
            try:
                while True:
                    chunk = await stream.receive(READ_CHUNK)
                    for frame in reader.feed(chunk):
                        await stream.send(await self._answer(frame.data, frame.error, peer))
            except anyio.EndOfStream:
                # A frame left open when the sender hung up is still a message it sent: it is
                # dead-lettered as broken (and answered, if the peer still reads).
                for frame in reader.close():
                    ack = await self._answer(frame.data, frame.error, peer)
                    try:
                        await stream.send(ack)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
        log.info("mllp_disconnected", peer=peer)

    async def _answer(self, data: bytes, frame_error: str, peer: str) -> bytes:
        from caresync.codecs.hl7v2 import build_ack, mllp_frame

        verdict = await self._submitter.submit("hl7", data, frame_error=frame_error)
        code = ack_code(verdict)
        self.handled += 1
        log.info(
            "mllp_message",
            peer=peer,
            ack=code,
            verdict=verdict.verdict,
            kind=verdict.kind,
            entity=verdict.entity,
            reason=verdict.reason,
        )
        return mllp_frame(build_ack(data, code, ack_text(verdict)))  # type: ignore[arg-type]


def _peer(stream: SocketStream) -> str:
    get: Callable[..., object] = stream.extra
    try:
        address = get(anyio.abc.SocketAttribute.remote_address)
    except anyio.TypedAttributeLookupError:
        return "?"
    return str(address)
