"""Errors raised while turning bytes and subjects into canonical messages.

::

    CodecError                 input that cannot become a command (terminal: dead-letter it)
    ├── SubjectError           the subject is not a valid caresync subject
    ├── DecodeError            the bytes are not a well-formed envelope (JSON/msgpack/type error)
    ├── ContractError          the envelope decodes but breaks the contract (ids, versions, kinds)
    └── RefDataError           a reference-data set has bad rows (carries every problem found)

Every error carries a short machine-readable ``code`` (used in dead-letter subjects and
metrics) and a human ``reason`` that names the problem (field, JSON path or byte offset).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from caresync.codecs.refdata_csv import RowProblem


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


class RefDataError(CodecError):
    """Raised when a reference-data set has bad rows or files; ``problems`` lists them all.

    ``str()`` of the error is one problem per line.  A set with any problem is loaded not at all.
    """

    code = "bad_refdata"

    def __init__(self, problems: Sequence[RowProblem]) -> None:
        self.problems: list[RowProblem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems) or "bad reference data")
