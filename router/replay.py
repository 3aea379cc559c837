"""``replay rebuild``: drop local state and rebuild it from the streams through the actors."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from caresync.actors.contract import Registry
from caresync.codecs import Subjects
from caresync.router.publisher import Publisher
from caresync.router.transport import Transport
from caresync.router.worker import PartitionWorker, WorkerSettings
from caresync.store import Store

log = structlog.get_logger("caresync.replay")


@dataclass(frozen=True, slots=True)
class RebuildReport:
    """What a rebuild did."""

    messages: int
    entities: int
    elapsed_s: float
    pending_effects: int
    """Effects the replay found that were never sent; the router sends them at its next start."""


async def rebuild(
    *,
    transport: Transport,
    store: Store,
    registry: Registry,
    subjects: Subjects,
    settings: WorkerSettings,
    progress: Callable[[int], None] | None = None,
) -> RebuildReport:
    """Reset derived state and re-apply every input stream from its first message.

    The effect ledger (outbox) is kept: effects already sent are recognised by their
    idempotency keys and not sent again.
    """
    started = time.monotonic()
    await store.reset_state()
    total = 0
    publisher = Publisher(transport)  # a replay publishes nothing; workers need one to exist
    for p in range(subjects.partitions):
        stream = subjects.input_stream(p)
        worker = PartitionWorker(
            stream=stream,
            consumer_name=subjects.consumer_name(p),
            transport=transport,
            store=store,
            registry=registry,
            subjects=subjects,
            publisher=publisher,
            settings=settings,
        )
        end = await transport.last_seq(stream)
        done_before = total

        def report(n: int, base: int = done_before) -> None:
            if progress is not None:
                progress(base + n)

        total += await worker.replay(end, progress=report)
        log.info("partition_rebuilt", stream=stream, through_seq=end)
    counts = await store.counts()
    return RebuildReport(
        messages=total,
        entities=counts["entities"],
        elapsed_s=time.monotonic() - started,
        pending_effects=counts["outbox_pending"],
    )
