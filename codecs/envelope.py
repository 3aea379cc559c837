"""The canonical envelope every command travels in, with its JSON and msgpack codecs.

A payload in JSON starts with ``{`` (after optional whitespace); one in msgpack starts with a
map marker.  The format is sniffed from the first byte, so no header is needed and both can
share a subject.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum
from typing import Annotated, Any

import msgspec

from caresync.codecs.errors import ContractError, DecodeError

ENVELOPE_SCHEMA_VERSION = 1
"""The highest envelope schema version this build understands."""

MAX_ID_LENGTH = 256


class WireFormat(Enum):
    """Serialisation of an envelope on the wire."""

    JSON = "json"
    MSGPACK = "msgpack"


class Envelope(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """The canonical envelope: who the command is for, where it came from, and its data.

    Wire schema: never forbid unknown fields, new fields get defaults and go last, types
    never change (see docs/contracts.md).
    """

    id: str
    """Unique command id; the dedupe key.  A command id already applied is a no-op."""
    kind: str
    """``<entity kind>.<command>``, such as ``appointment.book``."""
    entity: str
    """Entity id; must equal the id in the subject."""
    occurred_at: Annotated[datetime, msgspec.Meta(tz=True)]
    """When the change happened in the source system (timezone-aware)."""
    source: str = ""
    """Which system (or actor) sent it."""
    correlation_id: str = ""
    """Id shared by every message of one business flow; defaults to ``id``."""
    causation_id: str = ""
    """Id of the command that caused this one (empty for source commands)."""
    schema_version: int = ENVELOPE_SCHEMA_VERSION
    """Version of the payload schema of this kind."""
    data: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    """Kind-specific payload, decoded later with the kind's own typed decoder (may be absent)."""

    @property
    def payload_bytes(self) -> bytes:
        """The raw payload in the envelope's wire format; empty when there is none."""
        return b"" if isinstance(self.data, msgspec.UnsetType) else bytes(self.data)

    @property
    def entity_kind(self) -> str:
        """The entity kind part of ``kind``."""
        return self.kind.partition(".")[0]

    @property
    def command(self) -> str:
        """The command part of ``kind``."""
        return self.kind.partition(".")[2]

    @property
    def correlation(self) -> str:
        """The correlation id, falling back to the command id."""
        return self.correlation_id or self.id


_json_decoder = msgspec.json.Decoder(Envelope)
_msgpack_decoder = msgspec.msgpack.Decoder(Envelope)
_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()

_WHITESPACE = b" \t\r\n"


def sniff_format(data: bytes) -> WireFormat:
    """Tell JSON from msgpack by the first significant byte; raises DecodeError."""
    offset = len(data) - len(data.lstrip(_WHITESPACE))
    if offset == len(data):
        what = "empty payload" if not data else f"payload is only whitespace ({len(data)} bytes)"
        raise DecodeError(f"{what}: expected a JSON object or a msgpack map")
    first = data[offset]
    if first == 0x7B:  # '{'
        return WireFormat.JSON
    if offset == 0 and (0x80 <= first <= 0x8F or first in (0xDE, 0xDF)):  # fixmap, map16, map32
        return WireFormat.MSGPACK
    raise DecodeError(
        f"payload starts with byte 0x{first:02x} at offset {offset}: "
        "expected a JSON object or a msgpack map"
    )


def decode_envelope(data: bytes) -> tuple[Envelope, WireFormat]:
    """Decode and validate an envelope; raises DecodeError or ContractError naming the problem."""
    fmt = sniff_format(data)
    try:
        env = (
            _json_decoder.decode(data) if fmt is WireFormat.JSON else _msgpack_decoder.decode(data)
        )
    except msgspec.ValidationError as exc:
        raise DecodeError(f"envelope does not match the schema: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed {fmt.value}: {exc}") from exc
    validate_envelope(env)
    return env, fmt


def validate_envelope(env: Envelope) -> None:
    """Check the contract rules msgspec types alone cannot express; raises ContractError."""
    if not env.id.strip():
        raise ContractError("envelope id is empty ($.id)", code="missing_id")
    if len(env.id) > MAX_ID_LENGTH:
        raise ContractError(
            f"envelope id longer than {MAX_ID_LENGTH} characters ($.id)", code="bad_id"
        )
    if not env.entity.strip():
        raise ContractError("envelope entity is empty ($.entity)", code="missing_entity")
    if len(env.entity) > MAX_ID_LENGTH:
        raise ContractError(
            f"entity id longer than {MAX_ID_LENGTH} characters ($.entity)", code="bad_id"
        )
    kind, dot, command = env.kind.partition(".")
    if not kind or not dot or not command:
        raise ContractError(
            f"kind {env.kind!r} is not '<entity kind>.<command>' ($.kind)", code="bad_kind"
        )
    if env.schema_version < 1:
        raise ContractError(
            f"schema_version {env.schema_version} is not a positive integer ($.schema_version)",
            code="bad_version",
        )


def encode_envelope(env: Envelope, fmt: WireFormat = WireFormat.JSON) -> bytes:
    """Serialise an envelope; ``data`` must already be in the same format."""
    if fmt is WireFormat.JSON:
        return _json_encoder.encode(env)
    return _msgpack_encoder.encode(env)


def encode_payload(payload: Any, fmt: WireFormat = WireFormat.JSON) -> msgspec.Raw:
    """Serialise a payload so that it can be placed in ``Envelope.data``."""
    if fmt is WireFormat.JSON:
        return msgspec.Raw(_json_encoder.encode(payload))
    return msgspec.Raw(_msgpack_encoder.encode(payload))


def make_envelope(
    *,
    id: str,
    kind: str,
    entity: str,
    payload: Any = None,
    occurred_at: datetime | None = None,
    source: str = "",
    correlation_id: str = "",
    causation_id: str = "",
    schema_version: int = ENVELOPE_SCHEMA_VERSION,
    fmt: WireFormat = WireFormat.JSON,
) -> Envelope:
    """Build an envelope with its payload encoded in ``fmt`` (``occurred_at`` defaults to now)."""
    return Envelope(
        id=id,
        kind=kind,
        entity=entity,
        occurred_at=occurred_at or datetime.now(UTC),
        source=source,
        correlation_id=correlation_id,
        causation_id=causation_id,
        schema_version=schema_version,
        data=encode_payload(payload, fmt) if payload is not None else msgspec.UNSET,
    )
