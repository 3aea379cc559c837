"""Local fan-out (router/local_fanout.py): a command for an entity of the same partition is
applied right after its cause, in the same batch, and recorded on the local stream.

- the partition computed in Python is the one the server's mapping chooses (real nats-server);
- the order is the stream's, not the batches': a command a cause sends comes before a later
  input message for the same entity in the same batch, and a rebuild's fold finds the same;
- a tree whose target parks sends the next command for it through the stream instead;
- a source cannot pass a message off as a record.
"""

from __future__ import annotations

import random
import string
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest

from caresync.actors import Accepted, Command, EntityKind, Registry
from caresync.actors.contract import ActorRef, Effect
from caresync.cli.up import mappings_config
from caresync.codecs import Subjects, encode_envelope, make_envelope
from caresync.router.actor import Supervision
from caresync.router.batch_apply import BatchApplier
from caresync.router.embedded import EmbeddedNats
from caresync.router.local_fanout import H_APPLIED_AT, applied_at
from caresync.router.memory_transport import MemoryTransport
from caresync.router.replay import rebuild
from caresync.router.runtime import Router, RouterSettings
from caresync.router.transport import Inbound
from caresync.router.worker_settings import WorkerSettings
from caresync.store import Store

pytestmark = pytest.mark.anyio

S = Subjects()
IN = S.input_stream(0)


# -- two toy kinds: a "fan" sends "add" commands to "log" entities; a log keeps their order ----
class Send(msgspec.Struct, kw_only=True, frozen=True):
    to: list[str]
    key: str = ""
    """The effects' idempotency key, when not the cause's own (a key another cause may share)."""


class Add(msgspec.Struct, kw_only=True, frozen=True):
    fail: bool = False


class Sent(msgspec.Struct, frozen=True, tag="sent"):
    n: int


class Added(msgspec.Struct, frozen=True, tag="added"):
    command_id: str


