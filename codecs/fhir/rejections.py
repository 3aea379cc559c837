"""How the FHIR codec says no: ``SourceError`` with a code and a reason that starts with the JSON
path of the problem, in one line a person can read in a dead-letter header.

Codes:

- ``too_large``: the document is over ``max_bytes``.
- ``malformed``: not UTF-8, not JSON, nested too deeply, or a key repeated in one object.
- ``bad_value``: valid JSON that breaks the FHIR schema or a caresync rule (a type, an unknown
  status code, end before start, a quantity that is not a positive integer, no price...).
- ``unsupported_resource``: a resource type (or Bundle type) caresync does not route.
- ``unsupported_status``: a known FHIR status that caresync does not route.
- ``missing_id``: the entity or line a command is for cannot be named from the resource.
"""

from __future__ import annotations

import msgspec

from caresync.codecs.source import SourceError

MAX_REASON_CHARS = 1000
"""Dead-letter reasons travel in a NATS header limited to 1 KiB."""

_SHOWN_CHARS = 80


def reject(
    code: str, path: str | None, message: str, *, kind: str = "", entity: str = ""
) -> SourceError:
    """A ``SourceError`` whose reason is ``<path>: <message>`` (or the message alone)."""
    reason = f"{path}: {message}" if path is not None else message
    return SourceError(_one_line(reason), code=code, kind=kind, entity=entity)


def from_validation(
    exc: msgspec.ValidationError, base: str, *, kind: str = "", entity: str = ""
) -> SourceError:
    """msgspec's ``<message> - at `$.a.b``` as ``bad_value`` ``<base>.a.b: <message>``."""
    message, _, where = str(exc).rpartition(" - at `")
    if not message:
        message, where = str(exc), "$`"
    path = base + where[1:].removesuffix("`")
    return reject("bad_value", path, message, kind=kind, entity=entity)


def shown(value: object) -> str:
    """A value quoted for a reason: one line, escaped, at most 80 characters of it."""
    text = str(value)
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return repr(text[:_SHOWN_CHARS]) + "..."


def _one_line(reason: str) -> str:
    if not reason.isprintable():
        reason = "".join(c if c.isprintable() else repr(c)[1:-1] for c in reason)
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    return reason
