"""Connectors: how effects reach the downstream systems (NATS request/reply or HTTP).

One :class:`ConnectorWorker` per system reads that system's effects from the output stream in
order, calls the system through a :class:`Downstream` (:class:`NatsDownstream` or
:class:`HttpDownstream`), retries transient failures with back-off, records every attempt in the
store and acknowledges the outcome to the owning actor.  :func:`run_connectors` runs them all.
"""

from __future__ import annotations

from caresync.codecs.downstream import DownstreamAck
from caresync.connectors.acks import ACK_COMMAND, ack_id, owner_kind
from caresync.connectors.downstream import (
    IDEMPOTENCY_HEADER,
    Delivery,
    Downstream,
    DownstreamReply,
)
from caresync.connectors.errors import (
    ConnectorError,
    ConnectorSetupError,
    PermanentError,
    TransientError,
)
from caresync.connectors.http import HttpDownstream
from caresync.connectors.nats import NatsDownstream
from caresync.connectors.runner import SYSTEMS, make_downstream, run_connectors
from caresync.connectors.worker import ConnectorStats, ConnectorWorker

__all__ = [
    "ACK_COMMAND",
    "IDEMPOTENCY_HEADER",
    "SYSTEMS",
    "ConnectorError",
    "ConnectorSetupError",
    "ConnectorStats",
    "ConnectorWorker",
    "Delivery",
    "Downstream",
    "DownstreamAck",
    "DownstreamReply",
    "HttpDownstream",
    "NatsDownstream",
    "PermanentError",
    "TransientError",
    "ack_id",
    "make_downstream",
    "owner_kind",
    "run_connectors",
]
