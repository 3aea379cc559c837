"""``caresync dlq list|show|retry|drop``: the dead letters, operable.

Dead letters live in the dead-letter stream with their raw bytes and the reason in headers;
these commands read that stream directly (the router need not run for ``list``, ``show`` and
``drop``), and ``retry`` asks the router to re-submit a letter through the normal path, then
waits for the new verdict.
"""

from __future__ import annotations

import argparse
import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NatsClient

from caresync.cli.common import CommandError, Context, connect_client, request_json, resolve_url
from caresync.codecs import Subjects
from caresync.router.service import subjects_for
from caresync.router.verdicts import FINAL, NoRouterAnswer, poll_verdict


@dataclass(frozen=True, slots=True)
class Filters:
    """Which letters a listing shows (all empty: every letter)."""

    source: str = ""
    kind: str = ""
    reason: str = ""
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Filters:
        """From ``--source --kind --reason --since --until``; bad times are a CommandError."""
        return cls(
            source=args.source,
            kind=args.kind,
            reason=args.reason,
            since=_time(args.since, "--since"),
            until=_time(args.until, "--until"),
        )

    def keep(self, letter: dict[str, Any]) -> bool:
        """Whether ``letter`` passes every filter given."""
        source = str(letter["source"])
        if self.source and self.source != letter["format"] and not source.startswith(self.source):
            return False
        if self.kind and not str(letter["kind"]).startswith(self.kind):
            return False
        if self.reason and self.reason != letter["code"] and self.reason not in letter["reason"]:
            return False
        stored = letter.get("_time")
        if self.since is not None and (stored is None or stored < self.since):
            return False
        return not (self.until is not None and (stored is None or stored > self.until))


def _time(text: str, flag: str) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(f"{flag} {text!r} is not an RFC 3339 time") from None
    if value.tzinfo is None:
        raise CommandError(f"{flag} {text!r} has no UTC offset (add Z or +hh:mm)")
    return value


async def _read(nc: NatsClient, subjects: Subjects, seq: int) -> dict[str, Any] | None:
    try:
        msg = await nc.jetstream().get_msg(subjects.dead_letter_stream, seq)
    except nats.js.errors.NotFoundError:
        return None
    headers = {str(k): str(v) for k, v in (msg.headers or {}).items()}
    return letter(msg.seq or seq, msg.subject or "", headers, msg.data or b"", msg.time)


def letter(
    seq: int, subject: str, headers: dict[str, str], data: bytes, stored: datetime | None
) -> dict[str, Any]:
    """A dead letter as the CLI shows it (``raw`` as text, or ``raw_base64`` if not UTF-8)."""
    source = headers.get("Caresync-Subject", "")
    kind = headers.get("Caresync-Kind", "")
    if not kind and ".in." in source:
        kind = source.split(".in.", 1)[1].split(".", 1)[0]
    found: dict[str, Any] = {
        "seq": seq,
        "time": stored.isoformat(timespec="seconds") if stored else "",
        "verdict": "rejected",
        "code": headers.get("Caresync-Reason-Code", subject.rsplit(".", 1)[-1]),
        "reason": headers.get("Caresync-Reason", ""),
        "source": source,
        "format": headers.get("Caresync-Format", "json"),
        "kind": kind,
        "entity": headers.get("Caresync-Entity", ""),
        "input": f"{headers.get('Caresync-Stream', '')}:{headers.get('Caresync-Stream-Seq', '')}",
        "size": len(data),
        "_time": stored,
    }
    try:
        found["raw"] = data.decode()
    except UnicodeDecodeError:
        found["raw_base64"] = base64.b64encode(data).decode()
    return found


def _public(found: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in found.items() if not k.startswith("_")}


async def _stream_state(nc: NatsClient, subjects: Subjects) -> tuple[int, int, int]:
    try:
        info = await nc.jetstream().stream_info(subjects.dead_letter_stream)
    except nats.js.errors.NotFoundError:
        raise CommandError(
            f"no dead-letter stream {subjects.dead_letter_stream}: has a router run here?"
        ) from None
    return info.state.first_seq, info.state.last_seq, info.state.messages


async def run_dlq_list(
    ctx: Context, nats_flag: str | None, limit: int, filters: Filters, as_json: bool
) -> int:
    """The dead letters that pass the filters, oldest first (at most the last ``limit``)."""
    subjects = subjects_for(ctx.config)
    nc = await connect_client(resolve_url(ctx, nats_flag))
    try:
        first, last, count = await _stream_state(nc, subjects)
        shown: list[dict[str, Any]] = []
        seq = last
        while count and seq >= first and len(shown) < limit:
            found = await _read(nc, subjects, seq)
            if found is not None and filters.keep(found):
                shown.append(found)
            seq -= 1
    finally:
        await nc.close()
    shown.reverse()
    for found in shown:
        if as_json:
            print(orjson.dumps(_public(found)).decode())
        else:
            what = " ".join(x for x in (found["kind"], found["entity"]) if x)
            print(
                f"#{found['seq']} {found['time']} {found['code']} {what} "
                f"({found['source']}, {found['size']} bytes): {found['reason']}"
            )
    if not as_json:
        print(f"{len(shown)} dead letter(s) shown, {count} in the stream")
    return 0


