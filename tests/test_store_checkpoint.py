"""The write-ahead log is checkpointed from the side, never inside a batch commit."""

from __future__ import annotations

import sqlite3
from pathlib import Path

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
