"""The simulated billing, ERP and supply systems against the real nats-server and SQLite."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.errors
import orjson
import pytest
from harness import stream_messages, wait_for
from nats.aio.client import Client as NatsClient
from nats.js import api

from caresync.codecs import decode_envelope, encode_envelope, make_envelope
from caresync.sim import FaultBoard, SimAlreadyRunning, SimServer, SimSettings

pytestmark = pytest.mark.anyio

CARESYNC = str(Path(sys.executable).parent / "caresync")


@dataclass
class Sim:
    """A running simulator, a client connection, and where its records are."""

    server: SimServer
    nc: NatsClient
    prefix: str
    router_prefix: str
    db: Path

    async def call(
        self,
        system: str,
        operation: str,
        data: Any,
        *,
        key: str | None = None,
        id: str | None = None,
        kind: str | None = None,
        timeout_s: float = 5.0,
    ) -> dict[str, Any]:
        env = make_envelope(
            id=id or str(uuid.uuid4()),
            kind=kind or f"{system}.{operation}",
            entity="E1",
            payload=data,
        )
        headers = {"Idempotency-Key": key} if key else None
        return await self.raw(system, operation, encode_envelope(env), headers, timeout_s)

    async def raw(
        self,
        system: str,
        operation: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        timeout_s: float = 5.0,
    ) -> dict[str, Any]:
        subject = f"{self.prefix}.{system}.{operation}"
        reply = await self.nc.request(subject, body, timeout=timeout_s, headers=headers)
        result: dict[str, Any] = orjson.loads(reply.data)
        return result

    async def control(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = await self.nc.request(f"{self.prefix}.control.{op}", orjson.dumps(body), timeout=10)
        result: dict[str, Any] = orjson.loads(reply.data)
        return result

    def rows(self, system: str, operation: str | None = None) -> list[sqlite3.Row]:
        """The simulator's own records, read from its SQLite file."""
        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            sql = "SELECT * FROM records WHERE system = ?"
            args: tuple[str, ...] = (system,)
            if operation is not None:
                sql, args = sql + " AND operation = ?", (system, operation)
            return conn.execute(sql + " ORDER BY rowid", args).fetchall()
        finally:
            conn.close()


@asynccontextmanager
async def running_sim(nats_url: str, db: Path, prefix: str) -> AsyncIterator[Sim]:
    settings = SimSettings(sim_prefix=prefix, router_prefix=prefix + "r", slow_delay_s=0.5)
    nc = await nats.connect(nats_url)
    try:
        async with SimServer(nats_url, db, settings) as server:
            yield Sim(server, nc, prefix, prefix + "r", db)
    finally:
        await nc.close()


@pytest.fixture
async def sim(nats_url: str, tmp_path: Path, unique_prefix: str) -> AsyncIterator[Sim]:
    async with running_sim(nats_url, tmp_path / "sim.db", unique_prefix) as running:
        yield running


def po(po_id: str, quantity: int = 40) -> dict[str, Any]:
    return {
        "po_id": po_id,
        "facility_id": "MAIN",
        "item_id": "gauze",
        "supplier_id": "ACME",
        "quantity": quantity,
        "unit_cost": 1.25,
    }


def demand(*lines: tuple[str, str, int]) -> dict[str, Any]:
    """An ERP demand request: (item, date, quantity) lines at MAIN."""
    return {
        "facility_id": "MAIN",
        "appointment_id": "A1",
        "lines": [{"item_id": i, "date": d, "quantity": q} for i, d, q in lines],
    }


def stock_move(*lines: tuple[str, int]) -> dict[str, Any]:
    """A supply reservation or consumption request: (item, quantity) lines at F."""
    return {
        "facility_id": "F",
        "appointment_id": "A1",
        "lines": [{"item_id": i, "quantity": q} for i, q in lines],
    }


async def capture_inputs(sim: Sim) -> str:
    """A stream storing what the simulators send to the router's input subjects."""
    js = sim.nc.jetstream()
    name = sim.router_prefix.upper() + "_IN"
    await js.add_stream(api.StreamConfig(name=name, subjects=[f"{sim.router_prefix}.in.>"]))
    return name


