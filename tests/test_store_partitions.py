"""One SQLite file per partition: where each partition writes, reads across files, the layout
guard, and the read-only union the tools and benchmarks use."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from pathlib import Path

import anyio
import msgspec
import pytest
from harness import (
    appointment_workload,
    client,
    expected,
    load_refdata,
    make_config,
    publish_all,
    running,
    wait_for,
)

from caresync.cli.datadir import DataDirLock
from caresync.cli.up import mappings_config
from caresync.config import dump_toml
from caresync.router.embedded import EmbeddedNats
from caresync.router.service import open_store, store_path, subjects_for
from caresync.store import (
    AppliedRow,
    BatchWrite,
    EntityRow,
    OutboxRow,
    ParkedRow,
    PartitionedStore,
    Store,
    StoreLayoutError,
    partition_files,
    partition_path,
    read_only_union,
)

pytestmark = pytest.mark.anyio

STREAMS = ["T_IN_P0", "T_IN_P1", "T_IN_P2"]
CARESYNC = str(Path(sys.executable).parent / "caresync")


def _write(p: int, entity: str) -> BatchWrite:
    """A batch of partition ``p``: one entity, its dedupe record, an effect, a parked message."""
    stream = STREAMS[p]
    return BatchWrite(
        entities=[EntityRow("appointment", entity, f"state-{p}".encode(), False, 10 + p)],
        applied=[AppliedRow(f"c-{entity}", "appointment", entity, 10 + p, "accepted", "", 1.0)],
        outbox=[OutboxRow(f"c-{entity}:billing", "cs.int.billing.x", b"e", {"why": str(p)})],
        parked=[
            ParkedRow(
                "appointment", f"{entity}-parked", stream, 5, "c", "s", b"d", None, "r", 1, 1.0
            )
        ],
        offsets={stream: 10 + p},
    )


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


async def test_each_partition_commits_to_its_own_file_and_readers_see_them_all(
    tmp_path: Path,
) -> None:
    main = tmp_path / "caresync.db"
    async with await PartitionedStore.open(main, STREAMS) as stores:
        assert [s.path for s in stores.distinct()] == [
            main,
            tmp_path / "caresync.p1.db",
            tmp_path / "caresync.p2.db",
        ]
        for p in range(3):
            await stores.of(p).commit(_write(p, f"A{p}"))
        await stores.main.ingest.record([], "T_RAW", 7)  # a shared table: the main file

        # Reads across the files.
        for p in range(3):
            row = await stores.entity("appointment", f"A{p}")
            assert row is not None
            assert row.state == f"state-{p}".encode()
            assert await stores.offset(STREAMS[p]) == 10 + p
            assert await stores.applied_record("appointment", f"A{p}", f"c-A{p}") == (
                "accepted",
                "",
                10 + p,
            )
            assert await stores.outbox_headers(f"c-A{p}:billing") == {"why": str(p)}
            assert await stores.outbox_row(f"c-A{p}:billing") == ("cs.int.billing.x", b"e")
        assert await stores.offset("T_RAW") == 7
        assert await stores.entity("appointment", "nobody") is None
        assert [r.id for r in await stores.entities("appointment")] == ["A0", "A1", "A2"]
        loaded = await stores.load_entities([("appointment", "A2"), ("appointment", "A0")])
        assert sorted(loaded) == [("appointment", "A0"), ("appointment", "A2")]
        assert [r.stream for r in await stores.parked()] == STREAMS
        assert [r.stream for r in await stores.parked("appointment", "A1-parked")] == [STREAMS[1]]
        assert sorted(await stores.ids_ending("appointment", "2")) == ["A2"]
        counts = await stores.counts()
        assert (counts["entities"], counts["applied"], counts["outbox_pending"]) == (3, 3, 3)
        assert counts["parked_messages"] == 3

    # On disk: partition p's rows are in its file only; the shared tables in the main file.
    for p, path in enumerate(partition_files(main)):
        assert _rows(path, "SELECT id FROM entities") == [(f"A{p}",)]
        offsets = _rows(path, "SELECT stream, seq FROM offsets ORDER BY stream")
        assert offsets == [(STREAMS[p], 10 + p), *([("T_RAW", 7)] if p == 0 else [])]


async def test_commits_of_different_partitions_do_not_wait_for_one_another(
    tmp_path: Path,
) -> None:
    """Each file has its own write lock: a transaction held open on partition 1's file does
    not stop partition 2 from committing (with one shared file it would wait)."""
    async with await PartitionedStore.open(tmp_path / "caresync.db", STREAMS) as stores:
        blocker = sqlite3.connect(partition_path(tmp_path / "caresync.db", 1))
        blocker.execute("BEGIN IMMEDIATE")  # partition 1's file is locked by someone else
        try:
            with anyio.fail_after(5):
                await stores.of(2).commit(_write(2, "B2"))
                await stores.of(0).commit(_write(0, "B0"))
        finally:
            blocker.rollback()
            blocker.close()
        assert await stores.entity("appointment", "B2") is not None


async def test_a_process_opens_only_the_files_of_its_partitions(tmp_path: Path) -> None:
    main = tmp_path / "caresync.db"
    async with await PartitionedStore.open(main, STREAMS, partitions=[1]) as stores:
        assert [s.path for s in stores.distinct()] == [partition_path(main, 1)]
        with pytest.raises(KeyError):
            stores.of(2)
        await stores.of(1).commit(_write(1, "C1"))
        assert (await stores.counts())["entities"] == 1
    assert not partition_path(main, 2).exists()


async def test_files_written_for_another_number_of_partitions_are_refused(
    tmp_path: Path,
) -> None:
    main = tmp_path / "caresync.db"
    async with await PartitionedStore.open(main, STREAMS):
        pass
    with pytest.raises(StoreLayoutError, match=r"written for 3 partition\(s\).*partitions = 2"):
        await PartitionedStore.open(main, STREAMS[:2])

    # The main file it opened is closed again: its connection's thread ends.
    async def no_connection_thread() -> bool:
        return not any(t.name.endswith("_connection_worker_thread)") for t in threading.enumerate())

    await wait_for(no_connection_thread, what="the main file's connection to close")


async def test_a_single_file_store_of_several_partitions_is_refused_until_rebuilt(
    tmp_path: Path,
) -> None:
    """A data dir from before one file per partition holds partition 1's state in the main
    file: a router must not start on it (partition 1 would start from nothing), a rebuild may
    adopt it."""
    main = tmp_path / "caresync.db"
    async with await Store.open(main) as old:
        single = PartitionedStore.single(old, STREAMS)
        for p in range(3):
            await single.of(p).commit(_write(p, f"D{p}"))
    with pytest.raises(StoreLayoutError, match=r"T_IN_P1, T_IN_P2.*replay rebuild"):
        await PartitionedStore.open(main, STREAMS)
    async with await PartitionedStore.open(main, STREAMS, adopt=True) as stores:
        await stores.reset_state()  # what the rebuild does first
        assert (await stores.counts())["entities"] == 0
    async with await PartitionedStore.open(main, STREAMS) as stores:  # adopted: opens now
        assert await stores.offset(STREAMS[1]) == 0


async def test_one_partition_is_one_file_as_before(tmp_path: Path) -> None:
    main = tmp_path / "caresync.db"
    async with await Store.open(main) as old:  # a data dir of an earlier caresync
        await old.commit(_write(0, "E0"))
    async with await PartitionedStore.open(main, STREAMS[:1]) as stores:
        assert await stores.entity("appointment", "E0") is not None
    assert partition_files(main) == [main]


async def test_the_read_only_union_reads_every_partition_file(tmp_path: Path) -> None:
    main = tmp_path / "caresync.db"
    async with await PartitionedStore.open(main, STREAMS) as stores:
        for p in range(3):
            await stores.of(p).commit(_write(p, f"F{p}"))
    (tmp_path / "caresync.pX.db").write_bytes(b"")  # not a partition file: ignored
    assert partition_files(main) == [main, partition_path(main, 1), partition_path(main, 2)]
    conn = read_only_union(main)
    try:
        assert [r[0] for r in conn.execute("SELECT id FROM entities ORDER BY id")] == [
            "F0",
            "F1",
            "F2",
        ]
        assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (3,)
        assert conn.execute("SELECT count(*) FROM parked").fetchone() == (3,)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM main.entities")
    finally:
        conn.close()


async def test_a_router_of_two_partitions_keeps_each_in_its_own_file(
    tmp_path: Path, unique_prefix: str
) -> None:
    """On the real broker, one process running two partitions: every state as the pure actors
    say, each entity in the file of the partition that applied it, each file's outbox
    confirmed (a confirmation committed to another partition's file would leave it pending),
    and control's status reads an entity wherever it lives."""
    cfg = make_config(unique_prefix, streams={"partitions": 2})
    subjects = subjects_for(cfg)
    sent = appointment_workload(unique_prefix, appointments=24)
    oracle = expected(sent)
    data = tmp_path / "data"
    main = store_path(cfg, data)

    async def settled() -> bool:
        async with await open_store(cfg, data) as stores:
            rows = await stores.load_entities(list(oracle.network.states))
            pending = (await stores.counts())["outbox_pending"]
        return pending == 0 and set(rows) == set(oracle.network.states)

    async with (
        EmbeddedNats(tmp_path / "nats", extra_config=mappings_config(subjects)) as srv,
        running(cfg, srv.url, data) as service,
        client(srv.url) as nc,
    ):
        await load_refdata(nc.jetstream(), service)
        await publish_all(nc.jetstream(), sent)
        await wait_for(settled, what="the workload applied and every effect confirmed")
        for kind, entity in oracle.network.states:
            body = msgspec.json.encode({"kind": kind, "id": entity})
            reply = await nc.request(subjects.control("status"), body, timeout=5)
            assert "error" not in msgspec.json.decode(reply.data), (kind, entity)
        reply = await nc.request(subjects.control("status"), b"", timeout=5)
        counts = msgspec.json.decode(reply.data)["counts"]
        assert counts["entities"] == len(oracle.network.states)

    async with await open_store(cfg, data) as stores:
        rows = await stores.load_entities(list(oracle.network.states))
    assert all(
        msgspec.msgpack.decode(rows[key].state, type=type(want)) == want
        for key, want in oracle.network.states.items()
    )
    per_file = [set(_rows(path, "SELECT kind, id FROM entities")) for path in partition_files(main)]
    assert len(per_file) == 2
    assert all(per_file)  # the workload spread over both partitions
    assert not per_file[0] & per_file[1]
    for path, stream in zip(partition_files(main), subjects.input_streams(), strict=True):
        assert _rows(path, "SELECT count(*) FROM outbox WHERE status != 'sent'") == [(0,)]
        assert _rows(path, "SELECT stream FROM offsets WHERE stream LIKE '%_IN%'") == [(stream,)]


async def test_caresync_up_refuses_a_store_of_another_partitioning_with_its_reason(
    tmp_path: Path,
) -> None:
    """Started on a data dir whose store was written for 2 partitions with 3 configured,
    ``caresync up`` exits 1 naming both numbers, without a traceback."""
    data = tmp_path / "data"
    async with await PartitionedStore.open(data / "caresync.db", STREAMS[:2]):
        pass
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
    env["CARESYNC_STREAMS__PARTITIONS"] = "3"
    done = await anyio.run_process([CARESYNC, "up", "--data-dir", str(data)], env=env, check=False)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "written for 2 partition(s), the configuration has streams.partitions = 3" in err
    assert "Traceback" not in err


async def test_a_rebuild_runs_in_as_many_processes_as_the_router_each_on_its_own_files(
    tmp_path: Path, unique_prefix: str
) -> None:
    """With router.processes = 2 on 2 partitions, ``caresync replay rebuild`` rebuilds
    partition 1 in a second process: from the snapshots (nothing left to fold), then in full;
    every state as the pure actors say, each in its own file, the summary adding up both."""
    cfg = make_config(unique_prefix, streams={"partitions": 2})
    subjects = subjects_for(cfg)
    sent = appointment_workload(unique_prefix, appointments=24)
    oracle = expected(sent)
    data = tmp_path / "data"
    config = tmp_path / "caresync.toml"
    parallel = msgspec.structs.replace(cfg, router=msgspec.structs.replace(cfg.router, processes=2))
    config.write_text(dump_toml(parallel), encoding="utf-8")

    async def settled() -> bool:
        async with await open_store(cfg, data) as stores:
            rows = await stores.load_entities(list(oracle.network.states))
            pending = (await stores.counts())["outbox_pending"]
        return pending == 0 and set(rows) == set(oracle.network.states)

    async with EmbeddedNats(tmp_path / "nats", extra_config=mappings_config(subjects)) as srv:
        async with running(cfg, srv.url, data) as service, client(srv.url) as nc:
            await load_refdata(nc.jetstream(), service)
            await publish_all(nc.jetstream(), sent)
            await wait_for(settled, what="the workload applied and every effect confirmed")
        flags = ["--nats", srv.url, "--data-dir", str(data), "--config", str(config), "--json"]

        async def caresync(*args: str) -> dict[str, object]:
            done = await anyio.run_process([CARESYNC, "replay", *args, *flags], check=False)
            assert done.returncode == 0, done.stderr.decode()
            doc: dict[str, object] = msgspec.json.decode(done.stdout)
            return doc

        await caresync("snapshot")
        fast = await caresync("rebuild")
        full = await caresync("rebuild", "--full")
        async with client(srv.url) as nc:
            ends = [
                (await nc.jetstream().stream_info(s)).state.last_seq
                for s in subjects.input_streams()
            ]
    assert fast["processes"] == full["processes"] == 2
    assert fast["entities"] == full["entities"] == len(oracle.network.states)
    assert fast["messages"] == 0  # the snapshots were taken at the end
    assert full["messages"] == sum(ends)
    used = fast["snapshots"]
    assert isinstance(used, list)
    assert sorted(s["streams"][0] for s in used if s["used"]) == subjects.input_streams()
    async with await open_store(cfg, data) as stores:
        rows = await stores.load_entities(list(oracle.network.states))
    assert all(
        msgspec.msgpack.decode(rows[key].state, type=type(want)) == want
        for key, want in oracle.network.states.items()
    )
    files = partition_files(store_path(cfg, data))
    per_file = [set(_rows(path, "SELECT kind, id FROM entities")) for path in files]
    assert all(per_file)
    assert not per_file[0] & per_file[1]


async def test_a_router_process_refuses_a_store_of_another_partitioning_with_its_reason(
    tmp_path: Path, nats_url: str
) -> None:
    """``caresync up`` checks the layout before it starts its other processes; one started
    anyway on such a store (by hand, or after a change under it) exits 1 with the reason."""
    data = tmp_path / "data"
    async with await PartitionedStore.open(data / "caresync.db", STREAMS[:2]):
        pass
    up = DataDirLock(data)
    up.acquire("a caresync up, for this test")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
        env |= {"CARESYNC_STREAMS__PARTITIONS": "3", "CARESYNC_ROUTER__PROCESSES": "2"}
        command = [CARESYNC, "router-process", "--group", "1", "--parent-pid", str(os.getpid())]
        command += ["--nats", nats_url, "--data-dir", str(data)]
        with anyio.fail_after(30):
            done = await anyio.run_process(command, env=env, check=False)
    finally:
        up.release()
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "written for 2 partition(s), the configuration has streams.partitions = 3" in err
    assert "Traceback" not in err
