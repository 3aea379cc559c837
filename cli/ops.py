"""``caresync health``, ``status`` and ``publish``: the CLI as a NATS client of the router."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import orjson

from caresync.cli.common import (
    CommandError,
    Context,
    connect_client,
    print_json,
    request_json,
    resolve_url,
)
from caresync.codecs import CodecError, Envelope, decode_envelope, encode_envelope
from caresync.router.service import subjects_for
from caresync.router.snapshots import Snapshots
from caresync.router.verdicts import NoRouterAnswer, poll_verdict


async def run_health(ctx: Context, nats_flag: str | None, timeout_s: float, as_json: bool) -> int:
    """Exit 0 when the router answers ready, 1 otherwise, saying why."""
    try:
        url = resolve_url(ctx, nats_flag)
        nc = await connect_client(url, timeout_s)
        try:
            subject = subjects_for(ctx.config).control("health")
            health = await request_json(nc, subject, {}, timeout_s)
        finally:
            await nc.close()
    except CommandError as exc:
        if as_json:
            print_json({"ready": False, "reason": str(exc)})
        else:
            print(f"not ready: {exc}")
        return 1
    if as_json:
        print_json({**health, "url": url})
    elif health.get("ready"):
        parts = health.get("partitions", [])
        live = sum(p.get("live_actors", 0) for p in parts)
        seqs = ", ".join(f"{p['stream']}@{p['last_seq']}" for p in parts)
        procs = len(health.get("processes", [])) or 1
        print(
            f"ready: router at {url}, {procs} process(es), {len(parts)} partition(s) [{seqs}], "
            f"{live} live actors"
        )
    else:
        down = [f"process {p['group']}" for p in health.get("processes", []) if not p.get("ready")]
        why = f" ({', '.join(down)} not ready)" if down else ""
        print(f"not ready: the router at {url} is starting or stopping{why}")
    return 0 if health.get("ready") else 1


async def run_status(
    ctx: Context, nats_flag: str | None, kind: str | None, entity: str | None, as_json: bool
) -> int:
    """Print the router summary, or one entity's committed state."""
    url = resolve_url(ctx, nats_flag)
    nc = await connect_client(url)
    try:
        subjects = subjects_for(ctx.config)
        body = {"kind": kind or "", "id": entity or ""}
        reply = await request_json(nc, subjects.control("status"), body, 5.0)
        if not kind and "error" not in reply:
            files = [[stream] for stream in subjects.input_streams()]
            reply["snapshots"] = await Snapshots(nc.jetstream(), subjects).listing(files)
    finally:
        await nc.close()
    if "error" in reply:
        raise CommandError(reply["error"])
    if kind and not reply.get("found", False):
        if as_json:
            print_json(reply)
        else:
            print(f"no {kind} {entity!r} is known to the router")
        return 1
    view = reply.get("view") if kind else None
    if as_json:
        print_json(
            {**view, "parked": reply["parked"], "parked_messages": reply["parked_messages"]}
            if view is not None
            else reply
        )
    elif view is not None and kind == "appointment":
        _print_appointment(view)
    elif view is not None:
        _print_item(view)
    elif kind:
        print_json(reply)
    else:
        _print_summary(reply)
    return 0


def _print_appointment(v: dict[str, Any]) -> None:
    print(
        f"appointment {v['id']}: {v['status']}, {', '.join(v['procedures'])} at "
        f"{v['facility']} {v['room']} {v['start']}"
    )
    if v["missing_preference_cards"]:
        print(f"  no preference card for: {', '.join(v['missing_preference_cards'])}")
    b = v["billing"]
    print(
        f"  billing: {b['readiness'] or '-'}, {len(b['charges'])} charge line(s), "
        f"total {b['total']}{', claim ' + b['claim_status'] if b['claim_status'] else ''}"
    )
    reserved = ", ".join(f"{r['item_id']} x{r['quantity']}" for r in v["supply"]["reservations"])
    print(f"  supply: reserved {reserved or 'nothing'}")
    print(f"  erp: {len(v['erp']['demand'])} demand line(s)")
    for system, sync in v["sync"].items():
        error = f" ({sync['last_error']})" if sync["last_error"] else ""
        print(f"  sync {system}: {sync['state']}{error}")