def test_public_facade_exports_what_it_lists() -> None:
    import caresync.sim as facade

    assert [name for name in facade.__all__ if not hasattr(facade, name)] == []
    assert {"SimServer", "SimSettings", "Records", "FaultBoard"} <= set(facade.__all__)


# -- faults (pure) --------------------------------------------------------------------------


def test_fault_board_expires_replaces_and_heals() -> None:
    board = FaultBoard()
    board.fail("erp", "down", for_s=5, now_s=100)
    fault = board.current("erp", 104.9)
    assert fault is not None
    assert fault.mode == "down"
    assert fault.remaining_s(104) == 1
    assert board.current("erp", 105) is None
    assert board.current("erp", 101) is None  # an expired fault is gone for good
    board.fail("billing", "slow", for_s=10, now_s=0, delay_s=0.3)
    board.fail("billing", "errors", for_s=1, now_s=0)
    replaced = board.current("billing", 0.5)
    assert replaced is not None
    assert replaced.mode == "errors"
    assert replaced.delay_s == 0
    assert board.heal("billing") == replaced
    assert board.current("billing", 0.5) is None
    assert board.heal("billing") is None


# -- records and idempotency ----------------------------------------------------------------


async def test_repeated_key_is_a_duplicate_attempt_not_a_second_record(sim: Sim) -> None:
    first = await sim.call("erp", "purchase_order", po("po-1"), key="k-1")
    assert first == {
        "outcome": "created",
        "system": "erp",
        "operation": "purchase_order",
        "reference": "PO-000001",
        "attempts": 1,
    }
    # A retry: a new envelope id, the same idempotency key.
    again = await sim.call("erp", "purchase_order", po("po-1"), key="k-1")
    assert again["outcome"] == "duplicate"
    assert again["reference"] == "PO-000001"
    assert again["attempts"] == 2
    rows = sim.rows("erp")
    assert len(rows) == 1
    assert (rows[0]["key"], rows[0]["reference"], rows[0]["attempts"]) == ("k-1", "PO-000001", 2)
    assert json.loads(rows[0]["data"])["unit_cost"] == 1.25  # extra fields are kept

    # Without the header, the envelope id is the key.
    assert (await sim.call("erp", "purchase_order", po("po-2"), id="env-9"))["attempts"] == 1
    dup = await sim.call("erp", "purchase_order", po("po-2"), id="env-9")
    assert (dup["outcome"], dup["reference"]) == ("duplicate", "PO-000002")
    assert [r["key"] for r in sim.rows("erp")] == ["k-1", "env-9"]


async def test_different_keys_make_records_numbered_per_system_and_kind(sim: Sim) -> None:
    charge = {"appointment_id": "A1", "line_id": "L1", "code": "C1", "quantity": 1, "amount": 9.5}
    refs = [
        (await sim.call("erp", "purchase_order", po("po-1"), key="a"))["reference"],
        (await sim.call("erp", "purchase_order", po("po-2"), key="b"))["reference"],
        (await sim.call("billing", "charge", charge, key="a"))["reference"],
        (await sim.call("erp", "demand", demand(("x", "2027-01-02", 4)), key="c"))["reference"],
    ]
    assert refs == ["PO-000001", "PO-000002", "CHG-000001", "DMD-000001"]
    assert len(sim.rows("erp", "purchase_order")) == 2
    assert len(sim.rows("billing")) == 1


async def test_concurrent_repeats_of_one_key_make_one_record(sim: Sim) -> None:
    same: list[dict[str, Any]] = []

    async def send(n: int) -> None:
        same.append(await sim.call("erp", "purchase_order", po("po-1"), key="same"))
        other = await sim.call("erp", "purchase_order", po(f"other-{n}"), key=f"k{n}")
        assert other["outcome"] == "created"

    async with anyio.create_task_group() as tg:
        for n in range(40):
            tg.start_soon(send, n)
    assert sorted(r["attempts"] for r in same) == list(range(1, 41))
    assert len({r["reference"] for r in same}) == 1
    rows = sim.rows("erp")
    assert len(rows) == 41
    assert sorted(r["reference"] for r in rows) == [f"PO-{n:06d}" for n in range(1, 42)]