async def run_dlq_show(ctx: Context, nats_flag: str | None, seq: int, as_json: bool) -> int:
    """One letter whole: headers, reason, raw bytes."""
    subjects = subjects_for(ctx.config)
    nc = await connect_client(resolve_url(ctx, nats_flag))
    try:
        found = await _read(nc, subjects, seq)
    finally:
        await nc.close()
    if found is None:
        raise CommandError(f"no dead letter #{seq} in {subjects.dead_letter_stream}")
    if as_json:
        print(orjson.dumps(_public(found)).decode())
        return 0
    for key in ("seq", "time", "code", "reason", "kind", "entity", "source", "format", "input"):
        print(f"{key:>7}: {found[key]}")
    print(f"   size: {found['size']} bytes")
    raw = found.get("raw")
    print(raw.replace("\r", "\n") if raw is not None else f"base64: {found['raw_base64']}")
    return 0


async def run_dlq_retry(
    ctx: Context, nats_flag: str | None, seqs: list[int], wait_s: float, as_json: bool
) -> int:
    """Re-submit letters through the normal path; print each new verdict.  A letter whose
    retry is accepted (or a duplicate of what is now applied) leaves the dead-letter stream."""
    subjects = subjects_for(ctx.config)
    nc = await connect_client(resolve_url(ctx, nats_flag))
    failures = 0
    try:
        for seq in seqs:
            line: dict[str, Any] = {"seq": seq}
            sent = await request_json(nc, subjects.control("dlq_retry"), {"seq": seq}, 10.0)
            if "error" in sent:
                line |= {"verdict": "error", "reason": sent["error"]}
            else:
                line |= await _verdict(nc, subjects, sent, wait_s)
                if line["verdict"] in ("accepted", "duplicate"):
                    await nc.jetstream().delete_msg(subjects.dead_letter_stream, seq)
                    line["dropped"] = True
            if line["verdict"] not in ("accepted", "duplicate"):
                failures += 1
            if as_json:
                print(orjson.dumps(line).decode(), flush=True)
            else:
                extra = f": {line['reason']}" if line.get("reason") else ""
                gone = " (removed from dead letters)" if line.get("dropped") else ""
                print(f"#{seq}: {line['verdict']}{extra}{gone}", flush=True)
    finally:
        await nc.close()
    return 1 if failures else 0


async def _verdict(
    nc: NatsClient, subjects: Subjects, sent: dict[str, Any], wait_s: float
) -> dict[str, Any]:
    keys = ("stream", "seq", "raw", "kind", "entity", "id")
    body: dict[str, Any] = {k: sent[k] for k in keys if k in sent}
    try:
        reply, _ = await poll_verdict(
            nc,
            subjects.control("verdict"),
            body,
            wait_s,
            lambda r: r.get("verdict") in FINAL,
            wait_for_router=False,
        )
    except NoRouterAnswer as exc:
        raise CommandError(str(exc)) from None
    if reply is None:
        return {"verdict": "pending", "reason": f"no verdict within {wait_s:g} s"}
    out = {"verdict": reply["verdict"]}
    items = reply.get("items") or []
    problem = next((i for i in items if i.get("reason")), reply)
    if problem.get("reason"):
        out["reason"] = problem["reason"]
    return out


async def run_dlq_drop(ctx: Context, nats_flag: str | None, seqs: list[int]) -> int:
    """Delete letters for good; every seq must exist (nothing is deleted otherwise)."""
    subjects = subjects_for(ctx.config)
    nc = await connect_client(resolve_url(ctx, nats_flag))
    try:
        missing = [s for s in seqs if await _read(nc, subjects, s) is None]
        if missing:
            listed = ", ".join(f"#{s}" for s in missing)
            raise CommandError(f"no such dead letter: {listed}; nothing dropped")
        js = nc.jetstream()
        for seq in seqs:
            try:
                await js.delete_msg(subjects.dead_letter_stream, seq)
            except (nats.js.errors.Error, nats.errors.Error) as exc:
                raise CommandError(f"dropping #{seq} failed: {exc}") from exc
            print(f"#{seq}: dropped")
    finally:
        await nc.close()
    return 0
