"""``replay rebuild`` by the fold (router/replay_fold.py) writes what the pipeline's replay writes.

One history, applied by a live router: bookings, reschedules, completions (charges, which
release or consume supplies), cancels, duplicates re-sent, a rejected command, messages that
do not decode, a new reference-data version half-way, and a poison command that parks its
entity (with messages behind it, one of them re-sent later).  Rebuilt once through the
pipeline (``fold=False``) and once by the fold, the stores must hold the same: snapshots byte
for byte, dedupe records, outbox rows and their status, parked messages and offsets.
"""

from __future__ import annotations

import secrets
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from harness import appointment_workload, client, load_refdata, make_config, running, wait_for
from test_router_nats import POKE, catalog_from_log, poke_message
from workflow_network import demo_refdata

from caresync.actors import Registry, default_registry
from caresync.codecs import Subjects, encode_envelope, make_envelope
from caresync.codecs.refdata import RefDataSet, encode_refdata_set
from caresync.config import Config
from caresync.router import replay
from caresync.router.actor import Supervision
from caresync.router.embedded import EmbeddedNats
from caresync.router.memory_transport import MemoryTransport
from caresync.router.refdata import RefDataCatalog
from caresync.router.replay import rebuild, sent_effect_keys
from caresync.router.replay_fold import PartitionFold
from caresync.router.service import RouterService, make_transport, open_store, subjects_for
from caresync.router.worker_settings import WorkerSettings
from caresync.store import PartitionedStore, Store

pytestmark = pytest.mark.anyio

REGISTRY = Registry.of(*default_registry().kinds.values(), POKE)
T0 = datetime(2027, 1, 1, tzinfo=UTC)
BOOK = {
    "procedures": [{"code": "27447"}],
    "facility_id": "MAIN",
    "start": "2027-01-01T08:00:00+00:00",
    "payer_id": "ACME",
}
CHARGES = {"lines": [{"line_id": "Z-L1", "code": "27447", "amount": "900"}]}
UNSENT = 3
"""Messages deleted from the output stream: their effects count as never sent."""


@dataclass(frozen=True, slots=True)
class Msg:
    subject: str
    data: bytes
    msg_id: str | None


def command(s: Subjects, entity: str, name: str, payload: Any, cid: str, minute: int) -> Msg:
    env = make_envelope(
        id=cid,
        kind=f"appointment.{name}",
        entity=entity,
        payload=payload,
        occurred_at=T0 + timedelta(minutes=minute),
    )
    return Msg(s.command("appointment", entity), encode_envelope(env), cid)


def history(s: Subjects) -> tuple[list[Msg], list[Msg]]:
    """The messages before and after the second reference-data version.

    A0-A11 come before it, A12-A23 after it; A8-A11 and A20-A23 are only booked, so that
    their reservations of the card in force stay in the item states.
    """
    work = appointment_workload(s.prefix, 24)
    pokes = [poke_message(s, "sick", 0), poke_message(s, "sick", 1, poison=True)]
    pokes += [poke_message(s, "sick", 2)] + [poke_message(s, f"well{i}", 0) for i in range(5)]
    before = [Msg(subject, data, None) for subject, data in pokes]
    after: list[Msg] = []
    for m in work:
        n = int(m.appointment[1:])
        if n % 12 < 8 or m.name == "book":
            (before if n < 12 else after).append(Msg(m.subject, m.data, m.command_id))
    for i in range(4):
        after.insert(7 * i, command(s, f"C{i}", "book", BOOK, f"C{i}-0", 0))
        after.append(command(s, f"C{i}", "cancel", {"reason": "moved away"}, f"C{i}-1", 1))
    after += [
        command(s, "Z", "post_charges", CHARGES, "z-rejected", 0),  # Z is new: rejected
        Msg(s.command("appointment", "G"), b"garbage", None),
        command(s, "U", "explode", {}, "u-unknown", 0),
        Msg(s.command("nosuchkind", "X"), before[-1].data, None),
        *(Msg(m.subject, m.data, None) for m in before[10:13]),  # re-sent: duplicates
        Msg(pokes[2][0], pokes[2][1], None),  # parked behind again, a window later
        Msg(*poke_message(s, "sick", 3), None),
    ]
    return before, after


