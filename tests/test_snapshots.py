"""State snapshots in JetStream (router/snapshots.py, store/state_file.py).

The history of test_replay_fold (bookings, reschedules, completions, cancels, re-sent
duplicates, rejections, messages that do not decode, a second reference-data version, a poison
command that parks its entity) runs on a live router, which is snapshotted half-way while it
runs.  A rebuild from that snapshot plus the tail must write what a fold from the start writes,
with the store kept and with the store lost; a snapshot that is not sound here (other actor
code, a stream made again) is not used and says why.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats.js.errors
import pytest
from harness import client, load_refdata, make_config, running, wait_for
from nats.js import JetStreamContext
from test_replay_fold import REGISTRY, dump, history, publish, rebuild_env, refdata_v2, settled

from caresync.codecs import Subjects
from caresync.codecs.refdata import encode_refdata_set
from caresync.config import Config
from caresync.router import snapshots as snapshots_module
from caresync.router.embedded import EmbeddedNats
from caresync.router.provision import provision
from caresync.router.replay import RebuildReport, rebuild
from caresync.router.service import make_transport, subjects_for
from caresync.router.snapshots import (
    Snapshots,
    SnapshotTask,
    bucket_name,
    file_streams,
    logic_fingerprint,
    provision_bucket,
    restore_all,
)
from caresync.router.worker_settings import WorkerSettings
from caresync.store import BatchWrite, OutboxRow, PartitionedStore, Store
from caresync.store.state_file import read_state_info, restore_state_file, write_state_file

pytestmark = pytest.mark.anyio


@dataclass(frozen=True, slots=True)
class Snapshotted:
    cfg: Config
    url: str
    live: Path
    snapshot_offset: int
    end: int


@pytest.fixture(scope="module")
async def snapshotted(
    nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> Snapshotted:
    """The history on a live router, snapshotted (by its own task) between its two halves."""
    url, prefix = nats_server.url, "t" + secrets.token_hex(5)
    cfg = make_config(
        prefix,
        router={"batch_size": 50},
        supervision={"max_failures": 3, "backoff_initial_ms": 1.0, "backoff_max_ms": 5.0},
        snapshots={"every_s": 0.0, "min_messages": 1},
    )
    live = tmp_path_factory.mktemp("live")
    subjects = subjects_for(cfg)
    before, after = history(subjects)
    async with running(cfg, url, live, REGISTRY) as service, client(url) as nc:
        js = nc.jetstream()
        await load_refdata(js, service)
        await publish(url, before)
        await settled(service, url, cfg, live)
        assert service.router is not None
        task = SnapshotTask(
            Snapshots(js, subjects),
            file_streams(service.router.stores, subjects, [0]),
            every_s=0.0,
            min_messages=1,
        )
        assert await task.round() == 1
        assert await task.round() == 0  # nothing applied since: not due
        ack = await js.publish(service.subjects.refdata_subject, encode_refdata_set(refdata_v2()))

        async def known() -> bool:
            return service.catalog.latest_version >= ack.seq

        await wait_for(known, what="the second reference-data version")
        await publish(url, after)
        await settled(service, url, cfg, live)
        stream = subjects.input_stream(0)
        end = (await js.stream_info(stream)).state.last_seq
        info = await js.object_store(bucket_name(subjects))
        assert (await info.get_info(stream)).size > 0
    with sqlite3.connect(live / "caresync.db") as conn:
        assert conn.execute("SELECT seq FROM offsets").fetchone()[0] == end
    return Snapshotted(cfg, url, live, len(before), end)


def copy_of(s: Snapshotted, into: Path, *, with_store: bool) -> Path:
    into.mkdir()
    if with_store:
        for f in s.live.glob("caresync.db*"):
            shutil.copy(f, into / f.name)
    return into


async def rebuilt(
    s: Snapshotted, data_dir: Path, *, from_snapshot: bool
) -> tuple[RebuildReport, dict[str, list[tuple[Any, ...]]]]:
    async with rebuild_env(s, data_dir) as (transport, store, refdata):
        report = await rebuild(
            transport=transport,
            store=store,
            registry=REGISTRY,
            subjects=subjects_for(s.cfg),
            settings=WorkerSettings.from_config(s.cfg),
            refdata=refdata,
            snapshots=Snapshots(transport.js, subjects_for(s.cfg)) if from_snapshot else None,
        )
    return report, dump(data_dir / "caresync.db")


@pytest.mark.parametrize("with_store", [True, False], ids=["live-store", "store-lost"])
async def test_a_rebuild_from_the_snapshot_folds_only_the_tail_and_writes_the_same(
    snapshotted: Snapshotted, tmp_path: Path, with_store: bool
) -> None:
    s = snapshotted
    full_report, full = await rebuilt(
        s, copy_of(s, tmp_path / "full", with_store=True), from_snapshot=False
    )
    assert full_report.messages == s.end
    assert full_report.snapshots == ()
    report, fast = await rebuilt(
        s, copy_of(s, tmp_path / "snap", with_store=with_store), from_snapshot=True
    )
    (restored,) = report.snapshots
    assert restored.used, restored.reason
    assert restored.info is not None
    offset = restored.info.offsets[subjects_for(s.cfg).input_stream(0)]
    assert offset >= s.snapshot_offset  # the whole first half, at least
    assert report.messages == s.end - offset < s.end
    for table in ("entities", "applied", "parked", "offsets"):
        assert fast[table] == full[table], table
    assert fast["entities"] == dump(s.live / "caresync.db")["entities"]
    if with_store:
        assert fast["outbox"] == full["outbox"]
    else:
        # Only effects of the tail (and any the snapshot held unsent) are rebuilt; each of
        # them as the full fold has it, and all of them were sent.
        full_rows = {row[0]: row for row in full["outbox"]}
        assert fast["outbox"]
        assert all(row == full_rows[row[0]] for row in fast["outbox"])
        assert all(row[4] == "sent" for row in fast["outbox"])


async def test_a_snapshot_of_other_actor_code_is_not_used(
    snapshotted: Snapshotted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = snapshotted
    monkeypatch.setattr(snapshots_module, "_fingerprint", ["0123456789abcdef"])
    report, state = await rebuilt(
        s, copy_of(s, tmp_path / "d", with_store=True), from_snapshot=True
    )
    (restored,) = report.snapshots
    assert not restored.used
    assert "other actor or codec code" in restored.reason
    assert report.messages == s.end  # folded from the start instead
    assert state["entities"] == dump(s.live / "caresync.db")["entities"]


async def one_message_stream(js: JetStreamContext, subjects: Subjects) -> None:
    """The deployment's input stream (partition 0) with one message in it."""
    await js.add_stream(name=subjects.input_stream(0), subjects=[f"{subjects.prefix}.in.>"])
    await js.publish(f"{subjects.prefix}.in.x.1", b"{}")


