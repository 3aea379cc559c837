"""From an input message to a typed command: subject, envelope, kind, version, payload."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from typing import Any

import msgspec

from caresync.actors.contract import Command, EntityKind, Registry
from caresync.codecs import (
    CodecError,
    ContractError,
    DecodeError,
    Envelope,
    Subjects,
    WireFormat,
    decode_envelope,
    validate_envelope,
)
from caresync.router.transport import Inbound


class Prepared(msgspec.Struct, frozen=True, gc=False):
    """An input that decoded into a command for a known entity kind."""

    message: Inbound
    kind: EntityKind[Any, Any]
    envelope: Envelope
    command: Command[Any]

    @property
    def key(self) -> tuple[str, str]:
        """(kind, entity id): the actor this command goes to."""
        return (self.kind.name, self.command.entity)


class CommandDecoder:
    """Turns input messages into commands; typed decoders are built once per command type."""

    def __init__(
        self,
        registry: Registry,
        subjects: Subjects,
        refdata: Callable[[int], Any] | None = None,
    ) -> None:
        self._registry = registry
        self._subjects = subjects
        # The reference data in force when a message entered the log (by its stream
        # timestamp), so that a replay decides with the same data as the live run.
        self._refdata = refdata
        self._json: dict[tuple[str, str], msgspec.json.Decoder[Any]] = {}
        self._msgpack: dict[tuple[str, str], msgspec.msgpack.Decoder[Any]] = {}
        for kind in registry.kinds.values():
            for name, payload_type in kind.commands.items():
                self._json[(kind.name, name)] = msgspec.json.Decoder(payload_type)
                self._msgpack[(kind.name, name)] = msgspec.msgpack.Decoder(payload_type)

    def prepare(self, message: Inbound) -> Prepared:
        """Decode and validate; raises a CodecError subclass naming the problem."""
        address = self._subjects.parse_address(message.subject)
        env, fmt = decode_envelope(message.data)
        kind = self._registry.get(address.kind)
        if kind is None:
            raise ContractError(
                f"unknown entity kind {address.kind!r} in subject {message.subject!r}",
                code="unknown_kind",
            )
        if env.entity_kind != address.kind:
            raise ContractError(
                f"$.kind {env.kind!r} is for entity kind {env.entity_kind!r}, "
                f"but the subject addresses {address.kind!r}",
                code="kind_mismatch",
            )
        if env.entity != address.entity:
            raise ContractError(
                f"$.entity {env.entity!r} does not match the subject's entity {address.entity!r}",
                code="entity_mismatch",
            )
        return self._prepared(message, kind, env, fmt)

    def prepare_local(self, message: Inbound, kind_name: str, env: Envelope) -> Prepared:
        """What :meth:`prepare` makes of ``message``, the record of a command this partition
        sends itself, from ``env``, the envelope it was just encoded from: the payload is
        decoded from its bytes as from the stream, without decoding the envelope again.

        ``occurred_at`` comes out in UTC (fold 0), as msgpack carries it.  Raises a CodecError
        wherever :meth:`prepare` would (tests/test_local_prepare.py); the caller then sends the
        command through the stream, where :meth:`prepare` names the problem."""
        validate_envelope(env)
        kind = self._registry.get(kind_name)
        if kind is None or env.entity_kind != kind_name:
            raise ContractError(f"unknown entity kind {kind_name!r}", code="unknown_kind")
        at = env.occurred_at
        if at.tzinfo is not UTC or at.fold:
            env = msgspec.structs.replace(env, occurred_at=at.astimezone(UTC).replace(fold=0))
        return self._prepared(message, kind, env, WireFormat.MSGPACK)

    def _prepared(
        self, message: Inbound, kind: EntityKind[Any, Any], env: Envelope, fmt: WireFormat
    ) -> Prepared:
        """The command ``env`` carries for ``kind`` (the address already checked)."""
        if env.command not in kind.commands:
            known = ", ".join(sorted(kind.commands))
            raise ContractError(
                f"unknown command {env.kind!r} ($.kind); {kind.name} accepts: {known}",
                code="unknown_command",
            )
        if env.schema_version > kind.schema_version:
            raise ContractError(
                f"$.schema_version {env.schema_version} of {env.kind!r} is newer than the "
                f"version this router understands ({kind.schema_version})",
                code="unsupported_version",
            )
        command = Command(
            id=env.id,
            name=env.command,
            entity=env.entity,
            occurred_at=env.occurred_at,
            payload=self._payload(kind.name, env, fmt),
            correlation_id=env.correlation,
            causation_id=env.causation_id,
            source=env.source,
            refdata=self._refdata(message.timestamp_ns) if self._refdata is not None else None,
        )
        return Prepared(message, kind, env, command)

    def _payload(self, kind: str, env: Envelope, fmt: WireFormat) -> Any:
        raw = env.payload_bytes
        key = (kind, env.command)
        try:
            if not raw:
                return msgspec.convert({}, self._json[key].type)
            if fmt is WireFormat.JSON:
                return self._json[key].decode(raw)
            return self._msgpack[key].decode(raw)
        except msgspec.ValidationError as exc:
            raise DecodeError(f"payload of {env.kind!r}: {_data_path(exc)}") from exc
        except msgspec.DecodeError as exc:
            raise DecodeError(f"payload of {env.kind!r} is malformed: {exc}") from exc


def _data_path(exc: msgspec.ValidationError) -> str:
    # msgspec reports paths from the payload's root ("$.items[0]"); the payload is $.data.
    return str(exc).replace("`$", "`$.data", 1)


__all__ = ["CodecError", "CommandDecoder", "Prepared"]
