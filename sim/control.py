"""Control requests of the simulators: ``<sim prefix>.control.<op>``, JSON request/reply.

``fail`` and ``heal`` set and clear faults, ``report`` counts what each system holds and
received, ``receive`` and ``claim`` make ERP and billing send feedback to caresync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import msgspec
import structlog

from caresync.sim.errors import RequestRejected, SimError
from caresync.sim.faults import SYSTEMS, FaultMode
from caresync.sim.feedback import FeedbackPublisher
from caresync.sim.records import Records
from caresync.sim.schema import FeedbackRow
from caresync.sim.systems import ClaimStatus, Systems, error_reply

if TYPE_CHECKING:
    from caresync.sim.server import SimServer

log = structlog.get_logger("caresync.sim")

System = Literal["billing", "erp", "supply"]
Id = Annotated[str, msgspec.Meta(min_length=1)]
FEEDBACK_WAIT_S = 3.0
"""How long ``receive`` and ``claim`` wait for JetStream to store their command."""


class FailRequest(msgspec.Struct, kw_only=True, frozen=True):
    """Body of ``control.fail``: which system, for how long, how."""

    system: System
    for_s: Annotated[float, msgspec.Meta(gt=0)]
    mode: FaultMode = "down"
    delay_s: Annotated[float, msgspec.Meta(ge=0)] | None = None


class HealRequest(msgspec.Struct, kw_only=True, frozen=True):
    """Body of ``control.heal``."""

    system: System


class ReceiveRequest(msgspec.Struct, kw_only=True, frozen=True):
    """Body of ``control.receive``: a PO id or the ERP's PO reference."""

    po: Id


class ClaimRequest(msgspec.Struct, kw_only=True, frozen=True):
    """Body of ``control.claim``."""

    appointment_id: Id
    status: ClaimStatus
    reason: str = ""


T = TypeVar("T")


def _decode(body: bytes, schema: type[T], op: str) -> T:
    try:
        return msgspec.json.decode(body or b"{}", type=schema)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise RequestRejected(f"control.{op}: {exc}") from None


class Control:
    """Answers control requests for one :class:`~caresync.sim.server.SimServer`."""

    def __init__(
        self,
        server: SimServer,
        records: Records,
        systems: Systems,
        publisher: FeedbackPublisher,
        clock: Callable[[], float],
    ) -> None:
        self._server = server
        self._records = records
        self._systems = systems
        self._publisher = publisher
        self._clock = clock

    async def handle(self, op: str, body: bytes) -> dict[str, Any]:
        """Apply one control request; bad requests get an error reply."""
        try:
            if op == "fail":
                return await self._fail(_decode(body, FailRequest, op))
            if op == "heal":
                return await self._heal(_decode(body, HealRequest, op))
            if op == "report":
                return await self.report()
            if op == "receive":
                req = _decode(body, ReceiveRequest, op)
                return await self._sent(await self._systems.receive(req.po))
            if op == "claim":
                claim = _decode(body, ClaimRequest, op)
                row = await self._systems.claim(claim.appointment_id, claim.status, claim.reason)
                return await self._sent(row)
            raise RequestRejected(
                f"unknown control operation {op!r}; known: fail, heal, report, receive, claim"
            )
        except SimError as exc:
            return error_reply(exc)

    async def _fail(self, req: FailRequest) -> dict[str, Any]:
        now = self._clock()
        delay_s = self._server.settings.slow_delay_s if req.delay_s is None else req.delay_s
        fault = self._server.faults.fail(
            req.system, req.mode, for_s=req.for_s, now_s=now, delay_s=delay_s
        )
        await self._server.settle(req.system)
        log.warning("sim_fault_set", system=req.system, mode=req.mode, for_s=req.for_s)
        return {"system": req.system, "fault": fault.describe(now)}

    async def _heal(self, req: HealRequest) -> dict[str, Any]:
        now = self._clock()
        previous = self._server.faults.current(req.system, now)
        self._server.faults.heal(req.system)
        await self._server.settle(req.system)
        log.info("sim_fault_healed", system=req.system, had_fault=previous is not None)
        return {
            "system": req.system,
            "healed": previous is not None,
            "fault": previous.describe(now) if previous is not None else None,
        }

    async def _sent(self, row: FeedbackRow) -> dict[str, Any]:
        published = await self._publisher.wait_sent(row.id, FEEDBACK_WAIT_S)
        return {"id": row.id, "subject": row.subject, "published": published}

    async def report(self) -> dict[str, Any]:
        """Per system: counts per operation and in total, and the current fault."""
        now = self._clock()
        counts = await self._records.counts()
        systems: dict[str, Any] = {}
        for system in SYSTEMS:
            operations = counts.get(system, {})
            totals = {
                name: sum(op[name] for op in operations.values())
                for name in ("created", "duplicates", "errors", "refused")
            }
            fault = self._server.faults.current(system, now)
            systems[system] = {
                **totals,
                "operations": operations,
                "fault": fault.describe(now) if fault is not None else None,
            }
        return {
            "sim_prefix": self._server.settings.sim_prefix,
            "records": str(self._records.path),
            "systems": systems,
            "feedback": await self._records.feedback_counts(),
        }