async def test_records_survive_a_restart(nats_url: str, tmp_path: Path, unique_prefix: str) -> None:
    db = tmp_path / "sim.db"
    async with running_sim(nats_url, db, unique_prefix) as first:
        assert (await first.call("erp", "purchase_order", po("po-1"), key="k"))["attempts"] == 1
    async with running_sim(nats_url, db, unique_prefix) as second:
        dup = await second.call("erp", "purchase_order", po("po-1"), key="k")
        assert (dup["outcome"], dup["reference"], dup["attempts"]) == ("duplicate", "PO-000001", 2)
        new = await second.call("erp", "purchase_order", po("po-2"), key="k2")
        assert new["reference"] == "PO-000002"


async def test_a_second_simulator_on_the_same_prefix_refuses_to_start(
    sim: Sim, nats_url: str, tmp_path: Path
) -> None:
    with pytest.raises(SimAlreadyRunning, match=sim.prefix):
        async with SimServer(nats_url, tmp_path / "other.db", SimSettings(sim_prefix=sim.prefix)):
            pass


# -- faults on the wire ---------------------------------------------------------------------


async def test_down_refuses_then_recovers_by_itself(sim: Sim) -> None:
    reply = await sim.control("fail", {"system": "erp", "for_s": 1.0, "mode": "down"})
    assert reply["fault"]["mode"] == "down"
    with pytest.raises(nats.errors.NoRespondersError):
        await sim.call("erp", "purchase_order", po("po-1"), key="k")
    # Billing is not affected by ERP's outage.
    assert (await sim.call("billing", "reversal", {"appointment_id": "A1"}))["attempts"] == 1

    async def erp_answers() -> bool:
        try:
            await sim.call("erp", "purchase_order", po("po-1"), key="k", timeout_s=1)
        except nats.errors.NoRespondersError:
            return False
        return True

    await wait_for(erp_answers, timeout_s=10, what="erp to come back after 1 s down")
    assert len(sim.rows("erp")) == 1
    report = await sim.control("report", {})
    assert report["systems"]["erp"]["fault"] is None


async def test_heal_ends_down_at_once(sim: Sim) -> None:
    await sim.control("fail", {"system": "supply", "for_s": 600, "mode": "down"})
    with pytest.raises(nats.errors.NoRespondersError):
        await sim.call("supply", "reservation", stock_move(("i", 2)))
    healed = await sim.control("heal", {"system": "supply"})
    assert healed["healed"] is True
    assert healed["fault"]["mode"] == "down"
    ok = await sim.call("supply", "reservation", stock_move(("i", -2), ("j", 1)))
    assert ok["reference"] == "RES-000001"


async def test_slow_answers_late_and_a_retry_is_a_duplicate(sim: Sim) -> None:
    await sim.control("fail", {"system": "erp", "for_s": 600, "mode": "slow", "delay_s": 0.6})
    started = time.monotonic()
    created = await sim.call("erp", "purchase_order", po("po-1"), key="k")
    assert time.monotonic() - started >= 0.55
    assert created["outcome"] == "created"
    # A caller that gives up before the answer retries; the ERP then sees the same key twice.
    with pytest.raises(nats.errors.TimeoutError):
        await sim.call("erp", "purchase_order", po("po-2"), key="k2", timeout_s=0.1)

    async def recorded() -> bool:
        return len(sim.rows("erp")) == 2

    await wait_for(recorded, what="the slow request to be recorded")
    assert (await sim.control("heal", {"system": "erp"}))["healed"] is True
    retry = await sim.call("erp", "purchase_order", po("po-2"), key="k2")
    assert (retry["outcome"], retry["reference"], retry["attempts"]) == (
        "duplicate",
        "PO-000002",
        2,
    )


async def test_errors_mode_answers_transient_errors_and_records_nothing(sim: Sim) -> None:
    await sim.control("fail", {"system": "billing", "for_s": 600, "mode": "errors"})
    reply = await sim.call("billing", "reversal", {"appointment_id": "A1"}, key="k")
    assert reply["transient"] is True
    assert "billing" in reply["error"]
    assert sim.rows("billing") == []
    report = await sim.control("report", {})
    assert report["systems"]["billing"]["operations"]["reversal"]["errors"] == 1
    assert report["systems"]["billing"]["fault"]["mode"] == "errors"
    await sim.control("heal", {"system": "billing"})
    assert (await sim.call("billing", "reversal", {"appointment_id": "A1"}, key="k"))[
        "outcome"
    ] == "created"


