"""Dedupe across the apply/commit pipeline: a re-sent command whose first copy commits while
the next batch's dedupe read is running is still recognised (found by ``bench fanout``: 4 of
772 re-sends applied twice)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from caresync.actors import Accepted, Command, EntityKind, Registry
from caresync.codecs import Subjects, encode_envelope, make_envelope
from caresync.router.memory_transport import MemoryTransport
from caresync.router.runtime import Router, RouterSettings
from caresync.router.worker_settings import WorkerSettings
from caresync.store import BatchWrite, Store
from caresync.store.point_reads import PointReader

pytestmark = pytest.mark.anyio

S = Subjects()
IN = S.input_stream(0)


class Count(msgspec.Struct, kw_only=True, frozen=True):
    pass


class Counted(msgspec.Struct, frozen=True, tag="counted"):
    command_id: str


class TallyState(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    applied: tuple[str, ...] = ()


def _decide(state: TallyState, command: Command[Any]) -> Accepted[Counted]:
    return Accepted(events=(Counted(command.id),))


def _evolve(state: TallyState, event: Counted) -> TallyState:
    return msgspec.structs.replace(state, applied=(*state.applied, event.command_id))


TALLY: EntityKind[TallyState, Counted] = EntityKind(
    name="tally",
    state_type=TallyState,
    commands={"count": Count},
    initial=lambda entity: TallyState(id=entity),
    decide=_decide,
    evolve=_evolve,
)


class RacingStore(Store):
    """Makes the race happen every time: the first copy of ``X`` commits right after the
    second copy's batch has read the dedupe records (the batch reads them at once, on the event
    loop's thread: a commit's bookkeeping cannot land in the middle of the read)."""

    read_began: anyio.Event
    committed: anyio.Event
    reads_of_x = 0

    async def commit(self, write: BatchWrite) -> tuple[int, int] | None:
        if not any(a.command_id == "X" for a in write.applied):
            return await super().commit(write)
        await self.read_began.wait()
        result = await super().commit(write)
        self.committed.set()
        return result


def count(entity: str, command_id: str) -> tuple[str, bytes]:
    env = make_envelope(id=command_id, kind="tally.count", entity=entity, payload={})
    return S.command("tally", entity), encode_envelope(env)


async def test_a_copy_committed_during_the_next_batchs_dedupe_read_is_a_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = MemoryTransport()
    transport.provision(S)
    for subject, data in [count("T1", "X"), count("T1", "X"), count("T1", "Y")]:
        transport.append(subject, data, None)  # no Msg-Id: only the router's dedupe stands
    store = await RacingStore.open(tmp_path / "router.db")
    store.read_began, store.committed = anyio.Event(), anyio.Event()
    reads = PointReader.applied_among

    def racing_read(
        reader: PointReader, keys: Sequence[tuple[str, str, str]]
    ) -> set[tuple[str, str, str]]:
        found = reads(reader, keys)
        if any(command_id == "X" for _, _, command_id in keys):
            store.reads_of_x += 1
            if store.reads_of_x == 2:  # the re-sent copy's batch: read done, commit lands now
                store.read_began.set()
        return found

    monkeypatch.setattr(PointReader, "applied_among", racing_read)
    settings = RouterSettings(
        worker=WorkerSettings(batch_size=1, batches_in_flight=2, pull_timeout_s=0.02)
    )
    router = Router(
        transport=transport,
        store=store,
        registry=Registry.of(TALLY),
        subjects=S,
        settings=settings,
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(router.run)
            with anyio.fail_after(10):  # all three committed
                while True:
                    if await store.offset(IN) == 3:
                        break
                    await anyio.sleep(0.01)
            router.stop()
        assert store.reads_of_x == 2  # the race was staged, not skipped
        row = await store.entity("tally", "T1")
        assert row is not None
        assert msgspec.msgpack.decode(row.state, type=TallyState).applied == ("X", "Y")
        stats: dict[str, Any] = router.workers[0].stats.as_dict()
        assert (stats["accepted"], stats["duplicates"]) == (2, 1)
    finally:
        await store.close()
