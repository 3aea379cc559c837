"""Re-submitting a dead letter through the normal path (``caresync dlq retry``).

The letter's raw bytes go back to the subject they first arrived on, under a new
``Nats-Msg-Id`` (JetStream's duplicate window would drop the old one).  A canonical command
that an actor *rejected* has its rejection forgotten first, so that the retry is decided again
(its command id is kept: an accepted command stays a duplicate forever).  A raw HL7 or FHIR
message is decoded again by the ingest stage.  The publisher then asks for the new verdict.
"""

from __future__ import annotations

import time
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from caresync.codecs import CodecError, Subjects, decode_envelope
from caresync.router.ingest import H_FORMAT, H_INDEX
from caresync.router.outbox_rows import (
    H_CODE,
    H_ENTITY,
    H_KIND,
    H_REASON,
    H_SEQ,
    H_STREAM,
    H_SUBJECT,
)
from caresync.store import Store

H_RETRY_OF = "Caresync-Retry-Of"
_DROPPED = {
    H_REASON,
    H_CODE,
    H_SUBJECT,
    H_STREAM,
    H_SEQ,
    H_KIND,
    H_ENTITY,
    H_INDEX,
    H_FORMAT,
    H_RETRY_OF,
    "Nats-Msg-Id",
    "Nats-Expected-Stream",
}
"""Headers the dead-letter stream added; the sender's own (and a frame error) go back."""


async def retry_dead_letter(
    nc: NatsClient, store: Store, subjects: Subjects, seq: int
) -> dict[str, Any]:
    """Publish dead letter ``seq`` again where it came from; where it was stored, to ask its
    verdict (``stream``, ``seq``, and ``raw`` or ``kind``/``entity``/``id``)."""
    js = nc.jetstream()
    try:
        letter = await js.get_msg(subjects.dead_letter_stream, seq)
    except nats.js.errors.NotFoundError:
        return {"error": f"no dead letter #{seq} in {subjects.dead_letter_stream}"}
    headers = {str(k): str(v) for k, v in (letter.headers or {}).items()}
    subject = headers.get(H_SUBJECT, "")
    data = letter.data or b""
    if not subject:
        return {"error": f"dead letter #{seq} does not say which subject it came from"}
    found: dict[str, Any] = {}
    fmt = subjects.raw_format(subject)
    if fmt:
        found["raw"] = True
    else:
        try:
            address = subjects.parse_address(subject)
            envelope, _ = decode_envelope(data)
        except CodecError as exc:
            # It never decoded: retrying would only repeat the same verdict.
            return {"error": f"dead letter #{seq} cannot be retried as it is: {exc.reason}"}
        await store.forget_rejection(address.kind, envelope.entity, envelope.id)
        found |= {"kind": address.kind, "entity": envelope.entity, "id": envelope.id}
    resend = {
        k: v for k, v in headers.items() if k not in _DROPPED and not k.startswith("Caresync-")
    }
    resend["Nats-Msg-Id"] = f"retry:{seq}:{time.time_ns()}"
    resend[H_RETRY_OF] = str(seq)
    try:
        ack = await js.publish(subject, data, headers=resend, timeout=5.0)
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        return {"error": f"could not publish dead letter #{seq} again: {exc}"}
    return found | {"stream": ack.stream, "seq": ack.seq, "subject": subject}
