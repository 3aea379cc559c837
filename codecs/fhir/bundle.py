"""FHIR R4 ``Bundle`` (transaction, batch, collection) -> the commands of its entries, in order.

A transaction is all or nothing, and so is every Bundle here: one rejected entry rejects the
whole Bundle, with that entry's reason (paths start ``$.entry[i].resource``).  Entries of types
caresync does not route (the Patient a transaction creates along with an Appointment) are
skipped, as are entries without a resource (DELETE, GET); a Bundle with nothing routed is
``unsupported_resource``.  Bundles nested in a Bundle are not routed.
"""

from __future__ import annotations

import msgspec

from caresync.codecs.fhir.json_checks import Document
from caresync.codecs.fhir.model import Bundle
from caresync.codecs.fhir.rejections import from_validation, reject, shown
from caresync.codecs.fhir.routes import WHAT_IS_ROUTED, map_node, resource_type
from caresync.codecs.source import SourceCommand

ROUTED_TYPES = ("transaction", "batch", "collection")
_DECODER = msgspec.json.Decoder(Bundle)


def map_bundle(document: Document) -> tuple[SourceCommand, ...]:
    """The commands of a Bundle's routed entries, or the reason it is refused."""
    try:
        bundle = _DECODER.decode(document.body)
    except msgspec.ValidationError as exc:
        raise from_validation(exc, "$") from None
    if bundle.type not in ROUTED_TYPES:
        raise reject(
            "unsupported_resource",
            "$.type",
            f"Bundle type {shown(bundle.type)} is not routed: caresync maps "
            f"{', '.join(ROUTED_TYPES)} Bundles",
        )
    if not bundle.entry:
        raise reject("bad_value", "$.entry", "the Bundle has no entries")
    fallback_at = bundle.meta.last_updated if bundle.meta is not None else None
    entries = document.tree["entry"]
    commands: list[SourceCommand] = []
    skipped: list[str] = []
    for index, entry in enumerate(bundle.entry):
        if not entry.resource:
            continue
        path = f"$.entry[{index}].resource"
        node = entries[index]["resource"]
        name = resource_type(node, path)
        command = map_node(node, bytes(entry.resource), path, fallback_at=fallback_at)
        if command is None:
            skipped.append(name)
        else:
            commands.append(command)
    if not commands:
        found = ", ".join(dict.fromkeys(shown(name) for name in skipped)) or "none"
        raise reject(
            "unsupported_resource",
            "$.entry",
            f"no routed resource in the Bundle (resource types: {found}): {WHAT_IS_ROUTED}",
        )
    return tuple(commands)
