"""``caresync retry-failed``: send effects that failed for good once more, same idempotency key.

An effect fails for good after a permanent error or its last attempt (``[downstream.<system>]
max_attempts``); its connector recorded the failure and the owning actor's sync ledger shows it
as ``failed``.  Retrying publishes the same effect envelope again on its output subject (a new
``Nats-Msg-Id``, so JetStream does not drop it as a duplicate of the first publish), its
connector calls the system with the *same* idempotency key (a system that did take it the first
time answers duplicate, never a second record), with a fresh attempt budget, and the ledger
leaves ``failed`` once it succeeds.
"""

from __future__ import annotations

import time
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from caresync.codecs import CodecError, Subjects, decode_envelope
from caresync.connectors.worker import RETRY_OF
from caresync.store import PartitionedStore

SYSTEMS = ("billing", "erp", "supply")


async def retry_failed(
    nc: NatsClient, store: PartitionedStore, subjects: Subjects, system: str = ""
) -> dict[str, Any]:
    """Publish every failed effect (of ``system``) again; what was sent, what could not be."""
    if system and system not in SYSTEMS:
        return {"error": f"unknown downstream {system!r}; known: {', '.join(SYSTEMS)}"}
    failed = await store.main.failed_effects(system)
    js = nc.jetstream()
    kept = {call.effect_key: await store.outbox_row(call.effect_key) for call in failed}
    gone = {key for key, row in kept.items() if row is None}
    if gone:  # pruned from the outbox: one pass over the output stream finds them all
        kept |= await _from_stream(js, subjects, gone)
    sent: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    for call in failed:
        found = kept.get(call.effect_key)
        if found is None:
            missing.append(
                {
                    "key": call.effect_key,
                    "system": call.system,
                    "reason": "the effect is no longer in the outbox nor in the output stream "
                    "(retention); replay its entity to produce it again",
                }
            )
            continue
        subject, payload = found
        headers = {"Nats-Msg-Id": f"retry:{call.effect_key}:{time.time_ns()}"}
        headers[RETRY_OF] = call.effect_key
        try:
            ack = await js.publish(subject, payload, headers=headers, timeout=5.0)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            missing.append({"key": call.effect_key, "system": call.system, "reason": str(exc)})
            continue
        sent.append(
            {
                "key": call.effect_key,
                "system": call.system,
                "operation": call.operation,
                "last_error": call.error,
                "seq": ack.seq,
            }
        )
    return {"sent": sent, "not_sent": missing}


async def _from_stream(
    js: Any, subjects: Subjects, keys: set[str]
) -> dict[str, tuple[str, bytes] | None]:
    """Subject and payload of the effects with these Msg-Ids, read from the output stream
    newest first until all are found (one pass for all of them)."""
    stream = subjects.output_stream
    found: dict[str, tuple[str, bytes] | None] = {}
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.Error:
        return found
    seq = info.state.last_seq
    while seq >= info.state.first_seq and len(found) < len(keys):
        try:
            msg = await js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            seq -= 1
            continue
        headers, data = msg.headers or {}, msg.data or b""
        key = _effect_key(headers, data)
        if key in keys and key not in found and msg.subject:
            found[key] = (str(msg.subject), bytes(data))
        seq -= 1
    return found


def _effect_key(headers: dict[str, str], data: bytes) -> str:
    """The idempotency key of a stored output message (its Msg-Id, else its envelope id)."""
    msg_id = headers.get("Nats-Msg-Id")
    if msg_id is not None:
        return str(msg_id)
    try:
        return decode_envelope(data)[0].id
    except CodecError:
        return ""
