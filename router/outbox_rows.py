"""What the router writes to its outbox: effects as envelopes, and dead letters.

Effects to other actors travel as msgpack envelopes on ``<prefix>.int.<kind>.<id>``; effects
to downstream systems as JSON envelopes on ``<prefix>.out.<system>.<key>``.  A dead letter is
the input's raw bytes, untouched, with the reason in headers.
"""

from __future__ import annotations

from typing import Any

import structlog

from caresync.actors.contract import ActorRef, Command, Effect
from caresync.codecs import (
    CodecError,
    Envelope,
    Subjects,
    WireFormat,
    encode_envelope,
    encode_payload,
)
from caresync.router.transport import Inbound
from caresync.store import OutboxRow, ParkedRow

MAX_HEADER_VALUE = 1024
log = structlog.get_logger("caresync.dead_letters")

# Headers a dead letter carries; the original headers are kept beside them.
H_REASON = "Caresync-Reason"
H_CODE = "Caresync-Reason-Code"
H_SUBJECT = "Caresync-Subject"
H_STREAM = "Caresync-Stream"
H_SEQ = "Caresync-Stream-Seq"


def effect_row(
    subjects: Subjects, source_kind: str, command: Command[Any], effect: Effect
) -> OutboxRow:
    """The outbox row of one effect, keyed by its idempotency key."""
    subject, envelope, fmt = effect_envelope(subjects, source_kind, command, effect)
    return OutboxRow(key=effect.key, subject=subject, payload=encode_envelope(envelope, fmt))


def effect_envelope(
    subjects: Subjects, source_kind: str, command: Command[Any], effect: Effect
) -> tuple[str, Envelope, WireFormat]:
    """Subject, envelope and wire format of one effect (:func:`effect_row` encodes them)."""
    target = effect.target
    if isinstance(target, ActorRef):
        subject = subjects.internal(target.kind, target.entity)
        kind, entity, fmt = f"{target.kind}.{effect.name}", target.entity, WireFormat.MSGPACK
    else:
        subject = subjects.downstream(target.system, target.key)
        kind, entity, fmt = f"{target.system}.{effect.name}", target.key, WireFormat.JSON
    envelope = Envelope(
        id=effect.key,
        kind=kind,
        entity=entity,
        occurred_at=command.occurred_at,
        source=f"caresync/{source_kind}",
        correlation_id=command.correlation_id or command.id,
        causation_id=command.id,
        data=encode_payload(effect.payload if effect.payload is not None else {}, fmt),
    )
    return subject, envelope, fmt


def header_safe(text: str) -> str:
    """A header value: one line of printable text, capped, so hostile input cannot break it."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return cleaned[:MAX_HEADER_VALUE]


H_KIND = "Caresync-Kind"
H_ENTITY = "Caresync-Entity"


def dead_letter_row(
    subjects: Subjects,
    message: Inbound,
    code: str,
    reason: str,
    *,
    kind: str = "",
    entity: str = "",
) -> OutboxRow:
    """The outbox row sending ``message`` to the dead-letter stream, raw bytes untouched."""
    headers = {k: v for k, v in (message.headers or {}).items() if k != "Nats-Msg-Id"}
    if kind:
        headers[H_KIND] = header_safe(kind)
    if entity:
        headers[H_ENTITY] = header_safe(entity)
    headers.update(
        {
            H_REASON: header_safe(reason),
            H_CODE: code,
            H_SUBJECT: header_safe(message.subject),
            H_STREAM: message.stream,
            H_SEQ: str(message.seq),
        }
    )
    return OutboxRow(
        key=dead_letter_key(message),
        subject=subjects.dead_letter(code),
        payload=message.data,
        headers=headers,
    )


def dead_letter_key(message: Inbound) -> str:
    """The outbox key of a message's dead letter: its stream position (a local command's is
    its root's position and its place after it)."""
    if message.local_n:
        return f"dlq:{message.stream}:{message.seq}.{message.local_n}"
    return f"dlq:{message.stream}:{message.seq}"


def undecodable_row(subjects: Subjects, message: Inbound, exc: CodecError) -> OutboxRow:
    """Log a message that does not decode and return its dead letter."""
    log.warning(
        "dead_letter", code=exc.code, reason=exc.reason, subject=message.subject, seq=message.seq
    )
    return dead_letter_row(subjects, message, exc.code, exc.reason)


def parked_row(
    kind: str,
    message: Inbound,
    command: Command[Any],
    reason: str,
    failures: int,
    now: float,
) -> ParkedRow:
    """The row keeping a message of a parked entity (the one that failed, or one behind it)."""
    return ParkedRow(
        kind=kind,
        id=command.entity,
        stream=message.stream,
        seq=message.seq,
        command_id=command.id,
        subject=message.subject,
        data=message.data,
        headers=message.headers,
        reason=reason,
        failures=failures,
        parked_at=now,
        timestamp_ns=message.timestamp_ns,
    )