def refdata_v2() -> RefDataSet:
    """The demo data with a bigger card for 27447: bookings after it reserve more gauze."""
    data = demo_refdata().dataset
    cards = [
        msgspec.structs.replace(c, quantity=7) if (c.item_id, c.provider_id) == ("gauze", "") else c
        for c in data.preference_cards
    ]
    return msgspec.structs.replace(data, preference_cards=cards)


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """What a rebuild writes, without the times it writes them at."""
    conn = sqlite3.connect(path)
    try:
        queries = {
            "entities": "SELECT kind, id, state, parked, seq FROM entities ORDER BY kind, id",
            "applied": "SELECT kind, entity, command_id, seq, outcome, reason FROM applied "
            "ORDER BY kind, entity, command_id",
            "outbox": "SELECT key, subject, payload, headers, status FROM outbox ORDER BY key",
            "outbox_order": "SELECT key FROM outbox ORDER BY seq",
            "parked": "SELECT kind, id, stream, seq, command_id, subject, data, headers, reason, "
            "failures, timestamp_ns FROM parked ORDER BY kind, id, stream, seq",
            "offsets": "SELECT stream, seq FROM offsets ORDER BY stream",
        }
        return {name: conn.execute(sql).fetchall() for name, sql in queries.items()}
    finally:
        conn.close()


async def publish(url: str, msgs: list[Msg]) -> None:
    async with client(url) as nc:
        js = nc.jetstream()
        for m in msgs:
            headers = {"Nats-Msg-Id": m.msg_id} if m.msg_id else None
            await js.publish(m.subject, m.data, headers=headers)


async def settled(service: RouterService, url: str, cfg: Config, data_dir: Path) -> None:
    """Wait until the router has applied the whole input stream and sent every effect."""
    stream = subjects_for(cfg).input_stream(0)
    assert service.router is not None
    worker = service.router.workers[0]

    async def idle() -> bool:
        async with client(url) as nc:
            last = (await nc.jetstream().stream_info(stream)).state.last_seq
        async with await open_store(cfg, data_dir) as store:
            pending = (await store.counts())["outbox_pending"]
        return worker.stats.last_seq == last and pending == 0

    await wait_for(idle, timeout_s=60, what="the live router to apply the history")


@dataclass(frozen=True, slots=True)
class History:
    cfg: Config
    url: str
    live: Path
    """The live router's data dir (copy it before rebuilding in it)."""


