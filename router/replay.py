"""``replay rebuild``: drop local state and rebuild it from the streams through the actors.

Each input stream is folded by :class:`~caresync.router.replay_fold.PartitionFold` (states in
memory, one transaction per big chunk); ``fold=False`` runs the live pipeline's replay
(:meth:`PartitionWorker.replay`) instead, which writes the same and serves as its reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from caresync.actors.contract import Registry
from caresync.codecs import Subjects
from caresync.router.errors import RouterError
from caresync.router.publisher import Publisher
from caresync.router.replay_fold import PartitionFold, outbox_keys
from caresync.router.snapshots import Restored, Snapshots, restore_all
from caresync.router.transport import Transport
from caresync.router.worker import PartitionWorker
from caresync.router.worker_settings import WorkerSettings
from caresync.store import PartitionedStore, Store

log = structlog.get_logger("caresync.replay")


@dataclass(frozen=True, slots=True)
class RebuildReport:
    """What a rebuild did."""

    messages: int
    entities: int
    elapsed_s: float
    pending_effects: int
    """Effects the replay found that were never sent; the router sends them at its next start."""
    snapshots: tuple[Restored, ...] = ()
    """What became of each store file's snapshot (empty: none were asked for)."""
    restore_s: float = 0.0
    """Of ``elapsed_s``, the time spent fetching and restoring snapshots."""
    warnings: tuple[str, ...] = ()
    """What the rebuild could not do (a stream that lost its oldest messages)."""


async def sent_effect_keys(
    transport: Transport, subjects: Subjects, *, stall_timeout_s: float = 30.0
) -> set[str]:
    """Msg-Ids of every message in the deployment's streams: the effects already sent.

    JetStream is the ledger: an effect is sent once its stream holds it, so a rebuild asks the
    streams (headers only), and works even when the SQLite file is gone.
    """
    keys: set[str] = set()
    for stream in _streams(subjects):
        end = await transport.last_seq(stream)
        if end == 0:
            continue
        reader = await transport.open_reader(stream, 1, headers_only=True)
        try:
            seen = 0
            stalled_since = time.monotonic()
            while seen < end:
                batch = await reader.next_batch(5000, 1.0)
                if not batch:
                    if time.monotonic() - stalled_since > stall_timeout_s:
                        raise RouterError(
                            f"reading {stream} for sent effects stalled at seq {seen} of {end}"
                        )
                    continue
                stalled_since = time.monotonic()
                for message in batch:
                    seen = max(seen, message.seq)
                    msg_id = (message.headers or {}).get("Nats-Msg-Id")
                    if msg_id:
                        keys.add(msg_id)
        finally:
            await reader.close()
    return keys


def _streams(subjects: Subjects) -> list[str]:
    """Every stream that holds effects: the input streams, the local records, the output and
    dead-letter ones."""
    return [
        *subjects.input_streams(),
        subjects.local_stream,
        subjects.output_stream,
        subjects.dead_letter_stream,
    ]


async def rebuild(
    *,
    transport: Transport,
    store: Store | PartitionedStore,
    registry: Registry,
    subjects: Subjects,
    settings: WorkerSettings,
    progress: Callable[[int], None] | None = None,
    refdata: Callable[[int], Any] | None = None,
    fold: bool = True,
    snapshots: Snapshots | None = None,
    partitions: Sequence[int] | None = None,
) -> RebuildReport:
    """Reset derived state and re-apply every input stream from its first message (or from
    the snapshot of its file, with ``snapshots``).

    Effects already sent are recognised by their idempotency keys (the Msg-Ids in the
    streams) and not sent again; effects that were never sent are left in the outbox for the
    router's next start.  ``fold=False``: through the live pipeline (slower, same result).
    ``snapshots``: start each file from its snapshot in JetStream where that is sound (else
    from the start, as without), and fold only the streams past it.  ``partitions``: only
    these (default all; their files hold no other partition), as one of several processes
    that rebuild a deployment together; the report counts their files only.
    """
    started = time.monotonic()
    found: list[set[str]] = []

    async def already_sent() -> set[str]:
        # The fold asks only for effects the outbox does not have: often never.
        if not found:
            found.append(await sent_effect_keys(transport, subjects))
            log.info("sent_effects_found", keys=len(found[0]))
        return found[0]

    if fold:
        for stream in _streams(subjects):  # all there (or raising) before the state is reset
            await transport.last_seq(stream)
    else:
        await already_sent()
    stores = PartitionedStore.of_store(store, subjects.input_streams())
    mine = list(range(subjects.partitions) if partitions is None else partitions)
    files = stores.distinct(mine)
    restored: list[Restored] = []
    restore_s = 0.0
    if snapshots is not None:
        restore_started = time.monotonic()
        restored = await restore_all(snapshots, stores, subjects, already_sent, mine)
        restore_s = time.monotonic() - restore_started
    else:
        for file in files:
            await file.reset_state()
    warnings: list[str] = []
    from_snapshot = {stream for r in restored if r.used for stream in r.streams}
    for p in mine:
        stream = subjects.input_stream(p)
        first = await transport.first_seq(stream)
        if stream not in from_snapshot and first > 1 and await transport.last_seq(stream):
            warnings.append(
                f"{stream} starts at seq {first}: the {first - 1} messages before it are gone "
                "(stream limits or a purge) and no snapshot covers them, so the state they made "
                "is not rebuilt (entities they touched are missing or partial)"
            )
            log.warning("rebuild_incomplete", stream=stream, first_seq=first)
    # What each file's outbox holds before anything is folded (read once per file).
    in_outbox = {id(s): await outbox_keys(s) if fold else frozenset() for s in files}
    total = 0
    publisher = Publisher(transport)  # a replay publishes nothing; workers need one to exist
    for p in mine:
        stream = subjects.input_stream(p)
        end = await transport.last_seq(stream)
        done_before = total

        def report(n: int, base: int = done_before) -> None:
            if progress is not None:
                progress(base + n)

        if fold:
            folder = PartitionFold(
                stream=stream,
                transport=transport,
                store=stores.of(p),
                registry=registry,
                subjects=subjects,
                settings=settings,
                refdata=refdata,
                already_sent=already_sent,
                in_outbox=in_outbox[id(stores.of(p))],
                partition=p,
            )
            total += await folder.run(end, progress=report)
        else:
            worker = PartitionWorker(
                stream=stream,
                consumer_name=subjects.consumer_name(p),
                transport=transport,
                store=stores.of(p),
                registry=registry,
                subjects=subjects,
                publisher=publisher,
                settings=settings,
                refdata=refdata,
                partition=p,
            )
            total += await worker.replay(end, already_sent=found[0], progress=report)
        log.info("partition_rebuilt", stream=stream, through_seq=end)
    counts = await stores.counts(mine)
    return RebuildReport(
        messages=total,
        entities=counts["entities"],
        elapsed_s=time.monotonic() - started,
        pending_effects=counts["outbox_pending"],
        snapshots=tuple(restored),
        restore_s=restore_s,
        warnings=tuple(warnings),
    )