async def test_report_counts_created_duplicates_errors_and_refused(sim: Sim) -> None:
    readiness = {"appointment_id": "A1", "readiness": "ready", "payer_id": "P", "procedures": []}
    await sim.call("billing", "readiness", readiness, key="r1")
    await sim.call("billing", "readiness", readiness, key="r1")
    await sim.call("billing", "readiness", readiness, key="r1")
    await sim.call("billing", "readiness", {"appointment_id": "A1"}, key="bad")
    await sim.control("fail", {"system": "billing", "for_s": 600, "mode": "slow", "delay_s": 30})
    with pytest.raises(nats.errors.TimeoutError):
        await sim.call("billing", "charge", {}, timeout_s=0.2)
    await sim.control("fail", {"system": "billing", "for_s": 600, "mode": "down"})
    report = await sim.control("report", {})
    billing = report["systems"]["billing"]
    assert billing["operations"]["readiness"] == {
        "created": 1,
        "duplicates": 2,
        "errors": 1,
        "refused": 0,
    }
    assert billing["operations"]["charge"]["refused"] == 1  # the slow one, dropped going down
    assert (billing["created"], billing["duplicates"], billing["refused"]) == (1, 2, 1)
    assert billing["fault"]["mode"] == "down"
    assert report["systems"]["erp"]["created"] == 0


# -- bad input ------------------------------------------------------------------------------


async def test_hostile_input_gets_error_replies_and_the_simulator_keeps_running(
    sim: Sim,
) -> None:
    async def rejected(reply: dict[str, Any], *words: str) -> None:
        assert reply["transient"] is False, reply
        for word in words:
            assert word in reply["error"], reply

    await rejected(await sim.raw("erp", "purchase_order", b"{not json"), "malformed")
    await rejected(await sim.raw("erp", "purchase_order", b"\x93\x01\x02\x03"), "0x93")
    await rejected(await sim.raw("erp", "purchase_order", b""), "empty")
    no_data = encode_envelope(make_envelope(id="x", kind="erp.purchase_order", entity="E"))
    await rejected(await sim.raw("erp", "purchase_order", no_data), "no data")
    await rejected(await sim.call("erp", "purchase_order", {"po_id": "p"}), "facility_id")
    await rejected(await sim.call("erp", "purchase_order", [1, 2]), "object")
    await rejected(await sim.call("erp", "purchase_order", {**po("p"), "quantity": "9"}), "float")
    await rejected(await sim.call("erp", "purchase_order", po("p"), kind="erp.demand"), "kind")
    await rejected(await sim.call("erp", "frobnicate", {}), "unknown operation", "purchase_order")
    await rejected(await sim.call("erp", "a.b.c", {}), "unknown operation")
    await rejected(await sim.call("erp", "purchase_order", po("p"), key="k" * 300), "longer")
    # A key already used for another operation is not a duplicate of it.
    await sim.call("erp", "demand", demand(("x", "2027-01-02", 4)), key="shared")
    await rejected(await sim.call("erp", "posting", {}, key="shared"), "invalid data")
    posting = {"facility_id": "F", "cost_center": "CC1", "amount": 3}
    await rejected(await sim.call("erp", "posting", posting, key="shared"), "already used")
    await rejected(await sim.control("fail", {"system": "hr", "for_s": 1}), "system")
    await rejected(await sim.control("fail", {"system": "erp", "for_s": -1}), "for_s")
    await rejected(await sim.control("launch", {}), "unknown control operation")
    bad_body = await sim.nc.request(f"{sim.prefix}.control.fail", b"\xff", timeout=5)
    await rejected(orjson.loads(bad_body.data))

    assert len(sim.rows("erp")) == 1  # only the demand
    ok = await sim.call("erp", "purchase_order", po("p"))
    assert ok["outcome"] == "created"
    report = await sim.control("report", {})
    assert report["systems"]["erp"]["operations"]["frobnicate"]["errors"] == 1


