"""Simulated downstream systems (billing, ERP, supply) for development, demos and tests.

Each system answers NATS requests on ``<sim prefix>.<system>.<operation>``, keeps its own
records in SQLite, treats a repeated idempotency key as a duplicate attempt (never a second
record) and can be made to fail at run time (see docs/contracts.md, *Downstream systems*).
"""

from __future__ import annotations

from caresync.sim.control import ClaimRequest, FailRequest, HealRequest, ReceiveRequest
from caresync.sim.errors import RequestRejected, SimAlreadyRunning, SimError, SimUnavailable
from caresync.sim.faults import DEFAULT_SLOW_DELAY_S, FAULT_MODES, SYSTEMS, Fault, FaultBoard
from caresync.sim.operations import OPERATIONS, Operation
from caresync.sim.records import Records
from caresync.sim.schema import FeedbackRow, NewRecord, Outcome, SimRecord
from caresync.sim.server import SimServer, SimSettings
from caresync.sim.systems import IDEMPOTENCY_HEADER, Request, Systems

__all__ = [
    "DEFAULT_SLOW_DELAY_S",
    "FAULT_MODES",
    "IDEMPOTENCY_HEADER",
    "OPERATIONS",
    "SYSTEMS",
    "ClaimRequest",
    "FailRequest",
    "Fault",
    "FaultBoard",
    "FeedbackRow",
    "HealRequest",
    "NewRecord",
    "Operation",
    "Outcome",
    "ReceiveRequest",
    "Records",
    "Request",
    "RequestRejected",
    "SimAlreadyRunning",
    "SimError",
    "SimRecord",
    "SimServer",
    "SimSettings",
    "SimUnavailable",
    "Systems",
]
