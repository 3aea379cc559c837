"""The SQLite store on a real file: atomic batches, chunked reads, outbox ledger, maintenance."""

from __future__ import annotations

import contextlib
import gc
import sqlite3
import threading
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from msgspec.structs import replace

from caresync.store import (
    AppliedRow,
    BatchWrite,
    EntityRow,
    OutboxRow,
    ParkedRow,
    Store,
    StoreError,
    StoreSchemaError,
    StoreUnavailable,
)
from caresync.store.batch_write import ROWS_PER_STATEMENT
from caresync.store.schema import SCHEMA_VERSION
from caresync.store.sqlite import DEFAULT_CACHE_MB, applied_query, entities_query, key_chunks

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "store.db")
    try:
        yield s
    finally:
        await s.close()


def sql(path: Path, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the file with a separate, plain sqlite3 connection."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        return conn.execute(query, params).fetchall()


def entity(id: str, state: bytes = b"s", *, kind: str = "appointment", seq: int = 1) -> EntityRow:
    return EntityRow(kind=kind, id=id, state=state, parked=False, seq=seq)


def applied(command_id: str, *, at: float = 1000.0, outcome: str = "accepted") -> AppliedRow:
    return AppliedRow(command_id, "appointment", "A1", 1, outcome, "", at)


def keys(*command_ids: str) -> list[tuple[str, str, str]]:
    """Dedupe keys of commands of appointment A1 (the entity ``applied`` rows are for)."""
    return [("appointment", "A1", c) for c in command_ids]


def outbox(key: str, payload: bytes = b"p", headers: dict[str, str] | None = None) -> OutboxRow:
    return OutboxRow(key=key, subject=f"cs.int.billing.{key}", payload=payload, headers=headers)


def parked(seq: int, *, id: str = "W1", data: bytes = b"raw") -> ParkedRow:
    return ParkedRow(
        kind="widget",
        id=id,
        stream="CARESYNC_IN",
        seq=seq,
        command_id=f"w-{seq}",
        subject=f"cs.in.widget.{id}",
        data=data,
        headers={"X-Trace": "t1"},
        reason="RuntimeError: boom",
        failures=3,
        parked_at=1234.5,
    )


def full_batch() -> BatchWrite:
    return BatchWrite(
        entities=[entity("A1", b"state-1", seq=5), entity("F1", b"erp", kind="erp", seq=6)],
        applied=[applied("c1"), applied("c2", outcome="rejected")],
        outbox=[outbox("k1", headers={"H": "v"}), outbox("k2", b"p2")],
        parked=[parked(7)],
        offsets={"CARESYNC_IN": 7},
    )


# -- open ---------------------------------------------------------------------------------------
async def test_open_creates_a_wal_database_with_its_schema_version(store: Store) -> None:
    assert sql(store.path, "PRAGMA journal_mode") == [("wal",)]
    assert sql(store.path, "SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    assert await store.counts() == {
        "entities": 0,
        "parked_entities": 0,
        "parked_messages": 0,
        "applied": 0,
        "outbox_pending": 0,
        "outbox_sent": 0,
        "outbox_failed": 0,
    }


async def _cache_size(store: Store) -> Any:
    async with store.connection.execute("PRAGMA cache_size") as cur:
        return await cur.fetchone()


async def test_the_committing_connection_has_the_page_cache_asked_for(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "default.db") as default:
        assert await _cache_size(default) == (-DEFAULT_CACHE_MB * 1024,)
    async with await Store.open(tmp_path / "small.db", cache_mb=5) as small:
        assert await _cache_size(small) == (-5 * 1024,)


async def test_reopening_the_same_file_sees_committed_data(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "store.db"
    async with await Store.open(path) as first:
        await first.commit(full_batch())
    async with await Store.open(path) as second:
        assert (await second.entity("appointment", "A1")) is not None
        assert await second.offset("CARESYNC_IN") == 7
        assert await second.outcome("appointment", "A1", "c2") == ("rejected", "")
        assert [e.key for e in await second.pending_effects()] == ["k1", "k2"]
        assert len(await second.parked()) == 1


async def _open_failing(path: Path) -> tuple[str, list[warnings.WarningMessage]]:
    """Open a store that must fail with StoreSchemaError; return its message and the warnings.

    A connection the failed open did not close warns when collected and keeps a (non-daemon)
    worker thread: collect it here, while the event loop runs, so nothing leaks out of the test.
    The exception is not kept: its traceback would keep the connection alive.
    """
    baseline = set(threading.enumerate())
    message = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opened = await Store.open(path)
        except StoreSchemaError as exc:
            message = str(exc)
        else:
            await opened.close()
        gc.collect()
        with anyio.fail_after(5):
            while True:  # the worker thread of a collected connection ends soon after
                if not set(threading.enumerate()) - baseline:
                    break
                await anyio.sleep(0.01)
    assert message, "Store.open did not raise StoreSchemaError"
    return message, caught


def _bump_schema(path: Path) -> None:
    sql(path, "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))


async def test_a_schema_version_newer_than_the_build_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    await (await Store.open(path)).close()
    _bump_schema(path)

    message, _ = await _open_failing(path)

    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert issubclass(StoreSchemaError, StoreError)


async def test_a_failed_open_closes_its_connection(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    await (await Store.open(path)).close()
    _bump_schema(path)

    _, caught = await _open_failing(path)

    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


# -- commit -------------------------------------------------------------------------------------
async def test_commit_writes_every_part_of_a_batch(store: Store) -> None:
    await store.commit(full_batch())

    a1 = await store.entity("appointment", "A1")
    assert a1 is not None
    assert (a1.state, a1.parked, a1.seq) == (b"state-1", False, 5)
    assert [(e.kind, e.id) for e in await store.entities()] == [
        ("appointment", "A1"),
        ("erp", "F1"),
    ]
    assert await store.outcome("appointment", "A1", "c1") == ("accepted", "")
    assert await store.outcome("appointment", "A1", "c2") == ("rejected", "")
    assert await store.outcome("appointment", "A1", "c3") is None
    pending = await store.pending_effects()
    assert [(p.key, p.subject, p.payload, p.headers, p.attempts) for p in pending] == [
        ("k1", "cs.int.billing.k1", b"p", {"H": "v"}, 0),
        ("k2", "cs.int.billing.k2", b"p2", None, 0),
    ]
    [row] = await store.parked("widget", "W1")
    assert row == parked(7)
    assert await store.offset("CARESYNC_IN") == 7
    counts = await store.counts()
    assert (counts["entities"], counts["applied"], counts["outbox_pending"]) == (2, 2, 2)
    assert (counts["parked_messages"], counts["parked_entities"]) == (1, 0)


async def test_an_empty_batch_writes_nothing(store: Store) -> None:
    await store.commit(BatchWrite())
    assert (await store.counts())["applied"] == 0


def _break(write: BatchWrite, part: str) -> None:
    """Make one row of ``part`` fail inside the transaction.

    The outbox and parked rows are written with INSERT OR IGNORE, which skips NOT NULL
    violations instead of failing: an outbox row fails with a value SQLite cannot bind.
    """
    if part == "entities":  # the first statement
        write.entities.append(replace(entity("BAD"), state=None))  # type: ignore[arg-type]
    elif part == "outbox":
        write.outbox.append(replace(outbox("bad"), payload=object()))  # type: ignore[arg-type]
    elif part == "failed":
        write.failed.append(("k0", None))  # type: ignore[arg-type]
    else:  # the last statement
        write.offsets["OTHER"] = None  # type: ignore[assignment]


@pytest.mark.parametrize("part", ["entities", "outbox", "failed", "offsets"])
async def test_a_commit_failing_midway_leaves_nothing_written(store: Store, part: str) -> None:
    await store.commit(
        BatchWrite(
            entities=[entity("A1", b"v1", seq=3)],
            outbox=[outbox("k0")],
            offsets={"CARESYNC_IN": 3},
        )
    )
    before = await store.counts()
    write = full_batch()
    write.entities[0] = entity("A1", b"v2", seq=7)
    write.sent = [("k0", 99.0)]
    _break(write, part)

    with pytest.raises(StoreError, match="committing a batch") as info:
        await store.commit(write)

    assert not isinstance(info.value, StoreUnavailable)  # retrying cannot help
    assert await store.counts() == before
    a1 = await store.entity("appointment", "A1")
    assert a1 is not None
    assert (a1.state, a1.seq) == (b"v1", 3)
    assert await store.offset("CARESYNC_IN") == 3
    assert await store.outcome("appointment", "A1", "c1") is None
    assert [p.key for p in await store.pending_effects()] == ["k0"]
    assert await store.parked() == []
    # the connection is not left inside the failed transaction
    await store.commit(full_batch())
    assert await store.offset("CARESYNC_IN") == 7


async def test_a_commit_cancelled_while_waiting_for_the_write_lock_commits_nothing(
    store: Store,
) -> None:
    blocker = sqlite3.connect(store.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # hold the write lock: the store's BEGIN waits
        with anyio.move_on_after(0.2) as scope:
            await store.commit(BatchWrite(offsets={"IN": 1}))
        assert scope.cancelled_caught
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert sql(store.path, "SELECT seq FROM offsets") == []


async def test_the_store_still_commits_after_a_commit_was_cancelled_in_begin(
    store: Store,
) -> None:
    blocker = sqlite3.connect(store.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with anyio.move_on_after(0.2):
            await store.commit(BatchWrite(offsets={"IN": 1}))
    finally:
        blocker.execute("ROLLBACK")  # the store's queued BEGIN now gets the lock
        blocker.close()

    await store.commit(BatchWrite(offsets={"IN": 2}))

    assert sql(store.path, "SELECT stream, seq FROM offsets") == [("IN", 2)]


async def test_the_first_outcome_of_a_command_id_wins(store: Store) -> None:
    await store.commit(BatchWrite(applied=[applied("c1")]))
    await store.commit(BatchWrite(applied=[replace(applied("c1"), outcome="rejected")]))
    assert await store.outcome("appointment", "A1", "c1") == ("accepted", "")


# -- chunked reads ------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 2, 3, 5, 100, 500, 512, 513, 1300])
def test_key_chunks_fill_power_of_two_statements_with_the_last_key(count: int) -> None:
    asked = [("appointment", f"A{i}", f"c{i}") for i in range(count)]
    chunks = list(key_chunks(asked))
    seen: list[tuple[str, ...]] = []
    for n, params in chunks:
        assert n & (n - 1) == 0
        assert n <= 512
        assert len(params) == 3 * n
        got = [tuple(params[i : i + 3]) for i in range(0, len(params), 3)]
        real = list(dict.fromkeys(got))
        # Every key once, in order; then only the chunk's last key again, to fill it.
        assert got[: len(real)] == real
        assert set(got[len(real) :]) <= {real[-1]}
        seen += real
    assert seen == asked
    assert len(chunks) == -(-count // 512)


async def test_applied_among_finds_exactly_the_known_ids_across_chunks(store: Store) -> None:
    known = [f"cmd-{i:05d}" for i in range(0, 2400, 2)]  # 1200 ids
    await store.commit(BatchWrite(applied=[applied(c) for c in known]))
    asked = [f"cmd-{i:05d}" for i in range(1500)]  # 750 known, 750 unknown, interleaved

    found = await store.applied_among(keys(*asked))

    assert found == set(keys(*(c for c in asked if c in set(known))))
    assert len(found) == 750
    assert await store.applied_among(keys(*known)) == set(keys(*known))
    assert await store.applied_among([]) == set()
    # Per entity: the same command id for another entity is not a duplicate.
    assert await store.applied_among([("appointment", "A2", known[0])]) == set()


async def test_load_entities_returns_every_stored_key_across_chunks(store: Store) -> None:
    rows = [entity(f"E{i}", f"a{i}".encode()) for i in range(600)]
    rows += [entity(f"E{i}", f"b{i}".encode(), kind="billing") for i in range(0, 1000, 2)]
    await store.commit(BatchWrite(entities=rows))
    asked = [(k, f"E{i}") for i in range(1000) for k in ("appointment", "billing")]  # 2000 keys

    found = await store.load_entities(asked)

    assert set(found) == {(r.kind, r.id) for r in rows}
    assert len(found) == 1100
    assert found[("appointment", "E599")].state == b"a599"
    assert found[("billing", "E998")].state == b"b998"
    assert ("billing", "E1") not in found
    assert await store.load_entities([]) == {}


# -- outbox -------------------------------------------------------------------------------------
async def test_batches_larger_than_one_insert_statement_write_every_row_in_order(
    store: Store,
) -> None:
    """Rows go in statements of ROWS_PER_STATEMENT rows, the rest one by one: every row
    lands, upserts and conflicts behave as row by row, and the returned outbox seq range
    covers exactly the rows this batch inserted."""
    n = 2 * ROWS_PER_STATEMENT + 5
    await store.commit(BatchWrite(outbox=[outbox("k0", b"old")], entities=[entity("E0")]))
    before = sql(store.path, "SELECT max(seq) FROM outbox")[0][0]
    write = BatchWrite(
        entities=[entity(f"E{i}", f"s{i}".encode(), seq=i) for i in range(n)],
        applied=[applied(f"c{i}") for i in range(n)] + [applied("c0", outcome="rejected")],
        outbox=[outbox(f"k{i}", f"p{i}".encode()) for i in range(n)],
    )
    inserted = await store.commit(write)
    assert inserted is not None
    assert inserted[0] == before + 1
    in_range = sql(
        store.path, "SELECT key FROM outbox WHERE seq BETWEEN ? AND ? ORDER BY seq", inserted
    )
    assert in_range == [(f"k{i}",) for i in range(1, n)]  # k0 was there: not inserted again
    rows = sql(store.path, "SELECT key, payload FROM outbox ORDER BY seq")
    assert rows == [("k0", b"old")] + [(f"k{i}", f"p{i}".encode()) for i in range(1, n)]
    states = sql(store.path, "SELECT id, state, seq FROM entities")
    assert sorted(states) == sorted((f"E{i}", f"s{i}".encode(), i) for i in range(n))
    assert len(await store.applied_among(keys(*(f"c{i}" for i in range(n))))) == n
    assert await store.outcome("appointment", "A1", "c0") == ("accepted", "")  # first wins


async def test_a_sent_effect_stays_sent_when_written_again(store: Store) -> None:
    await store.commit(BatchWrite(outbox=[outbox("k1", b"first"), outbox("k2", b"first")]))
    await store.commit(BatchWrite(sent=[("k1", 1.0)]))

    # A replay writes the same effects (same keys) again.
    await store.commit(BatchWrite(outbox=[outbox("k1", b"again"), outbox("k2", b"again")]))

    assert [p.key for p in await store.pending_effects()] == ["k2"]
    counts = await store.counts()
    assert (counts["outbox_sent"], counts["outbox_pending"]) == (1, 1)
    assert sql(store.path, "SELECT key, payload, status FROM outbox ORDER BY key") == [
        ("k1", b"first", "sent"),
        ("k2", b"first", "pending"),
    ]


async def test_sent_and_failed_marks_update_the_status(store: Store) -> None:
    await store.commit(BatchWrite(outbox=[outbox("k1"), outbox("k2"), outbox("k3")]))

    await store.commit(BatchWrite(sent=[("k1", 42.5)], failed=[("k2", "no stream for x")]))

    assert [p.key for p in await store.pending_effects()] == ["k3"]
    counts = await store.counts()
    assert (counts["outbox_sent"], counts["outbox_failed"], counts["outbox_pending"]) == (1, 1, 1)
    assert sql(
        store.path, "SELECT key, status, sent_at, attempts, error FROM outbox ORDER BY key"
    ) == [
        ("k1", "sent", 42.5, 1, ""),
        ("k2", "failed", None, 1, "no stream for x"),
        ("k3", "pending", None, 0, ""),
    ]


async def test_pending_effects_come_oldest_first_and_page_by_seq(store: Store) -> None:
    keys = ["zeta", "alpha", "mid", "b", "a", "y", "c", "x", "q", "r"]
    for i in range(0, 10, 4):  # three commits
        await store.commit(BatchWrite(outbox=[outbox(k) for k in keys[i : i + 4]]))
    await store.commit(BatchWrite(sent=[("y", 1.0)]))

    pages: list[list[str]] = []
    after = 0
    while page := await store.pending_effects(limit=4, after_seq=after):
        pages.append([p.key for p in page])
        seqs = [p.seq for p in page]
        assert seqs == sorted(seqs)
        assert seqs[0] > after
        after = seqs[-1]

    assert pages == [["zeta", "alpha", "mid", "b"], ["a", "c", "x", "q"], ["r"]]


# -- offsets ------------------------------------------------------------------------------------
async def test_offsets_never_move_backwards(store: Store) -> None:
    assert await store.offset("IN") == 0
    await store.commit(BatchWrite(offsets={"IN": 10, "IN_P1": 2}))
    await store.commit(BatchWrite(offsets={"IN": 5}))
    assert await store.offset("IN") == 10
    await store.commit(BatchWrite(offsets={"IN": 12, "IN_P1": 1}))
    assert (await store.offset("IN"), await store.offset("IN_P1")) == (12, 2)


# -- maintenance --------------------------------------------------------------------------------
async def test_reset_state_drops_derived_state_but_keeps_the_outbox(store: Store) -> None:
    await store.commit(full_batch())
    await store.commit(BatchWrite(sent=[("k1", 1.0)]))

    await store.reset_state()

    assert await store.entities() == []
    assert await store.applied_among(keys("c1", "c2")) == set()
    assert await store.parked() == []
    assert await store.offset("CARESYNC_IN") == 0
    counts = await store.counts()
    assert (counts["outbox_sent"], counts["outbox_pending"]) == (1, 1)
    assert [p.key for p in await store.pending_effects()] == ["k2"]


async def test_prune_applied_removes_only_old_records(store: Store) -> None:
    await store.commit(
        BatchWrite(
            applied=[applied("old1", at=100.0), applied("old2", at=200.0), applied("new", at=300.0)]
        )
    )

    assert await store.prune_applied(older_than=250.0) == 2
    assert await store.applied_among(keys("old1", "old2", "new")) == set(keys("new"))
    assert await store.prune_applied(older_than=250.0) == 0
    assert await store.prune_applied(older_than=300.0) == 0  # strictly older only


def _written_at(store: Store, times: dict[str, float]) -> None:
    """Stamp outbox rows as written at these times (the store stamps them now)."""
    db = sqlite3.connect(store.path)
    try:
        with db:
            db.executemany(
                "UPDATE outbox SET created_at = ? WHERE key = ?",
                [(at, key) for key, at in times.items()],
            )
    finally:
        db.close()


async def test_prune_outbox_forgets_only_old_sent_effects(store: Store) -> None:
    keys = ["old", "older", "waiting", "new", "late"]
    await store.commit(BatchWrite(outbox=[outbox(key) for key in keys]))
    # Written in this order; "late" was stamped earlier than "new" (the clock went back).
    _written_at(store, {"old": 50.0, "older": 60.0, "waiting": 70.0, "new": 250.0, "late": 40.0})
    await store.commit(
        BatchWrite(sent=[("old", 100.0), ("older", 150.0), ("new", 300.0), ("late", 90.0)])
    )

    # Only rows written before the first one written since 200 are looked at: "late" waits.
    assert await store.prune_outbox(older_than=200.0) == 2
    assert [p.key for p in await store.pending_effects()] == ["waiting"]
    counts = await store.counts()
    assert (counts["outbox_sent"], counts["outbox_pending"]) == (2, 1)
    # Once nothing was written since the cut, every row is looked at.
    assert await store.prune_outbox(older_than=400.0) == 2
    counts = await store.counts()
    assert (counts["outbox_sent"], counts["outbox_pending"]) == (0, 1)


async def test_prune_outbox_reads_only_the_rows_before_the_first_recent_one(store: Store) -> None:
    # Pruning holds the write lock: a scan of a day's outbox there stalls every commit.
    await store.commit(BatchWrite(outbox=[outbox("a"), outbox("b")]))
    statements: list[str] = []
    await store.connection.set_trace_callback(statements.append)
    try:
        await store.prune_outbox(older_than=0.0)
    finally:
        await store.connection.set_trace_callback(None)
    ran = [sql for sql in statements if sql.lstrip().startswith(("SELECT", "DELETE"))]
    assert len(ran) == 2
    db = sqlite3.connect(store.path)
    try:
        plans = [
            " | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")) for sql in ran
        ]
    finally:
        db.close()
    assert "TEMP B-TREE" not in plans[0]  # in seq order: it stops at the first recent row
    assert "INTEGER PRIMARY KEY (rowid<?)" in plans[1]


async def test_an_effect_found_in_the_streams_is_recorded_as_sent(store: Store) -> None:
    await store.commit(BatchWrite(outbox=[replace(outbox("seen"), sent=True), outbox("new")]))
    assert [p.key for p in await store.pending_effects()] == ["new"]


@pytest.mark.parametrize(
    ("sql", "table"),
    [(entities_query(3), "entities"), (applied_query(3), "applied")],
)
async def test_hot_path_reads_look_keys_up_and_never_scan_the_table(
    store: Store, sql: str, table: str
) -> None:
    # A full scan per batch makes throughput fall as the table grows: pin the plan.
    db = sqlite3.connect(store.path)
    try:
        params = ["x"] * sql.count("?")
        plan = " | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    finally:
        db.close()
    assert f"SCAN {table}" not in plan
    assert "USING PRIMARY KEY" in plan
