"""``caresync parked list|release`` and ``caresync retry-failed``: what waits for an operator."""

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


async def run_retry_failed(ctx: Context, nats_flag: str | None, system: str, as_json: bool) -> int:
    """Send the failed effects (of one system) again; exit 1 if there was none or one could
    not be sent."""
    subjects = subjects_for(ctx.config)
    nc = await connect_client(resolve_url(ctx, nats_flag))
    try:
        reply = await request_json(nc, subjects.control("retry_failed"), {"system": system}, 60.0)
    finally:
        await nc.close()
    if "error" in reply:
        raise CommandError(reply["error"])
    sent, not_sent = reply["sent"], reply["not_sent"]
    if as_json:
        print(orjson.dumps(reply).decode())
    else:
        for effect in sent:
            print(
                f"sent again: {effect['system']} {effect['operation']} {effect['key']} "
                f"(it failed with: {effect['last_error']})"
            )
        for effect in not_sent:
            print(f"not sent: {effect['system']} {effect['key']}: {effect['reason']}")
    if not sent and not not_sent:
        where = f" for {system}" if system else ""
        raise CommandError(f"no failed effects{where}: nothing to retry")
    return 1 if not_sent else 0
