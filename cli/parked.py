"""``caresync parked list|release``: entities held back by a failing message."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from caresync.cli.common import CommandError, Context, connect_client, request_json, resolve_url
from caresync.router.service import subjects_for


async def run_parked_list(ctx: Context, nats_flag: str | None, as_json: bool) -> int:
    """Every parked message, by entity, in the order a release re-runs them."""
    subjects = subjects_for(ctx.config)
    nc = await connect_client(resolve_url(ctx, nats_flag))
    try:
        reply = await request_json(nc, subjects.control("parked"), {}, 5.0)
    finally:
        await nc.close()
    rows: list[dict[str, Any]] = reply.get("parked", [])
    if as_json:
        for row in rows:
            print(orjson.dumps(row).decode())
        return 0
    for row in rows:
        when = datetime.fromtimestamp(row["parked_at"], UTC).isoformat(timespec="seconds")
        print(
            f"{row['kind']} {row['id']}: seq {row['seq']} ({row['command_id']}), parked {when}, "
            f"{row['failures']} failure(s): {row['reason']}"
        )
    entities = {(r["kind"], r["id"]) for r in rows}
    print(f"{len(rows)} parked message(s) on {len(entities)} entity(ies)")
    return 0


async def run_parked_release(
    ctx: Context, nats_flag: str | None, kind: str, entity: str, as_json: bool
) -> int:
    """Re-run the entity's parked message and those behind it, in order; exit 1 if it parks
    again or was not parked."""
    subjects = subjects_for(ctx.config)
    nc = await connect_client(resolve_url(ctx, nats_flag))
    try:
        reply = await request_json(
            nc, subjects.control("release"), {"kind": kind, "id": entity}, 60.0
        )
    finally:
        await nc.close()
    if "error" in reply:
        raise CommandError(reply["error"])
    if as_json:
        print(orjson.dumps(reply).decode())
    else:
        for m in reply["messages"]:
            reason = f": {m['reason']}" if m.get("reason") else ""
            print(f"seq {m['seq']}: {m['outcome']}{reason}")
        state = "still parked" if reply["parked"] else "released"
        print(f"{kind} {entity}: {state}")
    return 1 if reply["parked"] else 0
