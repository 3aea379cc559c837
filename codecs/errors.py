"""Errors raised while turning bytes and subjects into canonical messages.

::

    CodecError                 input that cannot become a command (terminal: dead-letter it)
    ├── SubjectError           the subject is not a valid caresync subject
    ├── DecodeError            the bytes are not a well-formed envelope (JSON/msgpack/type error)
    └── ContractError          the envelope decodes but breaks the contract (ids, versions, kinds)

Every error carries a short machine-readable ``code`` (used in dead-letter subjects and
metrics) and a human ``reason`` that names the problem (field, JSON path or byte offset).
"""

from __future__ import annotations


class CodecError(Exception):
    """Raised when an input cannot be turned into a command; the message is dead-lettered."""

    code = "invalid"

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code


class SubjectError(CodecError):
    """Raised when a subject does not follow the caresync subject taxonomy."""

    code = "bad_subject"


class DecodeError(CodecError):
    """Raised when the payload is not valid JSON/msgpack or does not match the envelope schema."""

    code = "undecodable"


class ContractError(CodecError):
    """Raised when a decoded envelope breaks the contract (missing id, unknown kind, version)."""

    code = "contract"
