"""Control requests over NATS: ``<prefix>.ctl.health`` and ``<prefix>.ctl.status``.

Request/reply, JSON both ways, served by the router itself so that the CLI works the same
against the embedded broker and a remote cluster.  Replies are never stored in a stream.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from caresync.actors.contract import Registry
from caresync.codecs import Subjects
from caresync.router.dead_letters import retry_dead_letter
from caresync.router.processes import FORWARD_TIMEOUT_S, ProcessGroup
from caresync.router.report import build_report
from caresync.router.retry_failed import retry_failed
from caresync.router.runtime import Router
from caresync.router.views import appointment_view, item_view
from caresync.store import ParkedRow, PartitionedStore

log = structlog.get_logger("caresync.control")


class StatusRequest(msgspec.Struct, kw_only=True, frozen=True):
    """Body of a status request; both empty asks for the router summary."""

    kind: str = ""
    id: str = ""


_status_decoder = msgspec.json.Decoder(StatusRequest)


class VerdictRequest(msgspec.Struct, kw_only=True, frozen=True):
    """Which published message a publisher asks about: where it was stored, and its command."""

    stream: str
    seq: int
    kind: str = ""
    entity: str = ""
    id: str = ""
    raw: bool = False
    """The message is a raw source message (HL7 v2, FHIR) on the raw stream."""


_verdict_decoder = msgspec.json.Decoder(VerdictRequest)


class ControlResponder:
    """Answers control requests for one router."""

    def __init__(
        self,
        nc: NatsClient,
        router: Router,
        store: PartitionedStore,
        registry: Registry,
        subjects: Subjects,
        *,
        group: int = 0,
        processes: ProcessGroup | None = None,
    ):
        """``group`` 0 answers the shared control subjects (one responder of the queue group
        per deployment); another process of a multi-process router answers only its own
        (:meth:`Subjects.group_control`).  ``processes``: the other processes, whose health is
        merged into this one's and to which releases of their partitions are forwarded."""
        self._group = group
        self._processes = processes
        self._nc = nc
        self._router = router
        self._store = store
        self._registry = registry
        self._subjects = subjects
        self._state_decoders = {
            name: msgspec.msgpack.Decoder(kind.state_type) for name, kind in registry.kinds.items()
        }

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled."""
        if self._group == 0:
            sub = await self._nc.subscribe(self._subjects.control("*"), queue="caresync-router")
        else:
            sub = await self._nc.subscribe(self._subjects.group_control(self._group, "*"))
        task_status.started()
        try:
            async for msg in sub.messages:
                try:
                    reply = await self._handle(msg)
                except Exception as exc:  # a bad request must never take the router down
                    log.warning("control_request_failed", subject=msg.subject, error=str(exc))
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                if msg.reply:
                    await msg.respond(orjson.dumps(reply))
        finally:
            with anyio.CancelScope(shield=True):
                if not self._nc.is_closed:
                    await sub.unsubscribe()

    async def _handle(self, msg: Msg) -> dict[str, Any]:
        op = msg.subject.rsplit(".", 1)[-1]
        if op == "health":
            return await self.health()
        if op == "status":
            req = _status_decoder.decode(msg.data) if msg.data.strip() else StatusRequest()
            if not req.kind:
                return {"health": await self.health(), "counts": await self._store.counts()}
            return await self.entity_status(req.kind, req.id)
        if op == "verdict":
            return await self.verdict(_verdict_decoder.decode(msg.data))
        if op == "dlq_retry":
            body = orjson.loads(msg.data)
            return await retry_dead_letter(self._nc, self._subjects, int(body["seq"]))
        if op == "retry_failed":
            body = orjson.loads(msg.data) if msg.data.strip() else {}
            return await retry_failed(self._nc, self._store, self._subjects, body.get("system", ""))
        if op == "parked":
            return {"parked": [_parked_row(p) for p in await self._store.parked()]}
        if op == "release":
            req = _status_decoder.decode(msg.data)
            return await self.release(req.kind, req.id, msg.data)
        if op == "report":
            report = await build_report(self._store)
            report["dead_letters"] = await self._dead_letters()
            return report
        return {
            "error": f"unknown control operation {op!r}; known: health, status, verdict, "
            "parked, release, report"
        }

    async def health(self) -> dict[str, Any]:
        """This router's health; with several processes, all of theirs merged."""
        own = self._router.health()
        if self._processes is None:
            return own
        return await self._processes.health(own)

    async def release(self, kind: str, entity: str, body: bytes) -> dict[str, Any]:
        """Release a parked entity here, or in the process that runs its partition."""
        if self._processes is not None:
            parked = await self._store.parked(kind, entity)
            group = self._processes.owner(parked[0].stream) if parked else 0
            if group:
                return await self._processes.request(group, "release", body, FORWARD_TIMEOUT_S)
        return await self._router.release(kind, entity)

    async def raw_verdict(self, req: VerdictRequest) -> dict[str, Any]:
        """What became of one raw message: one item per message inside it (an HL7 batch holds
        several), each with the verdicts of the commands it became; ``pending`` until all are
        decided."""
        if await self._store.offset(req.stream) < req.seq:
            return {"verdict": "pending"}
        items: list[dict[str, Any]] = []
        for row in await self._store.ingest.rows(req.stream, req.seq):
            item: dict[str, Any] = {"index": row.idx, "kind": row.kind, "entity": row.entity}
            if row.outcome == "rejected":
                items.append(item | {"verdict": "rejected", "reason": row.reason, "code": row.code})
                continue
            commands = []
            for c in row.commands:
                if c.failed:
                    found = {"verdict": "rejected", "reason": c.failed, "code": "not_stored"}
                elif c.duplicate:
                    found = {"verdict": "duplicate"}
                else:
                    entity_kind = c.kind.partition(".")[0]
                    found = await self.verdict(
                        VerdictRequest(
                            stream=c.stream, seq=c.seq, kind=entity_kind, entity=c.entity, id=c.id
                        )
                    )
                if found.get("verdict") == "pending":
                    return {"verdict": "pending"}
                commands.append({"kind": c.kind, "entity": c.entity, "id": c.id} | found)
            item |= {"verdict": _combined(commands), "commands": commands}
            problem = next((c for c in commands if c.get("reason")), None)
            if problem is not None:
                item |= {"reason": problem["reason"], "code": problem.get("code", "")}
            items.append(item)
        if not items:  # committed before this router recorded raw messages
            return {"verdict": "unknown", "items": []}
        return {"verdict": _combined(items), "items": items}

    async def verdict(self, req: VerdictRequest) -> dict[str, Any]:
        """What became of one stored message: pending, accepted, duplicate, rejected, parked."""
        if req.raw:
            return await self.raw_verdict(req)
        if await self._store.offset(req.stream) < req.seq:
            return {"verdict": "pending"}
        letter = await self._store.outbox_headers(f"dlq:{req.stream}:{req.seq}")
        if req.kind and req.id:
            record = await self._store.applied_record(req.kind, req.entity, req.id)
            if record is not None:
                outcome, reason, seq = record
                if seq != req.seq:
                    return {"verdict": "duplicate", "first_seq": seq}
                if outcome == "accepted":
                    return {"verdict": "accepted"}
                return {
                    "verdict": "rejected",
                    "reason": reason,
                    "code": (letter or {}).get("Caresync-Reason-Code", outcome),
                }
            parked = await self._store.parked(req.kind, req.entity)
            if any(p.seq == req.seq and p.stream == req.stream for p in parked):
                reason = next(p.reason for p in parked if p.seq == req.seq)
                return {"verdict": "parked", "reason": reason}
        if letter is not None:
            return {
                "verdict": "rejected",
                "reason": letter.get("Caresync-Reason", ""),
                "code": letter.get("Caresync-Reason-Code", ""),
            }
        # Processed, and neither applied, parked nor dead-lettered: a duplicate of an id that
        # was applied long ago and already pruned, or a message of another router's kinds.
        return {"verdict": "duplicate"}

    async def _dead_letters(self) -> int:
        try:
            info = await self._nc.jetstream().stream_info(self._subjects.dead_letter_stream)
        except nats.js.errors.Error:
            return -1
        return int(info.state.messages)

    async def entity_status(self, kind: str, entity: str) -> dict[str, Any]:
        """The committed state of one entity, and its parked messages."""
        spec = self._registry.get(kind)
        if spec is None:
            known = ", ".join(sorted(self._registry.kinds))
            return {"error": f"unknown entity kind {kind!r}; known: {known}"}
        stored = await self._store.entity(kind, entity)
        if stored is None and ":" not in entity:
            # A bare filler id (HL7 SCH-2.1) stands for NAMESPACE:ID when only one matches.
            matches = await self._store.ids_ending(kind, ":" + entity)
            if len(matches) > 1:
                listed = ", ".join(matches)
                return {
                    "error": f"{kind} id {entity!r} is ambiguous: {listed}; give the qualified id"
                }
            if matches:
                entity = matches[0]
                stored = await self._store.entity(kind, entity)
        if stored is None:
            return {"found": False, "kind": kind, "id": entity}
        state = self._state_decoders[kind].decode(stored.state)
        parked = await self._store.parked(kind, entity)
        view: dict[str, Any] | None = None
        if kind == "appointment":
            view = await appointment_view(self._store, entity)
        elif kind == "item":
            view = await item_view(self._store, entity)
        return {
            "view": view,
            "found": True,
            "kind": kind,
            "id": entity,
            "state": msgspec.to_builtins(state),
            "parked": stored.parked,
            "last_seq": stored.seq,
            "parked_messages": [
                {
                    "seq": p.seq,
                    "command_id": p.command_id,
                    "reason": p.reason,
                    "failures": p.failures,
                }
                for p in parked
            ],
        }


_SEVERITY = ("rejected", "parked", "accepted", "duplicate")


def _combined(parts: list[dict[str, Any]]) -> str:
    """One verdict for several: the worst of them (a message with one rejected command is
    rejected); all duplicates is a duplicate."""
    found = {p.get("verdict", "") for p in parts}
    if not found:
        return "accepted"
    for verdict in _SEVERITY:
        if verdict in found:
            return verdict
    return "duplicate"


def _parked_row(p: ParkedRow) -> dict[str, Any]:
    return {
        "kind": p.kind,
        "id": p.id,
        "stream": p.stream,
        "seq": p.seq,
        "command_id": p.command_id,
        "subject": p.subject,
        "reason": p.reason,
        "failures": p.failures,
        "parked_at": p.parked_at,
    }