class FanState(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    sent: int = 0


class LogState(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    order: tuple[str, ...] = ()


def _fan_decide(state: FanState, command: Command[Any]) -> Accepted[Sent]:
    to = command.payload.to
    effects = tuple(
        Effect(
            target=ActorRef("log", target),
            name="add",
            key=command.payload.key or f"{command.key}:add:{i}",
            payload={"fail": target.startswith("bad")},
        )
        for i, target in enumerate(to)
    )
    return Accepted(events=(Sent(len(to)),), effects=effects)


def _log_decide(state: LogState, command: Command[Any]) -> Accepted[Added]:
    if command.payload.fail:
        raise RuntimeError("this log cannot take it")
    return Accepted(events=(Added(command.id),))


FAN: EntityKind[FanState, Sent] = EntityKind(
    name="fan",
    state_type=FanState,
    commands={"send": Send},
    initial=lambda entity: FanState(id=entity),
    decide=_fan_decide,
    evolve=lambda s, e: msgspec.structs.replace(s, sent=s.sent + e.n),
)
LOG: EntityKind[LogState, Added] = EntityKind(
    name="log",
    state_type=LogState,
    commands={"add": Add},
    initial=lambda entity: LogState(id=entity),
    decide=_log_decide,
    evolve=lambda s, e: msgspec.structs.replace(s, order=(*s.order, e.command_id)),
)
REGISTRY = Registry.of(FAN, LOG)


def send(fan: str, command_id: str, to: list[str], key: str = "") -> tuple[str, bytes]:
    payload = {"to": to, "key": key}
    env = make_envelope(id=command_id, kind="fan.send", entity=fan, payload=payload)
    return S.command("fan", fan), encode_envelope(env)


def add(log: str, command_id: str) -> tuple[str, bytes]:
    env = make_envelope(id=command_id, kind="log.add", entity=log, payload={})
    return S.command("log", log), encode_envelope(env)


async def run_router(transport: MemoryTransport, store: Store, until_offset: int) -> Router:
    """Run a router until the input stream is applied through ``until_offset`` and every effect
    is published; return it (stopped) for its counters."""
    settings = RouterSettings(
        worker=WorkerSettings(
            batch_size=100,
            pull_timeout_s=0.02,
            supervision=Supervision(max_failures=2, backoff_initial_s=0.001),
        )
    )
    router = Router(
        transport=transport, store=store, registry=REGISTRY, subjects=S, settings=settings
    )
    async with anyio.create_task_group() as tg:
        await tg.start(router.run)
        with anyio.fail_after(10):
            while True:
                if await store.offset(IN) >= until_offset and not await store.pending_effects():
                    break
                await anyio.sleep(0.01)
        router.stop()
    return router


@pytest.fixture
def transport() -> MemoryTransport:
    t = MemoryTransport()
    t.provision(S)
    return t


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "live.db") as s:
        yield s


async def log_order(store: Store, log: str) -> tuple[str, ...]:
    row = await store.entity("log", log)
    assert row is not None
    return msgspec.msgpack.decode(row.state, type=LogState).order


async def test_a_command_sent_by_a_cause_comes_before_a_later_input_in_the_same_batch(
    transport: MemoryTransport, store: Store, tmp_path: Path
) -> None:
    # One batch: F1 sends to L1; then a source command for L1 itself.  In stream order the
    # command F1 sends is decided right after F1, so before the later input.
    for subject, data in [send("F1", "s1", ["L1", "L2"]), add("L1", "direct")]:
        transport.append(subject, data, None)
    router = await run_router(transport, store, until_offset=2)
    assert await log_order(store, "L1") == ("F1/s1:add:0", "direct")
    stats = router.workers[0].stats.as_dict()
    assert (stats["received"], stats["accepted"], stats["local"]) == (2, 4, 2)
    assert await log_order(store, "L2") == ("F1/s1:add:1",)
    # Nothing went through the input stream; both are recorded on the local stream, with
    # their place: after the message at seq 1, first and second.
    assert [m.subject for m in transport.streams[IN].messages] == ["cs.in.fan.F1", "cs.in.log.L1"]
    records = transport.streams[S.local_stream].messages
    assert [m.subject for m in records] == ["cs.loc.log.L1", "cs.loc.log.L2"]
    assert [applied_at(m)[:2] for m in records if applied_at(m)] == [(1, 1), (1, 2)]
    live = {(e.kind, e.id): msgspec.msgpack.decode(e.state) for e in await store.entities()}

    # A rebuild derives the local commands from their causes: the same state, nothing to send.
    async with await Store.open(tmp_path / "rebuilt.db") as rebuilt:
        report = await rebuild(
            transport=transport,
            store=rebuilt,
            registry=REGISTRY,
            subjects=S,
            settings=WorkerSettings(batch_size=100),
        )
        assert report.pending_effects == 0
        assert {
            (e.kind, e.id): msgspec.msgpack.decode(e.state) for e in await rebuilt.entities()
        } == live


async def test_a_local_command_the_store_already_has_undoes_the_batch_and_is_a_duplicate(
    transport: MemoryTransport, store: Store
) -> None:
    # F1 sends "shared" to L1; committed, and gone from the router's memory by the time F2
    # sends the same key: only the store knows it, read once the batch is applied.
    transport.append(*send("F1", "s1", ["L1"], key="shared"), None)
    await run_router(transport, store, until_offset=1)
    transport.append(*send("F2", "s2", ["L1"], key="shared"), None)
    transport.append(*add("L1", "direct"), None)
    router = await run_router(transport, store, until_offset=3)
    stats = router.workers[0].stats.as_dict()
    assert (stats["accepted"], stats["duplicates"]) == (2, 1)  # F2 and "direct"
    # The first pass applied "shared" to L1 again; the undo put L1 back before "direct".
    assert await log_order(store, "L1") == ("shared", "direct")
    fan = await store.entity("fan", "F2")
    assert fan is not None
    assert msgspec.msgpack.decode(fan.state, type=FanState).sent == 1


async def test_a_tree_whose_target_parked_sends_its_next_command_through_the_stream(
    transport: MemoryTransport, store: Store
) -> None:
    # "bad1" fails on every command: the first one parks it (failing), the second one in the
    # same tree would park behind it at the same stream position: it goes through the stream.
    transport.append(*send("F1", "s1", ["bad1", "bad1", "L1"]), None)
    await run_router(transport, store, until_offset=2)
    parked = await store.parked("log", "bad1")
    assert [(p.seq, p.command_id, p.reason.startswith("RuntimeError")) for p in parked] == [
        (1, "F1/s1:add:0", True),
        (2, "F1/s1:add:1", False),
    ]
    assert [m.subject for m in transport.streams[IN].messages] == [
        "cs.in.fan.F1",
        "cs.int.log.bad1",
    ]
    assert [m.subject for m in transport.streams[S.local_stream].messages] == [
        "cs.loc.log.bad1",
        "cs.loc.log.L1",
    ]
    assert await log_order(store, "L1") == ("F1/s1:add:2",)


async def test_a_source_message_with_the_record_header_is_applied_like_any_other(
    transport: MemoryTransport, store: Store
) -> None:
    subject, data = add("L1", "forged")
    transport.append(subject, data, {H_APPLIED_AT: "0.1.0"})
    await run_router(transport, store, until_offset=1)
    assert await log_order(store, "L1") == ("forged",)


async def test_the_partition_of_an_entity_is_the_one_the_server_maps_it_to(
    tmp_path: Path,
) -> None:
    subjects = Subjects(prefix="pt", partitions=5)
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + "-_:/@.*> é%"
    ids = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) for _ in range(400)]
    async with EmbeddedNats(tmp_path / "nats", extra_config=mappings_config(subjects)) as server:
        nc = await nats.connect(server.url)
        try:
            got: list[str] = []

            async def collect(msg: Any) -> None:
                got.append(msg.subject)

            await nc.subscribe("pt.part.>", cb=collect)
            for i, entity in enumerate(ids):
                kind = ("billing", "item", "log")[i % 3]
                await nc.publish(subjects.internal(kind, entity), b"")
            await nc.flush()
            with anyio.fail_after(5):
                while True:
                    if len(got) >= len(ids):
                        break
                    await anyio.sleep(0.01)
        finally:
            await nc.close()
    for i, (entity, subject) in enumerate(zip(ids, got, strict=True)):
        kind = ("billing", "item", "log")[i % 3]
        assert int(subject.split(".")[2]) == subjects.partition_of(kind, entity), entity
    assert len({s.split(".")[2] for s in got}) == 5