async def test_a_stream_made_again_or_no_snapshot_at_all_is_a_fold_from_the_start(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(unique_prefix)
    subjects = subjects_for(cfg)
    stream = subjects.input_stream(0)
    async with client(nats_url) as nc, await Store.open(tmp_path / "caresync.db") as store:
        js = nc.jetstream()
        snapshots = Snapshots(js, subjects)
        missing = await snapshots.restore(store, [stream])
        assert not missing.used
        assert missing.reason == f"no bucket {bucket_name(subjects)}"
        assert await provision_bucket(js, subjects, cfg.streams) == (
            f"created object store {bucket_name(subjects)}"
        )
        assert await provision_bucket(js, subjects, cfg.streams) == ""  # there already
        await one_message_stream(js, subjects)
        await store.commit(BatchWrite(offsets={stream: 1}))
        none_yet = await snapshots.restore(store, [stream])
        assert none_yet.reason == f"no snapshot {stream!r} in the bucket"
        info = await snapshots.take(store.path, [stream])
        assert info.offsets == {stream: 1}
        assert (await snapshots.restore(store, [stream])).used
        await js.delete_stream(stream)
        await anyio.sleep(0.01)
        await one_message_stream(js, subjects)
        again = await snapshots.restore(store, [stream])
        assert not again.used
        assert again.reason == f"stream {stream} was created again after the snapshot"
        await store.commit(BatchWrite(offsets={stream: 1}))
        await snapshots.take(store.path, [stream])
        await js.publish(f"{subjects.prefix}.in.x.1", b"{}")
        await js.publish(f"{subjects.prefix}.in.x.1", b"{}")
        await js.purge_stream(stream, seq=3)  # seq 2, the first past the snapshot, is gone
        gone = await snapshots.restore(store, [stream])
        assert (
            gone.reason
            == f"stream {stream} no longer holds seq 2 past the snapshot (its first is 3)"
        )
        other = await snapshots.restore(store, [stream, "OTHER"])
        assert other.reason == f"no snapshot {stream + '+OTHER'!r} in the bucket"


async def test_unsent_effects_come_back_pending_unless_the_streams_have_them(
    tmp_path: Path,
) -> None:
    def row(key: str) -> OutboxRow:
        return OutboxRow(key, "cs.out.billing.x", b"{}", None, False)

    async with await Store.open(tmp_path / "live.db") as live:
        await live.commit(
            BatchWrite(outbox=[row("sent-later"), row("never-sent")], offsets={"IN": 7})
        )
    info = write_state_file(tmp_path / "live.db", tmp_path / "snap.db", streams=["IN"], logic="x")
    assert info.offsets == {"IN": 7}
    assert info.rows["outbox"] == 2
    assert read_state_info(tmp_path / "snap.db") == info
    async with await Store.open(tmp_path / "lost.db") as lost:
        await lost.commit(BatchWrite(outbox=[row("kept")], offsets={"IN": 99}))
        added = await restore_state_file(lost, tmp_path / "snap.db")
        assert sorted(added) == ["never-sent", "sent-later"]
        assert await lost.offset("IN") == 7
        assert (await lost.counts())["outbox_pending"] == 3


async def test_a_file_that_is_no_snapshot_is_named_as_such(tmp_path: Path) -> None:
    from caresync.store.state_file import SnapshotFileError

    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(SnapshotFileError, match=r"bad\.db"):
        read_state_info(bad)
    assert len(logic_fingerprint()) == 16


async def test_restored_unsent_effects_the_streams_have_are_recorded_sent(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(unique_prefix)
    subjects = subjects_for(cfg)
    stream = subjects.input_stream(0)

    def row(key: str) -> OutboxRow:
        return OutboxRow(key, f"{subjects.prefix}.out.billing.x", b"{}", None, False)

    async with client(nats_url) as nc:
        js = nc.jetstream()
        await provision_bucket(js, subjects, cfg.streams)
        await one_message_stream(js, subjects)
        async with await Store.open(tmp_path / "live.db") as live:
            await live.commit(
                BatchWrite(outbox=[row("sent-later"), row("never-sent")], offsets={stream: 1})
            )
        snapshots = Snapshots(js, subjects)
        await snapshots.take(tmp_path / "live.db", [stream])
        async with await Store.open(tmp_path / "lost.db") as lost:
            asked: list[int] = []

            async def in_streams() -> set[str]:
                asked.append(1)
                return {"sent-later"}

            stores = PartitionedStore.single(lost, [stream])
            (restored,) = await restore_all(snapshots, stores, subjects, in_streams)
            assert restored.used
            assert sorted(restored.added_pending) == ["never-sent", "sent-later"]
            assert asked == [1]
            counts = await lost.counts()
            assert (counts["outbox_pending"], counts["outbox_sent"]) == (1, 1)
            assert await lost.outbox_row("never-sent") is not None


async def test_the_router_snapshots_its_files_by_itself_and_a_failed_one_is_only_logged(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(unique_prefix, snapshots={"every_s": 0.2, "min_messages": 1})
    subjects = subjects_for(cfg)
    stream = subjects.input_stream(0)
    before, _ = history(subjects)
    async with running(cfg, nats_url, tmp_path, REGISTRY) as service, client(nats_url) as nc:
        js = nc.jetstream()
        await load_refdata(js, service)
        await publish(nats_url, before[:10])
        await settled(service, nats_url, cfg, tmp_path)
        bucket = await js.object_store(bucket_name(subjects))

        async def taken() -> bool:
            try:
                info = await bucket.get_info(stream)
            except nats.js.errors.ObjectNotFoundError:
                return False
            return bool(info.size)

        await wait_for(taken, what="the router's own snapshot")
        # A bucket gone: the next snapshot fails, the router goes on.
        assert service.router is not None
        failing = SnapshotTask(
            Snapshots(js, make_subjects_without_bucket(subjects)),
            file_streams(service.router.stores, subjects, [0]),
            every_s=0.0,
            min_messages=1,
        )
        assert await failing.round() == 0
        assert service.router.ready


def make_subjects_without_bucket(subjects: Subjects) -> Subjects:
    return dataclasses.replace(subjects, stream_prefix=subjects.stream_prefix + "X")


async def test_a_rebuild_of_a_stream_that_lost_its_oldest_messages_says_so(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(unique_prefix)
    subjects = subjects_for(cfg)
    stream = subjects.input_stream(0)
    async with client(nats_url) as nc, await Store.open(tmp_path / "caresync.db") as store:
        js = nc.jetstream()
        await provision(js, subjects, cfg.streams)
        for _ in range(3):
            await js.publish(subjects.command("appointment", "X"), b"not a command")
        await js.purge_stream(stream, seq=3)
        report = await rebuild(
            transport=make_transport(nc, cfg),
            store=store,
            registry=REGISTRY,
            subjects=subjects,
            settings=WorkerSettings.from_config(cfg),
            snapshots=Snapshots(js, subjects),
        )
    assert report.pending_effects == 1  # the dead letter of the one left
    (warning,) = report.warnings
    assert warning.startswith(f"{stream} starts at seq 3: the 2 messages before it are gone")
