"""What a FHIR JSON document must be before any field is read: size, UTF-8, JSON, unique keys.

``parse_document`` parses with orjson (strict RFC 8259: no NaN, no trailing commas, no lone
surrogates, at most 1,024 levels) and re-serialises the tree with sorted keys: that canonical
form is what command ids are digested from, and it also finds duplicate keys cheaply.  orjson,
like msgspec and the stdlib, keeps the last of two equal keys silently; FHIR forbids them and a
second ``"status"`` hidden behind the first is exactly how one message could mean two things.

The duplicate check compares colons: every key is followed by exactly one structural colon,
and a colon inside a string is copied verbatim by orjson (a ``\\u003a`` escape becomes one), so
the raw bytes have more colons than the canonical form exactly when keys were dropped.  When the
counts differ (or an escaped backslash before ``u003a`` blurs them), the stdlib parser confirms
at C speed, and only a document that really repeats a key is parsed once more, marking the
object, to name the key and its JSON path.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import orjson

from caresync.codecs.fhir.rejections import reject, shown

_BOM = b"\xef\xbb\xbf"
_MAX_DEPTH = 254
"""orjson serialises at most 254 levels; no FHIR resource comes close."""


class Document(msgspec.Struct, frozen=True):
    """One parsed JSON document."""

    tree: Any
    """The document as plain Python values (dict, list, str, int, float, bool, None)."""
    body: bytes
    """The raw bytes, without a UTF-8 byte order mark, for typed decoding."""
    canonical: bytes
    """The document re-serialised with sorted keys and no whitespace."""


def parse_document(raw: bytes, max_bytes: int) -> Document:
    """Parse and check one document; raises ``SourceError`` (``too_large``, ``malformed``)."""
    if len(raw) > max_bytes:
        raise reject(
            "too_large", None, f"the document is {len(raw)} bytes, over the limit of {max_bytes}"
        )
    body = raw[len(_BOM) :] if raw.startswith(_BOM) else raw
    skipped = len(raw) - len(body)
    try:
        tree = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _not_json(body, exc, skipped) from None
    try:
        canonical = orjson.dumps(tree, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        raise reject("malformed", "$", f"JSON nested more than {_MAX_DEPTH} levels deep") from None
    escaped_colons = body.count(b"\\u003a") + body.count(b"\\u003A")
    if body.count(b":") + escaped_colons != canonical.count(b":"):
        found = find_duplicate_key(body)
        if found is not None:
            key, path = found
            raise reject("malformed", None, f"duplicate key {shown(key)} at {path}")
    return Document(tree=tree, body=body, canonical=canonical)


def canonical_json(value: Any) -> bytes:
    """``value`` (a node of a checked document) serialised with sorted keys."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _not_json(body: bytes, exc: orjson.JSONDecodeError, skipped: int) -> Exception:
    """The ``malformed`` error for bytes orjson refused, with the byte offset."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as bad:
        byte = body[bad.start : bad.start + 1].hex()
        offset = bad.start + skipped
        return reject("malformed", None, f"not UTF-8: byte 0x{byte} at byte offset {offset}")
    if not text.strip():
        return reject("malformed", None, "not JSON: the document is empty")
    offset = len(text[: exc.pos].encode("utf-8")) + skipped
    return reject(
        "malformed",
        None,
        f"not JSON: {exc.msg} at byte offset {offset} (line {exc.lineno}, column {exc.colno})",
    )


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Repeated(Exception):
    """A key is repeated (raised from the stdlib parser's hook)."""


class _RepeatedKey:
    """Stands in the parsed tree for an object that repeats ``key``."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> None:
    if len({key for key, _ in pairs}) != len(pairs):
        raise _Repeated


def _object_or_repeated(pairs: list[tuple[str, Any]]) -> dict[str, Any] | _RepeatedKey:
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return _RepeatedKey(key)
        seen.add(key)
    raise AssertionError("unreachable: fewer keys than pairs means a repeat")


def _zero(_: str) -> int:
    return 0


def find_duplicate_key(body: bytes) -> tuple[str, str] | None:
    """The first key repeated within one object of a valid JSON document (nested at most 254
    levels), with the JSON path of that object, or None.  Both passes run the stdlib's C parser
    (numbers are not needed); only a document with a repeated key gets the second, which marks
    the object, and a walk to name its path."""
    try:
        json.loads(body, object_pairs_hook=_unique_keys, parse_int=_zero, parse_float=_zero)
    except _Repeated:
        pass
    else:
        return None
    tree = json.loads(
        body, object_pairs_hook=_object_or_repeated, parse_int=_zero, parse_float=_zero
    )
    stack: list[tuple[Any, str]] = [(tree, "$")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _RepeatedKey):
            return node.key, path
        if isinstance(node, dict):
            stack.extend((v, _member_path(path, k)) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(node))))
    return None


def _member_path(path: str, key: str) -> str:
    if _NAME.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{orjson.dumps(key).decode()}]"