async def test_commands_for_another_partition_are_published_first_each_subject_in_order(
    store: Store,
) -> None:
    # Two partitions: of the logs F1 sends to, some live in partition 0 (applied now and
    # recorded), the others in partition 1 (published to it).  The batch's rows put the latter
    # first: the other partition waits for them, nobody waits for the records.
    subjects = Subjects(partitions=2)
    logs = [f"L{i}" for i in range(12)]
    remote = [log for log in logs if subjects.partition_of("log", log) == 1]
    assert 0 < len(remote) < len(logs)
    applier = BatchApplier(
        stream=subjects.input_stream(0),
        store=store,
        registry=REGISTRY,
        subjects=subjects,
        settings=WorkerSettings(),
        partition=0,
    )
    subject, data = send("F1", "s1", [*logs, *logs[:3]], key="")
    message = Inbound(subject, data, None, subjects.input_stream(0), 1, "", 1, 0)
    try:
        write, _ = await applier.apply([message], 1)
    finally:
        applier.close()
    rows = [(row.subject.split(".")[1], row.subject.split(".")[-1]) for row in write.outbox]
    sent_to = [*logs, *logs[:3]]
    hops = [("int", log) for log in sent_to if log in remote]
    records = [("loc", log) for log in sent_to if log not in remote]
    assert rows == hops + records
    assert [row.key for row in write.outbox if row.subject.endswith(".L0")] == sorted(
        (row.key for row in write.outbox if row.subject.endswith(".L0")),
        key=lambda key: int(key.rsplit(":", 1)[1]),
    )