async def test_demand_and_stock_moves_need_lines_each_complete(sim: Sim) -> None:
    async def rejected(operation: str, data: dict[str, Any], *words: str) -> None:
        system = "erp" if operation == "demand" else "supply"
        reply = await sim.call(system, operation, data)
        assert reply["transient"] is False, reply
        for word in ("invalid data", *words):
            assert word in reply["error"], reply

    ok = demand(("gauze", "2027-01-02", 4), ("knee-kit", "2027-01-02", -1))
    for operation in ("reservation", "consumption"):
        move = stock_move(("gauze", 4), ("knee-kit", -1))
        await rejected(operation, {k: v for k, v in move.items() if k != "lines"}, "lines")
        await rejected(operation, {**move, "lines": []}, "length >= 1", "$.lines")
        await rejected(operation, {**move, "lines": [{"quantity": 1}]}, "item_id", "$.lines[0]")
        await rejected(
            operation, {**move, "lines": [{"item_id": "", "quantity": 1}]}, "$.lines[0].item_id"
        )
        await rejected(
            operation,
            {**move, "lines": [*move["lines"], {"item_id": "x", "quantity": "2"}]},
            "float",
            "$.lines[2].quantity",
        )
        await rejected(operation, {**move, "lines": {"item_id": "x"}}, "array", "$.lines")
        await rejected(operation, {**move, "facility_id": ""}, "$.facility_id")
        # The old one-item shape is not a stock move any more.
        await rejected(operation, {"facility_id": "F", "item_id": "i", "quantity": 2}, "lines")
    await rejected("demand", {**ok, "lines": []}, "length >= 1")
    await rejected("demand", {**ok, "lines": [{"item_id": "g", "quantity": 1}]}, "date")
    await rejected(
        "demand", {**ok, "lines": [{"item_id": "g", "date": "d", "quantity": None}]}, "quantity"
    )
    await rejected(
        "demand", {"facility_id": "MAIN", "item_id": "g", "date": "d", "quantity": 1}, "lines"
    )
    assert sim.rows("erp") == []
    assert sim.rows("supply") == []

    created = await sim.call("erp", "demand", ok, key="d1")
    assert (created["outcome"], created["reference"]) == ("created", "DMD-000001")
    assert [orjson.loads(r["data"]) for r in sim.rows("erp")] == [ok]  # stored whole
    for n, operation in enumerate(("reservation", "consumption")):
        move = stock_move(("gauze", 4), ("knee-kit", -1))
        reply = await sim.call("supply", operation, move, key=f"m{n}")
        assert reply["outcome"] == "created", reply
    assert [orjson.loads(r["data"]) for r in sim.rows("supply")] == [move, move]


# -- feedback to caresync -------------------------------------------------------------------


async def test_new_po_is_acknowledged_to_the_router_once(sim: Sim) -> None:
    stream = await capture_inputs(sim)
    js = sim.nc.jetstream()
    await sim.call("erp", "purchase_order", po("po-7", quantity=12), key="k", id="effect-1")
    await sim.call("erp", "purchase_order", po("po-7", quantity=12), key="k")

    async def acked() -> bool:
        return len(await stream_messages(js, stream, ">")) >= 1

    await wait_for(acked, what="the PO acknowledgement")
    # goods received is queued after the ack: once it is in, every ack was sent.
    received = await sim.control("receive", {"po": "PO-000001"})
    assert received == {
        "id": "received:po-7",
        "subject": f"{sim.router_prefix}.in.item.gauze@MAIN",
        "published": True,
    }
    messages = await stream_messages(js, stream, ">")
    assert [m.subject for m in messages] == [f"{sim.router_prefix}.in.item.gauze@MAIN"] * 2
    ack, _ = decode_envelope(messages[0].data or b"")
    assert (ack.id, ack.kind, ack.entity) == ("ack:po-7", "item.po_acknowledged", "gauze@MAIN")
    assert ack.causation_id == "effect-1"
    assert messages[0].headers is not None
    assert messages[0].headers["Nats-Msg-Id"] == "ack:po-7"
    assert orjson.loads(ack.payload_bytes) == {
        "po_id": "po-7",
        "reference": "PO-000001",
        "supplier_id": "ACME",
        "quantity": 12,
    }
    goods, _ = decode_envelope(messages[1].data or b"")
    assert (goods.id, goods.kind) == ("received:po-7", "item.goods_received")
    assert orjson.loads(goods.payload_bytes) == {
        "po_id": "po-7",
        "reference": "PO-000001",
        "quantity": 12,
    }
    unknown = await sim.control("receive", {"po": "po-404"})
    assert unknown["transient"] is False
    assert "po-404" in unknown["error"]


