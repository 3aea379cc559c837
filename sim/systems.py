"""The simulated systems' request handlers: validate, dedupe by key, record, reply.

A request is a canonical envelope whose kind is ``<system>.<operation>``; its idempotency key
is the ``Idempotency-Key`` header, else the envelope id.  The data is checked against the
operation's schema (:mod:`caresync.sim.operations`) and stored whole.  Feedback to caresync
(PO acknowledgements, goods received, claim status) is queued in the records' outbox and
published by :mod:`caresync.sim.feedback`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import orjson
import structlog

from caresync.codecs import CodecError, Envelope, Subjects, WireFormat, decode_envelope
from caresync.codecs.envelope import MAX_ID_LENGTH, encode_envelope, make_envelope
from caresync.sim.errors import RequestRejected, SimError
from caresync.sim.operations import OPERATIONS
from caresync.sim.records import Records
from caresync.sim.schema import FeedbackRow, NewRecord, Outcome

log = structlog.get_logger("caresync.sim")

IDEMPOTENCY_HEADER = "Idempotency-Key"

ClaimStatus = Literal["released", "denied"]


@dataclass(frozen=True, slots=True)
class Request:
    """One request to a system: the operation (from the subject), its body and headers."""

    operation: str
    body: bytes
    headers: dict[str, str] | None = None


def error_reply(exc: SimError) -> dict[str, Any]:
    """The reply body for a request that failed."""
    return {"error": str(exc), "transient": exc.transient}


def _payload(env: Envelope, fmt: WireFormat) -> Any:
    raw = env.payload_bytes
    if not raw:
        raise RequestRejected(f"{env.kind} request has no data ($.data)")
    if fmt is WireFormat.JSON:
        return msgspec.json.decode(raw)
    return msgspec.msgpack.decode(raw)


class Systems:
    """Billing, ERP and supply over one :class:`Records` database."""

    def __init__(self, records: Records, router: Subjects, wake_feedback: Callable[[], None]):
        self._records = records
        self._router = router
        self._wake_feedback = wake_feedback

    async def handle(
        self, system: str, operation: str, body: bytes, headers: dict[str, str] | None
    ) -> dict[str, Any]:
        """Apply one request; returns its reply (see :meth:`handle_many`)."""
        return (await self.handle_many(system, [Request(operation, body, headers)]))[0]

    async def handle_many(self, system: str, requests: Sequence[Request]) -> list[dict[str, Any]]:
        """Apply requests in order, recording them in one transaction; one reply each.

        Never raises SimError: a bad request gets a non-transient error reply, a database
        failure a transient one for every request of the batch; errors are counted.
        """
        replies: list[dict[str, Any] | None] = []
        valid: list[tuple[int, NewRecord]] = []
        errors: list[str] = []
        for i, request in enumerate(requests):
            try:
                valid.append((i, self._prepare(system, request)))
                replies.append(None)
            except RequestRejected as exc:
                replies.append(error_reply(exc))
                errors.append(request.operation)
        try:
            outcomes = await self._records.record_many([new for _, new in valid])
        except SimError as exc:
            outcomes = []
            for i, new in valid:
                replies[i] = error_reply(exc)
                errors.append(new.operation)
        for (i, new), outcome in zip(valid, outcomes, strict=False):
            replies[i] = self._reply(new, outcome)
            if outcome.operation != new.operation:
                errors.append(new.operation)
            elif outcome.created and new.feedback is not None:
                self._wake_feedback()
        await self.count_errors(system, errors)
        return [reply or {} for reply in replies]

    async def count_errors(self, system: str, operations: Sequence[str]) -> None:
        """Count error replies (a failure to count is only logged: the replies matter)."""
        counts = Counter(op[:64] for op in operations)
        try:
            await self._records.count_many([(system, op, "errors", n) for op, n in counts.items()])
        except SimError as exc:
            log.warning("sim_count_failed", system=system, error=str(exc))

    @staticmethod
    def _reply(new: NewRecord, outcome: Outcome) -> dict[str, Any]:
        if outcome.operation != new.operation:
            return error_reply(
                RequestRejected(
                    f"idempotency key {new.key!r} was already used for "
                    f"{new.system}.{outcome.operation} {outcome.reference}"
                )
            )
        return {
            "outcome": "created" if outcome.created else "duplicate",
            "system": new.system,
            "operation": new.operation,
            "reference": outcome.reference,
            "attempts": outcome.attempts,
        }

    def _prepare(self, system: str, request: Request) -> NewRecord:
        """Validate one request into what to record; raises RequestRejected."""
        operation = request.operation
        spec = OPERATIONS.get(system, {}).get(operation)
        if spec is None:
            known = ", ".join(OPERATIONS.get(system, {}))
            raise RequestRejected(f"unknown operation {system}.{operation!r}; known: {known}")
        try:
            env, fmt = decode_envelope(request.body)
            data = _payload(env, fmt)
            msgspec.convert(data, spec.schema)
        except msgspec.ValidationError as exc:  # before DecodeError, its base class
            raise RequestRejected(f"{system}.{operation}: invalid data: {exc}") from None
        except (CodecError, msgspec.DecodeError) as exc:
            raise RequestRejected(f"{system}.{operation}: bad request: {exc}") from None
        if env.kind != f"{system}.{operation}":
            raise RequestRejected(
                f"envelope kind {env.kind!r} does not match the subject ({system}.{operation})"
            )
        key = (request.headers or {}).get(IDEMPOTENCY_HEADER) or env.id
        if len(key) > MAX_ID_LENGTH:
            raise RequestRejected(f"{IDEMPOTENCY_HEADER} longer than {MAX_ID_LENGTH} characters")
        return NewRecord(
            system=system,
            operation=operation,
            key=key,
            entity=env.entity,
            data=msgspec.json.encode(data).decode(),
            reference_prefix=spec.reference_prefix,
            feedback=self._po_ack(env, data) if operation == "purchase_order" else None,
        )

    def _feedback(
        self,
        *,
        id: str,
        kind: str,
        entity: str,
        payload: dict[str, Any],
        source: str,
        cause: Envelope | None,
    ) -> FeedbackRow:
        env = make_envelope(
            id=id,
            kind=kind,
            entity=entity,
            payload=payload,
            source=source,
            correlation_id=cause.correlation if cause is not None else "",
            causation_id=cause.id if cause is not None else "",
        )
        subject = self._router.command(env.entity_kind, entity)
        return FeedbackRow(id=id, subject=subject, payload=encode_envelope(env))

    def _po_ack(self, cause: Envelope, data: dict[str, Any]) -> Callable[[str], FeedbackRow]:
        def build(reference: str) -> FeedbackRow:
            return self._feedback(
                id=f"ack:{data['po_id']}",
                kind="item.po_acknowledged",
                entity=f"{data['item_id']}@{data['facility_id']}",
                payload={
                    "po_id": data["po_id"],
                    "reference": reference,
                    "supplier_id": data["supplier_id"],
                    "quantity": data["quantity"],
                },
                source="sim/erp",
                cause=cause,
            )

        return build

    async def receive(self, po: str) -> FeedbackRow:
        """ERP reports goods received for a PO (by po_id or reference); raises RequestRejected."""
        record = await self._records.find("erp", "purchase_order", "po_id", po)
        if record is None:
            raise RequestRejected(f"ERP has no purchase order {po!r}")
        data = orjson.loads(record.data)
        row = self._feedback(
            id=f"received:{data['po_id']}",
            kind="item.goods_received",
            entity=f"{data['item_id']}@{data['facility_id']}",
            payload={
                "po_id": data["po_id"],
                "reference": record.reference,
                "quantity": data["quantity"],
            },
            source="sim/erp",
            cause=None,
        )
        await self._records.queue_feedback(row)
        self._wake_feedback()
        return row

    async def claim(self, appointment_id: str, status: ClaimStatus, reason: str) -> FeedbackRow:
        """Billing reports a claim released or denied; raises RequestRejected if unknown."""
        if not await self._records.knows("billing", "appointment_id", appointment_id):
            raise RequestRejected(f"billing has no records for appointment {appointment_id!r}")

        def build(claim_id: str, n: int) -> FeedbackRow:
            return self._feedback(
                id=f"claim:{appointment_id}:{status}:{n}",
                kind="billing.claim_status",
                entity=appointment_id,
                payload={
                    "appointment_id": appointment_id,
                    "status": status,
                    "claim_id": claim_id,
                    "reason": reason,
                },
                source="sim/billing",
                cause=None,
            )

        row = await self._records.update_claim(appointment_id, build)
        self._wake_feedback()
        return row
