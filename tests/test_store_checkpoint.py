"""The store's side connections: the write-ahead log checkpointed from the side, never inside a
batch commit, and the hot-path reads on a connection of their own."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import anyio
import pytest

from caresync.store import BatchWrite, EntityRow, Store
from caresync.store.sqlite import BACKGROUND_AUTOCHECKPOINT_PAGES

pytestmark = pytest.mark.anyio


def _batch(i: int) -> BatchWrite:
    rows = [EntityRow("appointment", f"A{i}-{k}", b"x" * 2000, False, i) for k in range(50)]
    return BatchWrite(entities=rows, offsets={"S": i})


async def test_checkpoint_copies_the_log_and_moves_the_automatic_one_away(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    async with await Store.open(path) as store:
        for i in range(1, 21):
            await store.commit(_batch(i))
        frames, copied = await store.checkpoint()
        assert frames > 0
        assert copied == frames  # nobody reads: the whole log is copied
        async with store.connection.execute("PRAGMA wal_autocheckpoint") as cur:
            row = await cur.fetchone()
        assert row is not None
        assert row[0] == BACKGROUND_AUTOCHECKPOINT_PAGES
        # Writes go on after it; a second checkpoint picks up only the new frames.
        await store.commit(_batch(21))
        frames_after, copied_after = await store.checkpoint()
        assert 0 < copied_after == frames_after
    # Everything committed is in the database file once the log is gone.
    with sqlite3.connect(path) as conn:
        count = conn.execute("SELECT count(*) FROM entities").fetchone()[0]
        offset = conn.execute("SELECT seq FROM offsets WHERE stream = 'S'").fetchone()[0]
    assert count == 21 * 50
    assert offset == 21


async def test_a_store_nobody_checkpoints_keeps_sqlite_default(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "store.db") as store:
        async with store.connection.execute("PRAGMA wal_autocheckpoint") as cur:
            row = await cur.fetchone()
        assert row is not None
        assert row[0] == 1000


def _sqlite_threads() -> set[threading.Thread]:
    return {
        t for t in threading.enumerate() if t.is_alive() and "_connection_worker_thread" in t.name
    }


async def test_concurrent_readers_open_one_read_connection_and_close_leaves_no_thread(
    tmp_path: Path,
) -> None:
    """Two partitions reading at once must not each open a reader: the one left over would
    never be closed and its thread would keep the process from exiting."""
    before = _sqlite_threads()  # earlier tests' threads may still be ending: not counted
    store = await Store.open(tmp_path / "store.db")
    await store.commit(_batch(1))
    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(store.load_entities, [("appointment", "A1-0")])
            tg.start_soon(store.applied_among, [("appointment", "A1-0", "c")])
    await store.checkpoint()
    mine = _sqlite_threads() - before
    assert len(mine) == 3  # writer, reader, checkpointer
    await store.close()
    await store.close()  # idempotent
    assert await store.checkpoint() == (0, 0)
    for _ in range(500):  # the threads end just after their connection closes
        if not any(t.is_alive() for t in mine):
            break
        await anyio.sleep(0.01)
    assert not any(t.is_alive() for t in mine)
