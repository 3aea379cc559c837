"""``caresync publish --format hl7|fhir``: raw source messages in, one verdict line each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from caresync.cli.common import CommandError, Context, connect_client, resolve_url
from caresync.router.raw_client import RawSubmitter, RawVerdict
from caresync.router.service import subjects_for


def _hl7_messages(path: Path) -> list[tuple[bytes, str]]:
    """The messages of an HL7 file (MLLP-framed or not, batches unwrapped), with frame errors."""
    from caresync.codecs.hl7v2 import split_messages

    return [(frame.data, frame.error) for frame in split_messages(path.read_bytes())]


def _fhir_documents(path: Path) -> list[tuple[bytes, str]]:
    """One JSON document per file, or one per line (NDJSON, as FHIR bulk data writes it)."""
    raw = path.read_bytes()
    try:
        orjson.loads(raw)
        return [(raw, "")]
    except orjson.JSONDecodeError:
        lines = [ln for ln in raw.splitlines() if ln.strip()]
        if len(lines) > 1 and all(ln.lstrip().startswith(b"{") for ln in lines):
            return [(ln, "") for ln in lines]
    return [(raw, "")]  # the router names what is wrong with it


async def run_publish_raw(
    ctx: Context,
    nats_flag: str | None,
    files: list[str],
    fmt: str,
    as_json: bool,
    wait_s: float,
) -> int:
    """Publish every message of every file in order; one line per message; 1 if any rejected."""
    messages: list[tuple[str, int, bytes, str]] = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise CommandError(f"{name}: no such file")
        found = _hl7_messages(path) if fmt == "hl7" else _fhir_documents(path)
        if not found:
            raise CommandError(f"{name}: no {fmt.upper()} message in the file")
        messages.extend((name, i, data, error) for i, (data, error) in enumerate(found))
    nc = await connect_client(resolve_url(ctx, nats_flag))
    submitter = RawSubmitter(
        nc, subjects_for(ctx.config), wait_s=wait_s, stop_waiting_without_router=True
    )
    failures = 0
    try:
        for name, index, data, frame_error in messages:
            verdict = await submitter.submit(fmt, data, frame_error=frame_error)
            if verdict.verdict not in ("accepted", "duplicate"):
                failures += 1
            _emit(name, index, verdict, as_json)
    finally:
        await nc.close()
    return 1 if failures else 0


def _emit(name: str, index: int, v: RawVerdict, as_json: bool) -> None:
    line: dict[str, Any] = {
        "file": name,
        "index": index,
        "verdict": v.verdict,
        "kind": v.kind,
        "entity": v.entity,
        "reason": v.reason,
    }
    if v.code:
        line["code"] = v.code
    if v.seq:
        line |= {"stream": v.stream, "seq": v.seq}
    if len(v.items) > 1 or (v.items and len(v.items[0].get("commands", [])) > 1):
        line["items"] = v.items
    if as_json:
        print(orjson.dumps(line).decode(), flush=True)
        return
    where = f"{name}#{index}"
    what = " ".join(x for x in (v.kind, v.entity) if x)
    if v.verdict in ("accepted", "duplicate"):
        print(f"{where}: {v.verdict} {what}".rstrip(), flush=True)
    else:
        print(f"{where}: {v.verdict} {what}: {v.reason}".replace("  ", " "), flush=True)
