"""The acknowledgement a connector sends back to the actor that owns an effect.

One final acknowledgement per effect, a command ``<owner kind>.downstream_ack`` on
``<prefix>.int.<owner kind>.<entity>`` (msgpack, like all internal fan-out) with id
``ack:<effect key>``, which is also its ``Nats-Msg-Id``: if the effect is delivered again after
a crash, the acknowledgement is the same command and changes nothing.  An effect that failed
for good and is sent again by ``caresync retry-failed`` starts a new round, whose
acknowledgement is a new command ``ack:<effect key>:r<n>`` (n failures before it).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from caresync.codecs import Envelope, Subjects, WireFormat, encode_envelope, make_envelope
from caresync.codecs.downstream import DownstreamAck
from caresync.codecs.envelope import MAX_ID_LENGTH
from caresync.router.transport import Outbound

ACK_COMMAND = "downstream_ack"
_SOURCE_PREFIX = "caresync/"


def owner_kind(effect: Envelope, system: str) -> str:
    """The actor kind that owns an effect: ``source`` is ``caresync/<kind>`` (else the system)."""
    if effect.source.startswith(_SOURCE_PREFIX) and effect.source[len(_SOURCE_PREFIX) :]:
        return effect.source[len(_SOURCE_PREFIX) :]
    return system


def ack_id(effect_key: str, round_: int = 0) -> str:
    """The id of the final acknowledgement of an effect (hashed only if it would be too long);
    ``round_`` counts the times it failed for good before this delivery."""
    suffix = f":r{round_}" if round_ else ""
    plain = f"ack:{effect_key}{suffix}"
    if len(plain) <= MAX_ID_LENGTH:
        return plain
    return "ack:sha256:" + hashlib.sha256(effect_key.encode()).hexdigest() + suffix


def ack_message(
    subjects: Subjects, effect: Envelope, owner: str, ack: DownstreamAck, round_: int = 0
) -> Outbound:
    """The acknowledgement command for ``effect``, ready to publish with its Msg-Id."""
    envelope = make_envelope(
        id=ack_id(ack.effect_key, round_),
        kind=f"{owner}.{ACK_COMMAND}",
        entity=effect.entity,
        payload=ack,
        occurred_at=datetime.now(UTC),
        source=f"caresync/connector-{ack.system}",
        correlation_id=effect.correlation,
        causation_id=effect.id,
        fmt=WireFormat.MSGPACK,
    )
    return Outbound(
        key=envelope.id,
        subject=subjects.internal(owner, effect.entity),
        payload=encode_envelope(envelope, WireFormat.MSGPACK),
    )
