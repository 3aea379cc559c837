"""Runs one connector worker per enabled downstream system, in one task group."""

from __future__ import annotations

import anyio
from anyio.abc import TaskStatus
from nats.aio.client import Client as NatsClient

from caresync.codecs import Subjects
from caresync.config import Config
from caresync.config.schema import ConnectorConfig
from caresync.connectors.downstream import Downstream
from caresync.connectors.http import HttpDownstream
from caresync.connectors.nats import NatsDownstream
from caresync.connectors.worker import ConnectorWorker
from caresync.store import Store

SYSTEMS = ("billing", "erp", "supply")
"""The downstream systems, as named in subjects (``<prefix>.out.<system>.<key>``) and config."""

_CLOSE_S = 2.0


def make_downstream(nc: NatsClient, system: str, cfg: ConnectorConfig) -> Downstream:
    """The connector a system's configuration asks for; raises ConnectorSetupError."""
    if cfg.transport == "http":
        return HttpDownstream(system, cfg)
    return NatsDownstream(nc, system, cfg)


async def run_connectors(
    nc: NatsClient,
    cfg: Config,
    subjects: Subjects,
    store: Store,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Deliver every enabled system's effects until cancelled.

    ``task_status.started()`` once every worker's durable consumer exists; returns at once when
    no system is enabled.  Raises ConnectorSetupError when a worker cannot start.
    """
    downstreams: list[Downstream] = []
    try:
        async with anyio.create_task_group() as tg:
            for system in SYSTEMS:
                conn: ConnectorConfig = getattr(cfg.downstream, system)
                if not conn.enabled:
                    continue
                downstream = make_downstream(nc, system, conn)
                downstreams.append(downstream)
                worker = ConnectorWorker(
                    nc,
                    system,
                    conn,
                    subjects,
                    store,
                    downstream,
                    publish_timeout_s=cfg.outbox.publish_timeout_s,
                )
                await tg.start(worker.run)
            task_status.started()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_S):
            for downstream in downstreams:
                await downstream.aclose()
