"""Wire contracts: the canonical envelope, its codecs and the subject taxonomy."""

from __future__ import annotations

from caresync.codecs.envelope import (
    ENVELOPE_SCHEMA_VERSION,
    Envelope,
    WireFormat,
    decode_envelope,
    encode_envelope,
    encode_payload,
    make_envelope,
    sniff_format,
    validate_envelope,
)
from caresync.codecs.errors import (
    CodecError,
    ContractError,
    DecodeError,
    RefDataError,
    SubjectError,
)
from caresync.codecs.subjects import EntityAddress, Subjects, decode_token, encode_token

__all__ = [
    "ENVELOPE_SCHEMA_VERSION",
    "CodecError",
    "ContractError",
    "DecodeError",
    "EntityAddress",
    "Envelope",
    "RefDataError",
    "SubjectError",
    "Subjects",
    "WireFormat",
    "decode_envelope",
    "decode_token",
    "encode_envelope",
    "encode_payload",
    "encode_token",
    "make_envelope",
    "sniff_format",
    "validate_envelope",
]