def _print_item(v: dict[str, Any]) -> None:
    print(
        f"item {v['item_id']} at {v['facility_id']}: on hand {v['on_hand']}, reserved "
        f"{v['reserved']}, on order {v['on_order']}, available {v['available']} "
        f"(reorder point {v['reorder_point']}); purchase orders: "
        f"{', '.join(v['purchase_orders']) or 'none'}"
    )


def _print_summary(reply: dict[str, Any]) -> None:
    health, counts = reply["health"], reply["counts"]
    print(f"router: {'ready' if health['ready'] else 'not ready'}")
    for p in health["partitions"]:
        print(
            f"  {p['stream']}: last seq {p['last_seq']}, accepted {p['accepted']}, "
            f"duplicates {p['duplicates']}, rejected {p['rejected']}, "
            f"dead letters {p['dead_lettered']}, parked {p['parked']}, "
            f"live actors {p['live_actors']}"
        )
    print(
        f"store: {counts['entities']} entities ({counts['parked_entities']} parked), "
        f"outbox {counts['outbox_sent']} sent / {counts['outbox_pending']} pending / "
        f"{counts['outbox_failed']} failed"
    )
    for snap in reply.get("snapshots", []):
        streams = ", ".join(snap["streams"])
        if snap["taken"]:
            print(
                f"snapshot {streams}: {snap['description']}, {snap['bytes'] / 1e6:,.1f} MB, "
                f"taken {snap['taken_at']}"
            )
        else:
            print(f"snapshot {streams}: none yet (a rebuild folds from the start)")


def _documents(path: Path) -> Iterator[tuple[int, bytes]]:
    """JSON documents of a file: one object, an array of objects, or JSON lines."""
    raw = path.read_bytes()
    stripped = raw.strip()
    if stripped.startswith(b"["):
        try:
            items = orjson.loads(stripped)
        except orjson.JSONDecodeError as exc:
            yield 0, raw  # let the envelope decoder report it
            del exc
            return
        for i, item in enumerate(items):
            yield i, orjson.dumps(item)
        return
    try:
        orjson.loads(stripped)
        yield 0, stripped
        return
    except orjson.JSONDecodeError:
        pass
    for i, line in enumerate(ln for ln in raw.splitlines() if ln.strip()):
        yield i, line


def build_envelope(kind: str, entity: str, data: str | None, command_id: str | None) -> bytes:
    """A canonical JSON envelope from command-line parts."""
    try:
        payload = orjson.loads(data) if data else None
    except orjson.JSONDecodeError as exc:
        raise CommandError(f"--data is not valid JSON: {exc}") from exc
    doc: dict[str, Any] = {
        "id": command_id or str(uuid.uuid4()),
        "kind": kind,
        "entity": entity,
        "occurred_at": datetime.now(UTC).isoformat(),
        "source": "caresync-cli",
    }
    if payload is not None:
        doc["data"] = payload
    return orjson.dumps(doc)


async def run_publish(
    ctx: Context,
    nats_flag: str | None,
    files: list[str],
    inline: bytes | None,
    as_json: bool,
    wait_s: float = 10.0,
) -> int:
    """Publish canonical envelopes to their input subjects and wait for each verdict.

    One line per message; exit status 1 when anything was rejected (or could not be sent).
    ``wait_s`` 0 publishes without waiting for the router's verdict.
    """
    subjects = subjects_for(ctx.config)
    items: list[tuple[str, int, bytes]] = []
    if inline is not None:
        items.append(("<command line>", 0, inline))
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise CommandError(f"{name}: no such file")
        items.extend((name, i, doc) for i, doc in _documents(path))
    url = resolve_url(ctx, nats_flag)
    nc = await connect_client(url)
    js = nc.jetstream()
    failures = 0
    try:
        for source, index, data in items:
            line: dict[str, Any] = {"file": source, "index": index}
            try:
                env, _ = decode_envelope(data)
            except CodecError as exc:
                failures += 1
                line |= {"verdict": "rejected", "reason": exc.reason}
                _emit(line, as_json)
                continue
            line |= await _publish_one(js, subjects.command(env.entity_kind, env.entity), env, data)
            if line["verdict"] == "published" and wait_s > 0:
                line |= await _await_verdict(nc, subjects.control("verdict"), env, line, wait_s)
            if line["verdict"] in ("failed", "rejected"):
                failures += 1
            _emit(line, as_json)
    finally:
        await nc.close()
    return 1 if failures else 0


