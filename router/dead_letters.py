"""Re-submitting a dead letter through the normal path (``caresync dlq retry``).

A canonical command that was dead-lettered never took effect (it was rejected or did not
decode), so its retry is sent as a *new* command: the same envelope with the id
``<id>~retry-<letter seq>-<attempt>`` (caused by, and correlated with, the original), on the
subject it first arrived on.  The live router and any later replay then treat the retry alike:
a new id, decided on its own, deduplicated like any other.  A raw HL7 or FHIR message goes back
to its raw subject as it was, and the ingest stage decodes it again.  The publisher then asks
for the new verdict.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from caresync.codecs import CodecError, Subjects, decode_envelope, encode_envelope
from caresync.codecs.envelope import MAX_ID_LENGTH
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


async def retry_dead_letter(nc: NatsClient, subjects: Subjects, seq: int) -> dict[str, Any]:
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
    msg_id = f"retry:{seq}:{time.time_ns()}"
    if subjects.raw_format(subject):
        found["raw"] = True
    else:
        try:
            address = subjects.parse_address(subject)
            envelope, fmt = decode_envelope(data)
        except CodecError as exc:
            # It never decoded: retrying would only repeat the same verdict.
            return {"error": f"dead letter #{seq} cannot be retried as it is: {exc.reason}"}
        msg_id = retry_command_id(envelope.id, seq)
        retried = msgspec.structs.replace(
            envelope, id=msg_id, causation_id=envelope.id, correlation_id=envelope.correlation
        )
        data = encode_envelope(retried, fmt)
        found |= {"kind": address.kind, "entity": envelope.entity, "id": msg_id}
    resend = {k: v for k, v in headers.items() if k not in _DROPPED}
    resend["Nats-Msg-Id"] = msg_id
    resend[H_RETRY_OF] = str(seq)
    try:
        ack = await js.publish(subject, data, headers=resend, timeout=5.0)
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        return {"error": f"could not publish dead letter #{seq} again: {exc}"}
    return found | {"stream": ack.stream, "seq": ack.seq, "subject": subject}


def retry_command_id(command_id: str, letter_seq: int, attempt: int | None = None) -> str:
    """The id of one retry of a dead letter: new (the original never took effect, and an
    earlier retry of the same letter may have been rejected too), and recognisable."""
    attempt = time.time_ns() // 1_000_000 if attempt is None else attempt
    suffix = f"~retry-{letter_seq}-{attempt}"
    if len(command_id) + len(suffix) <= MAX_ID_LENGTH:
        return command_id + suffix
    return "sha256:" + hashlib.sha256(command_id.encode()).hexdigest()[:32] + suffix
