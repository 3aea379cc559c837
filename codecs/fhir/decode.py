"""The FHIR R4 JSON source codec: one document (a resource, or a Bundle of them) -> commands.

``decode_fhir`` raises ``SourceError`` and nothing else: whatever the bytes, the message is
either commands or a dead letter with a reason.  ``resource_kind`` names, as well as it can,
what a refused message would have been, for the verdict line.
"""

from __future__ import annotations

import orjson

from caresync.codecs.fhir.bundle import map_bundle
from caresync.codecs.fhir.json_checks import parse_document
from caresync.codecs.fhir.rejections import reject
from caresync.codecs.fhir.routes import kind_of_node, map_node, not_routed, resource_type
from caresync.codecs.source import SourceCommand, SourceError

DEFAULT_MAX_BYTES = 1 << 20
_KIND_SCAN_MAX_BYTES = 16 << 20
_BOM = b"\xef\xbb\xbf"


def decode_fhir(raw: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[SourceCommand, ...]:
    """The commands of one FHIR R4 JSON document: an Appointment, ChargeItem, SupplyRequest or
    SupplyDelivery, or a transaction, batch or collection Bundle of them.

    Raises ``SourceError`` (only), with a code (``malformed``, ``bad_value``,
    ``unsupported_resource``, ``unsupported_status``, ``missing_id``, ``too_large``) and a
    reason naming the JSON path or byte offset of the problem.
    """
    try:
        return _decode(raw, max_bytes)
    except SourceError:
        raise
    except RecursionError:
        raise reject("malformed", None, "JSON nested too deeply") from None
    except Exception as exc:  # a bug here must still dead-letter the message, not crash ingest
        raise reject(
            "bad_value", None, f"unexpected decoder failure: {type(exc).__name__}: {exc}"
        ) from exc


def resource_kind(raw: bytes) -> str:
    """Best-effort command kind (``appointment.sync``...) of a document, for the verdict line of
    a refused message; ``""`` when unknown.  Never raises.  For a Bundle: its first routed
    entry's kind."""
    try:
        if len(raw) > _KIND_SCAN_MAX_BYTES:
            return ""
        tree = orjson.loads(raw[len(_BOM) :] if raw.startswith(_BOM) else raw)
        if isinstance(tree, dict) and tree.get("resourceType") == "Bundle":
            entries = tree.get("entry")
            for entry in entries if isinstance(entries, list) else ():
                kind = kind_of_node(entry.get("resource")) if isinstance(entry, dict) else ""
                if kind:
                    return kind
            return ""
        return kind_of_node(tree)
    except Exception:
        return ""


def _decode(raw: bytes, max_bytes: int) -> tuple[SourceCommand, ...]:
    document = parse_document(raw, max_bytes)
    name = resource_type(document.tree, "$")
    if name == "Bundle":
        return map_bundle(document)
    command = map_node(document.tree, document.body, "$", canonical=document.canonical)
    if command is None:
        raise reject("unsupported_resource", None, not_routed(name))
    return (command,)