async def test_feedback_waits_for_the_input_stream(sim: Sim) -> None:
    await sim.call("erp", "purchase_order", po("po-1"), key="k")
    report = await sim.control("report", {})
    assert report["feedback"]["sent"] == 0  # no stream captures cs.in yet: the ack waits
    stream = await capture_inputs(sim)
    js = sim.nc.jetstream()

    async def delivered() -> bool:
        return len(await stream_messages(js, stream, ">")) == 1

    await wait_for(delivered, what="the queued acknowledgement after the stream appeared")
    assert (await sim.control("report", {}))["feedback"] == {"sent": 1, "pending": 0}


async def test_claim_status_flows_back_to_the_appointment(sim: Sim) -> None:
    stream = await capture_inputs(sim)
    unknown = await sim.control("claim", {"appointment_id": "A9", "status": "released"})
    assert "A9" in unknown["error"]
    await sim.call("billing", "readiness", {"appointment_id": "A 1.5", "readiness": "ready"})
    denied = await sim.control(
        "claim", {"appointment_id": "A 1.5", "status": "denied", "reason": "no auth"}
    )
    assert denied["published"] is True
    assert denied["id"] == "claim:A 1.5:denied:1"
    released = await sim.control("claim", {"appointment_id": "A 1.5", "status": "released"})
    assert released["id"] == "claim:A 1.5:released:2"
    messages = await stream_messages(sim.nc.jetstream(), stream, ">")
    assert [m.subject for m in messages] == [f"{sim.router_prefix}.in.billing.A%201%2E5"] * 2
    envs = [decode_envelope(m.data or b"")[0] for m in messages]
    assert [e.kind for e in envs] == ["billing.claim_status"] * 2
    assert envs[0].entity == "A 1.5"
    assert orjson.loads(envs[0].payload_bytes) == {
        "appointment_id": "A 1.5",
        "status": "denied",
        "claim_id": "CLM-000001",
        "reason": "no auth",
    }
    assert orjson.loads(envs[1].payload_bytes)["claim_id"] == "CLM-000001"


# -- the command line -----------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
    return subprocess.run(
        [CARESYNC, *args], capture_output=True, text=True, timeout=30, env=env, check=False
    )


def test_cli_sim_fail_heal_and_report(nats_url: str, tmp_path: Path, unique_prefix: str) -> None:
    where = ["--nats", nats_url, "--data-dir", str(tmp_path), "--sim-prefix", unique_prefix]
    missing = _cli("sim", "report", *where)
    assert missing.returncode == 1
    assert "no simulator" in missing.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
    with (tmp_path / "sim.log").open("w") as log:
        proc = subprocess.Popen(
            [CARESYNC, "sim", *where], stdout=subprocess.PIPE, stderr=log, text=True, env=env
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "ready" in line, line
        assert str(tmp_path / "sim.db") in line
        fail = _cli("sim", "fail", "erp", "--for", "60", "--mode", "slow", "--delay=1.5", *where)
        assert fail.returncode == 0, fail.stderr
        assert "erp: slow for 60 s, answering after 1.5 s" in fail.stdout
        report = _cli("sim", *where[:2], "report", "--json", *where[2:])
        assert report.returncode == 0, report.stderr
        systems = json.loads(report.stdout)["systems"]
        assert systems["erp"]["fault"]["mode"] == "slow"
        assert systems["billing"]["fault"] is None
        text = _cli("sim", "report", *where)
        assert "slow" in text.stdout
        assert "billing" in text.stdout
        heal = _cli("sim", "heal", "erp", *where)
        assert heal.returncode == 0
        assert "healed (was slow)" in heal.stdout
        receive = _cli("sim", "receive", "PO-000404", *where)
        assert receive.returncode == 1
        assert "PO-000404" in receive.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