@pytest.fixture(scope="module")
async def live_history(
    nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> History:
    """The history, applied by a live router once for the module (its prefix of its own)."""
    nats_url, prefix = nats_server.url, "t" + secrets.token_hex(5)
    cfg = make_config(
        prefix,
        router={"batch_size": 50},
        supervision={"max_failures": 3, "backoff_initial_ms": 1.0, "backoff_max_ms": 5.0},
    )
    live = tmp_path_factory.mktemp("live")
    before, after = history(subjects_for(cfg))
    async with running(cfg, nats_url, live, REGISTRY) as service, client(nats_url) as nc:
        js = nc.jetstream()
        await load_refdata(js, service)
        await publish(nats_url, before)
        await settled(service, nats_url, cfg, live)
        ack = await js.publish(service.subjects.refdata_subject, encode_refdata_set(refdata_v2()))

        async def known() -> bool:
            return service.catalog.latest_version >= ack.seq

        await wait_for(known, what="the second reference-data version")
        await publish(nats_url, after)
        await settled(service, nats_url, cfg, live)
    async with client(nats_url) as nc:
        for seq in range(1, UNSENT + 1):
            await nc.jetstream().delete_msg(subjects_for(cfg).output_stream, seq)
    return History(cfg, nats_url, live)


def copy_of(h: History, into: Path, *, with_store: bool = True) -> Path:
    into.mkdir()
    if with_store:
        for f in h.live.glob("caresync.db*"):
            shutil.copy(f, into / f.name)
    return into


@asynccontextmanager
async def rebuild_env(
    h: History, data_dir: Path
) -> AsyncIterator[tuple[Any, PartitionedStore, Any]]:
    async with client(h.url) as nc, await open_store(h.cfg, data_dir) as store:
        catalog = await catalog_from_log(nc, h.cfg, store)
        yield make_transport(nc, h.cfg), store, catalog.at


async def rebuilt(h: History, data_dir: Path, *, fold: bool) -> dict[str, list[tuple[Any, ...]]]:
    async with rebuild_env(h, data_dir) as (transport, store, refdata):
        report = await rebuild(
            transport=transport,
            store=store,
            registry=REGISTRY,
            subjects=subjects_for(h.cfg),
            settings=WorkerSettings.from_config(h.cfg),
            refdata=refdata,
            fold=fold,
        )
        assert report.messages == await transport.last_seq(subjects_for(h.cfg).input_stream(0))
    return dump(data_dir / "caresync.db")


def check_history_shows(state: dict[str, list[tuple[Any, ...]]]) -> None:
    """The history has what the test means it to have."""
    outcomes = {row[2]: (row[4], row[5]) for row in state["applied"]}
    assert outcomes["z-rejected"][0] == "rejected"
    assert outcomes["C3-1"] == ("accepted", "")
    parked = [(row[1], row[4], row[9]) for row in state["parked"]]
    assert parked[:2] == [("sick", "sick-1", 3), ("sick", "sick-2", 0)]
    assert [p[1] for p in parked] == ["sick-1", "sick-2", "sick-2", "sick-3"]
    dead = [row for row in state["outbox"] if row[0].startswith("dlq:")]
    assert len(dead) == 4  # garbage, unknown command, unknown kind, the rejection


@pytest.mark.parametrize("with_store", [True, False], ids=["live-store", "store-lost"])
async def test_the_fold_writes_what_the_pipeline_writes(
    live_history: History, tmp_path: Path, with_store: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = live_history
    by_worker = await rebuilt(h, copy_of(h, tmp_path / "w", with_store=with_store), fold=False)
    scans: list[int] = []

    async def scan(transport: Any, subjects: Subjects) -> set[str]:
        scans.append(1)
        return await sent_effect_keys(transport, subjects)

    monkeypatch.setattr(replay, "sent_effect_keys", scan)
    by_fold = await rebuilt(h, copy_of(h, tmp_path / "f", with_store=with_store), fold=True)
    # With the outbox kept, every row the fold makes is there: no need to scan the streams.
    assert len(scans) == (0 if with_store else 1)
    check_history_shows(by_fold)
    # The order of the outbox follows the pipeline's batches, which JetStream may cut short.
    del by_worker["outbox_order"], by_fold["outbox_order"]
    for table in by_worker:
        assert by_fold[table] == by_worker[table], table
    assert by_fold["entities"] == dump(h.live / "caresync.db")["entities"]
    pending = [row[0] for row in by_fold["outbox"] if row[4] == "pending"]
    assert len(pending) == (0 if with_store else UNSENT)


async def test_an_interrupted_fold_resumes_after_its_last_chunk(
    live_history: History, tmp_path: Path
) -> None:
    h = live_history
    by_worker = await rebuilt(h, copy_of(h, tmp_path / "w", with_store=False), fold=False)
    data_dir = copy_of(h, tmp_path / "f", with_store=False)
    subjects = subjects_for(h.cfg)
    stream = subjects.input_stream(0)
    async with rebuild_env(h, data_dir) as (transport, store, refdata):
        end = await transport.last_seq(stream)
        scans: list[int] = []

        async def sent() -> set[str]:
            # Asked at the first commit, mid-stream: the reader pauses for it.
            scans.append(1)
            return await sent_effect_keys(transport, subjects)

        def fold(**caches: int) -> PartitionFold:
            return PartitionFold(
                stream=stream,
                transport=transport,
                store=store.of(0),
                registry=REGISTRY,
                subjects=subjects,
                settings=WorkerSettings.from_config(h.cfg),
                refdata=refdata,
                already_sent=sent,
                chunk_messages=20,
                **caches,
            )

        first = fold()

        class Stop(Exception):
            pass

        def stop_after_a_chunk(n: int) -> None:
            if first.stats.batches >= 1:
                raise Stop

        with pytest.raises(Stop):
            await first.run(end, progress=stop_after_a_chunk)
        stopped_at = await store.offset(stream)
        assert 0 < stopped_at <= end
        # Resumed with tiny caches: states and dedupe records are read back from the store.
        assert await fold(cache_entities=3, cache_applied=10).run(end) == end - stopped_at
        assert len(scans) == 2
    resumed = dump(data_dir / "caresync.db")
    del by_worker["outbox_order"], resumed["outbox_order"]
    assert resumed == by_worker


async def test_on_full_batches_the_outbox_order_is_the_pipelines_too(tmp_path: Path) -> None:
    # The in-memory transport always hands out full batches: the windows are the batches.
    s = Subjects()
    transport = MemoryTransport()
    transport.provision(s)
    catalog = RefDataCatalog()
    catalog.add(1, 0, demo_refdata().dataset)
    before, after = history(s)
    for m in before:
        transport.append(m.subject, m.data, {"Nats-Msg-Id": m.msg_id} if m.msg_id else None)
    catalog.add(2, time.time_ns(), refdata_v2())
    for m in after:
        transport.append(m.subject, m.data, {"Nats-Msg-Id": m.msg_id} if m.msg_id else None)
    dumps = []
    for fold in (False, True):
        async with await Store.open(tmp_path / f"{fold}.db") as store:
            await rebuild(
                transport=transport,
                store=store,
                registry=REGISTRY,
                subjects=s,
                settings=WorkerSettings(
                    batch_size=16,
                    pull_timeout_s=0.02,
                    max_live_actors=5,  # the pipeline reads most states back from the store
                    supervision=Supervision(3, 0.001),
                ),
                refdata=catalog.at,
                fold=fold,
            )
        dumps.append(dump(tmp_path / f"{fold}.db"))
    check_history_shows(dumps[1])
    assert dumps[1] == dumps[0]