async def _publish_one(js: Any, subject: str, env: Envelope, data: bytes) -> dict[str, Any]:
    base = {"kind": env.kind, "entity": env.entity, "id": env.id}
    try:
        ack = await js.publish(subject, data, timeout=5.0, headers={"Nats-Msg-Id": env.id})
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        return base | {"verdict": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    verdict = "duplicate" if ack.duplicate else "published"
    return base | {"verdict": verdict, "stream": ack.stream, "seq": ack.seq}


async def _await_verdict(
    nc: Any, subject: str, env: Envelope, line: dict[str, Any], wait_s: float
) -> dict[str, Any]:
    """Ask the router what became of the message until it has decided, or ``wait_s`` passes."""
    body = {
        "stream": line["stream"],
        "seq": line["seq"],
        "kind": env.entity_kind,
        "entity": env.entity,
        "id": env.id,
    }
    try:
        reply, _ = await poll_verdict(
            nc,
            subject,
            body,
            wait_s,
            lambda r: r.get("verdict") != "pending",
            wait_for_router=False,
        )
    except NoRouterAnswer as exc:
        raise CommandError(str(exc)) from None
    if reply is None:
        return {"verdict": "pending", "reason": f"no verdict from the router within {wait_s:g} s"}
    return {k: v for k, v in reply.items() if k in ("verdict", "reason", "code")}


def _emit(line: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(line).decode(), flush=True)
        return
    where = f"{line['file']}#{line['index']}"
    if line["verdict"] in ("published", "accepted", "duplicate"):
        print(
            f"{where}: {line['verdict']} {line['kind']} {line['entity']} "
            f"(id {line['id']}, {line['stream']} seq {line['seq']})"
        )
    else:
        print(f"{where}: {line['verdict']}: {line['reason']}")


__all__ = ["build_envelope", "encode_envelope", "run_health", "run_publish", "run_status"]


async def run_report(ctx: Context, nats_flag: str | None, as_json: bool) -> int:
    """Totals from the router, and each simulator's own counts when simulators answer."""
    url = resolve_url(ctx, nats_flag)
    nc = await connect_client(url)
    try:
        report = await request_json(nc, subjects_for(ctx.config).control("report"), {}, 10.0)
        try:
            report["simulators"] = await request_json(nc, "sim.control.report", {}, 3.0)
        except CommandError:
            report["simulators"] = None  # real downstream systems: they keep their own counts
    finally:
        await nc.close()
    if "error" in report:
        raise CommandError(report["error"])
    if as_json:
        print_json(report)
        return 0
    a = report["appointments"]
    print(
        f"appointments: {a['total']} ({', '.join(f'{k} {v}' for k, v in a['by_status'].items())})"
    )
    print(
        f"  billing readiness: {a['by_readiness']}; without a preference card: "
        f"{a['without_preference_card']}"
    )
    print(
        f"reservations: {report['reservations']['lines']} lines, "
        f"{report['reservations']['units']} units; demand lines: {report['demand_lines']}"
    )
    print(f"charges: {report['charges']['lines']} lines, total {report['charges']['total']}")
    print(
        f"purchase orders: {report['purchase_orders']}; postings: "
        f"{report['postings']['count']} ({report['postings']['amount']})"
    )
    for system, sync in report["sync"].items():
        print(f"sync {system}: {sync}")
    print(f"parked: {report['parked']}; dead letters: {report['dead_letters']}")
    if report["simulators"] is not None:
        print(f"simulators: {report['simulators']}")
    return 0
