"""The core scenario end to end, as an operator runs it: ``caresync up`` (nats-server, router,
connectors, simulators) as subprocesses, driven and inspected through the ``caresync`` CLI.

Assertions are made on the router's views (``caresync status ... --json``) and on the
simulators' OWN records (their SQLite ``records`` table in ``sim.db``): what billing, ERP and
supply actually hold, each exactly once.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

pytestmark = pytest.mark.anyio

CARESYNC = str(Path(sys.executable).parent / "caresync")
DEMO = Path(__file__).resolve().parent.parent / "config" / "demo"
SYSTEMS = ("billing", "supply", "erp")


# -- the demo network, read from its own CSV files ------------------------------------------
def _csv(name: str) -> list[dict[str, str]]:
    with (DEMO / name).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def card(procedure: str, provider: str = "") -> dict[str, int]:
    """Preference card of a procedure (the provider's own, else the general one)."""
    rows = _csv("preference_cards.csv")
    own = [r for r in rows if r["procedure_code"] == procedure and r["provider_id"] == provider]
    if not own:
        own = [r for r in rows if r["procedure_code"] == procedure and not r["provider_id"]]
    out: Counter[str] = Counter()
    for r in own:
        out[r["item_id"]] += int(r["quantity"])
    return dict(out)


UNIT_COST = {r["item_id"]: Decimal(r["unit_cost"]) for r in _csv("items.csv")}
CHARGE_CODE = {r["item_id"]: r["charge_code"] for r in _csv("items.csv")}
COST_CENTER = {r["facility_id"]: r["cost_center"] for r in _csv("facilities.csv")}


# -- processes and the CLI ------------------------------------------------------------------
def base_env(**extra: str) -> dict[str, str]:
    """The user's environment without CARESYNC_*, quiet logs, short retry back-off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
    env["CARESYNC_LOG__LEVEL"] = "warning"
    for system in SYSTEMS:
        env[f"CARESYNC_DOWNSTREAM__{system.upper()}__BACKOFF_MAX_MS"] = "400"
    env.update(extra)
    return env


async def start(args: list[str], env: dict[str, str], log: Path, ready: str) -> Process:
    """Start a long-running ``caresync`` command; return once it printed its ready line."""
    with log.open("ab") as handle:
        process = await anyio.open_process(
            [CARESYNC, *args], stdout=subprocess.PIPE, stderr=handle, env=env
        )
    assert process.stdout is not None
    try:
        with anyio.fail_after(30):
            line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 4096)
    except Exception as exc:
        await kill(process)
        tail = log.read_text(errors="replace")[-3000:]
        raise AssertionError(f"caresync {' '.join(args)} did not start: {exc!r}\n{tail}") from exc
    assert ready in line.decode(), line
    return process


async def stop(process: Process) -> None:
    """SIGTERM, then SIGKILL if it does not stop in time."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(15):
            await process.wait()
    await kill(process)


async def kill(process: Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()
    await process.aclose()


async def poll(
    fetch: Callable[[], Awaitable[Any]],
    test: Callable[[Any], bool],
    what: str,
    timeout_s: float = 30.0,
) -> Any:
    """Fetch until ``test`` holds; fail naming ``what`` and the last value after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await fetch()
        if value is not None and test(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {value}")
        await anyio.sleep(0.1)


@dataclass(frozen=True, slots=True)
class Record:
    """One record a simulated system holds (its own SQLite row)."""

    operation: str
    key: str
    reference: str
    attempts: int
    data: dict[str, Any]


@dataclass
class Cli:
    """The ``caresync`` command line against one deployment, and its simulators' records."""

    data_dir: Path
    env: dict[str, str]
    sim_db: Path
    sim_prefix: list[str] = field(default_factory=list)

    async def run(self, *args: str, check: bool = True) -> tuple[int, str]:
        with anyio.fail_after(60):
            result = await anyio.run_process(
                [CARESYNC, *args, "--data-dir", str(self.data_dir)], env=self.env, check=False
            )
        out = result.stdout.decode()
        if check and result.returncode != 0:
            raise AssertionError(
                f"caresync {' '.join(args)} exited {result.returncode}:\n{out}"
                f"{result.stderr.decode()}"
            )
        return result.returncode, out

    async def json(self, *args: str) -> Any:
        return json.loads((await self.run(*args, "--json"))[1])

    async def sim(self, *args: str) -> str:
        return (await self.run("sim", *args, *self.sim_prefix))[1]

    async def publish(self, kind: str, entity: str, command_id: str, data: dict[str, Any]) -> None:
        _, out = await self.run(
            "publish", "--kind", kind, "--entity", entity, "--id", command_id,
            "--data", json.dumps(data), "--json",
        )  # fmt: skip
        assert json.loads(out)["verdict"] in ("accepted", "published"), out

    async def view(self, kind: str, entity: str) -> dict[str, Any] | None:
        code, out = await self.run("status", kind, entity, "--json", check=False)
        return json.loads(out) if code == 0 else None

    async def until(
        self,
        kind: str,
        entity: str,
        test: Callable[[dict[str, Any]], bool],
        what: str,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        result: dict[str, Any] = await poll(
            lambda: self.view(kind, entity), test, f"{kind} {entity}: {what}", timeout_s
        )
        return result

    def records(self, system: str, operation: str | None = None) -> list[Record]:
        """The simulator's own records of ``system`` (optionally one operation), oldest first."""
        if not self.sim_db.exists():
            return []
        sql = "SELECT operation, key, reference, attempts, data FROM records WHERE system = ?"
        args: tuple[str, ...] = (system,)
        if operation is not None:
            sql, args = sql + " AND operation = ?", (system, operation)
        db = sqlite3.connect(f"file:{self.sim_db}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute(sql + " ORDER BY rowid", args).fetchall()
        finally:
            db.close()
        return [Record(op, key, ref, int(n), json.loads(data)) for op, key, ref, n, data in rows]

    def of(self, appointment: str, system: str, operation: str) -> list[Record]:
        return [
            r
            for r in self.records(system, operation)
            if r.data.get("appointment_id") == appointment
        ]

    def lines(self, appointment: str, system: str, operation: str) -> list[dict[str, Any]]:
        """The lines of an appointment's records of one operation, oldest first, each with the
        ``facility_id`` of its record; each record's lines are checked to be sorted."""
        out: list[dict[str, Any]] = []
        for r in self.of(appointment, system, operation):
            order = [(line["item_id"], line.get("date", "")) for line in r.data["lines"]]
            assert order, r
            assert order == sorted(set(order)), r
            out.extend({"facility_id": r.data["facility_id"], **line} for line in r.data["lines"])
        return out

    def net_supply(self, appointment: str) -> dict[tuple[str, str], int]:
        """Supply system's reservations of an appointment, net per (facility, item)."""
        net: Counter[tuple[str, str]] = Counter()
        for line in self.lines(appointment, "supply", "reservation"):
            net[(line["facility_id"], line["item_id"])] += int(line["quantity"])
        return {k: v for k, v in net.items() if v}

    def net_demand(self, appointment: str) -> dict[tuple[str, str, str], int]:
        """ERP demand of an appointment, net per (facility, item, date)."""
        net: Counter[tuple[str, str, str]] = Counter()
        for line in self.lines(appointment, "erp", "demand"):
            net[(line["facility_id"], line["item_id"], line["date"])] += int(line["quantity"])
        return {k: v for k, v in net.items() if v}

    async def load_demo(self) -> None:
        loaded = await self.json("refdata", "load", str(DEMO))
        assert (loaded["ok"], loaded["version"]) == (True, 1), loaded
        # The stock counts reach their item actors (and the router follows the new version).
        for key, on_hand in (("KNEE-KIT@MAIN-OR", 4), ("IOL-LENS@ASC-SOUTH", 3)):

            def counted(v: dict[str, Any], n: int = on_hand) -> bool:
                return bool(v["on_hand"] == n)

            await self.until("item", key, counted, "stock count")


def in_sync(view: dict[str, Any]) -> bool:
    return all(view["sync"][s]["state"] == "in_sync" for s in SYSTEMS)


def reservations(view: dict[str, Any]) -> dict[tuple[str, str], int]:
    return {(r["facility_id"], r["item_id"]): r["quantity"] for r in view["supply"]["reservations"]}


def demand(view: dict[str, Any]) -> dict[tuple[str, str, str], int]:
    return {
        (d["facility_id"], d["item_id"], d["date"]): d["quantity"] for d in view["erp"]["demand"]
    }


def book(
    procedure: str, facility: str, start: str, payer: str = "", provider: str = ""
) -> dict[str, Any]:
    proc: dict[str, str] = {"code": procedure}
    if provider:
        proc["provider_id"] = provider
    data: dict[str, Any] = {
        "procedures": [proc],
        "facility_id": facility,
        "room": "OR-3",
        "start": start,
        "duration_min": 90,
        "patient_class": "O",
        "patient_id": "MRN-1",
    }
    if payer:
        data["payer_id"] = payer
    return data


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[Cli]:
    """``caresync up`` in its own data dir: embedded nats-server, router, simulators."""
    data = tmp_path / "data"
    env = base_env()
    process = await start(["up", "--data-dir", str(data)], env, tmp_path / "up.log", "router ready")
    try:
        yield Cli(data, env, data / "sim.db")
    finally:
        await stop(process)


# -- 1. the scenario, step by step ----------------------------------------------------------
async def test_core_scenario_book_reschedule_cancel_close_charge_feedback(
    deployment: Cli,
) -> None:
    cs = deployment
    await cs.load_demo()
    general = card("27447")
    assert general["KNEE-KIT"] == 1
    assert general["BONE-CEMENT"] == 2

    # Booked: reservations at the facility, ERP demand for the date, readiness from payer rules.
    await cs.publish(
        "appointment.book",
        "A1",
        "book-A1",
        book("27447", "MAIN-OR", "2027-03-01T08:00:00-05:00", "NORTHWIND-HMO"),
    )
    v = await cs.until("appointment", "A1", lambda v: in_sync(v), "booked and in sync")
    assert v["status"] == "booked"
    assert v["billing"]["readiness"] == "pending_authorization"
    assert reservations(v) == {("MAIN-OR", i): q for i, q in general.items()}
    assert demand(v) == {("MAIN-OR", i, "2027-03-01"): q for i, q in general.items()}
    kit = await cs.view("item", "KNEE-KIT@MAIN-OR")
    assert kit is not None
    assert kit["reservations"] == {"A1": 1}
    assert kit["reserved"] == 1
    # ...and what the systems themselves hold.
    assert cs.net_supply("A1") == {("MAIN-OR", i): q for i, q in general.items()}
    assert cs.net_demand("A1") == {("MAIN-OR", i, "2027-03-01"): q for i, q in general.items()}
    # One record per system and operation for the booking, whatever the card's size.
    assert len(general) > 1
    assert [r.key for r in cs.of("A1", "supply", "reservation")] == [
        "A1/A1/book-A1:supply:MAIN-OR:supply:reservation"
    ]
    assert [r.key for r in cs.of("A1", "erp", "demand")] == ["A1/A1/book-A1:erp:MAIN-OR:erp:demand"]
    [ready] = cs.of("A1", "billing", "readiness")
    assert ready.data["readiness"] == "pending_authorization"
    assert ready.data["payer_id"] == "NORTHWIND-HMO"

    # Rescheduled to another facility and date: reservations and demand move.
    await cs.publish(
        "appointment.reschedule",
        "A1",
        "move-A1",
        {"start": "2027-03-08T09:30:00-05:00", "facility_id": "ASC-NORTH", "room": "ASC-2"},
    )
    v = await cs.until(
        "appointment", "A1", lambda v: v["facility"] == "ASC-NORTH" and in_sync(v), "moved"
    )
    assert v["room"] == "ASC-2"
    assert v["start"] == "2027-03-08T14:30:00+00:00"
    assert reservations(v) == {("ASC-NORTH", i): q for i, q in general.items()}
    assert demand(v) == {("ASC-NORTH", i, "2027-03-08"): q for i, q in general.items()}
    kit = await cs.until(
        "item", "KNEE-KIT@MAIN-OR", lambda v: "A1" not in v["reservations"], "old released"
    )
    assert kit["reserved"] == 0
    kit = await cs.view("item", "KNEE-KIT@ASC-NORTH")
    assert kit is not None
    assert kit["reservations"] == {"A1": 1}
    # Supply got a negative reservation at the old facility and a positive one at the new.
    await poll(
        lambda: anyio.to_thread.run_sync(cs.net_supply, "A1"),
        lambda net: net == {("ASC-NORTH", i): q for i, q in general.items()},
        "the supply system to hold A1 at ASC-NORTH only",
    )
    kit_moves = sorted(
        (line["facility_id"], line["quantity"])
        for line in cs.lines("A1", "supply", "reservation")
        if line["item_id"] == "KNEE-KIT"
    )
    assert kit_moves == [("ASC-NORTH", 1), ("MAIN-OR", -1), ("MAIN-OR", 1)]
    # ERP demand reversed at the old facility and date, re-added at the new.
    assert cs.net_demand("A1") == {("ASC-NORTH", i, "2027-03-08"): q for i, q in general.items()}
    cement = sorted(
        (line["facility_id"], line["date"], line["quantity"])
        for line in cs.lines("A1", "erp", "demand")
        if line["item_id"] == "BONE-CEMENT"
    )
    assert cement == [
        ("ASC-NORTH", "2027-03-08", 2),
        ("MAIN-OR", "2027-03-01", -2),
        ("MAIN-OR", "2027-03-01", 2),
    ]

    # Readiness is re-evaluated when the coverage changes.
    await cs.publish("appointment.modify", "A1", "payer-A1", {"payer_id": "SUMMIT-PPO"})
    v = await cs.until(
        "appointment",
        "A1",
        lambda v: v["billing"]["readiness"] == "ready" and in_sync(v),
        "readiness re-evaluated",
    )
    assert [r.data["readiness"] for r in cs.of("A1", "billing", "readiness")] == [
        "pending_authorization",
        "ready",
    ]

    # Cancelled: every reservation released, demand reversed, billing told to reverse.
    await cs.publish("appointment.cancel", "A1", "cancel-A1", {"reason": "patient request"})
    v = await cs.until(
        "appointment", "A1", lambda v: v["status"] == "cancelled" and in_sync(v), "cancelled"
    )
    assert v["supply"]["reservations"] == []
    assert v["erp"]["demand"] == []
    kit = await cs.until(
        "item", "KNEE-KIT@ASC-NORTH", lambda v: "A1" not in v["reservations"], "released"
    )
    assert cs.net_supply("A1") == {}
    assert cs.net_demand("A1") == {}
    [reversal] = cs.of("A1", "billing", "reversal")
    assert reversal.data["reason"] == "cancelled"

    # No-show, then deleted (entered in error): deleted is its own status.
    await cs.publish(
        "appointment.book",
        "A2",
        "book-A2",
        book("29881", "ASC-SOUTH", "2027-03-02T10:00:00-05:00", "BASIC-CARE"),
    )
    v = await cs.until("appointment", "A2", in_sync, "A2 booked")
    assert v["billing"]["readiness"] == "pending_authorization"
    assert cs.net_supply("A2") == {("ASC-SOUTH", i): q for i, q in card("29881").items()}
    await cs.publish("appointment.no_show", "A2", "noshow-A2", {})
    v = await cs.until(
        "appointment", "A2", lambda v: v["status"] == "no_show" and in_sync(v), "no-show"
    )
    assert v["supply"]["reservations"] == []
    assert v["erp"]["demand"] == []
    assert cs.net_supply("A2") == {}
    assert cs.net_demand("A2") == {}
    await cs.publish("appointment.delete", "A2", "delete-A2", {"reason": "entered in error"})
    await cs.until(
        "appointment", "A2", lambda v: v["status"] == "deleted" and in_sync(v), "deleted"
    )
    assert [r.data["reason"] for r in cs.of("A2", "billing", "reversal")] == ["no_show"]

    await cs.publish(
        "appointment.book",
        "A3",
        "book-A3",
        book("45378", "MAIN-OR", "2027-03-03T07:00:00-05:00", "BASIC-CARE"),
    )
    v = await cs.until("appointment", "A3", in_sync, "A3 booked")
    assert v["billing"]["readiness"] == "ready"
    await cs.publish("appointment.delete", "A3", "delete-A3", {})
    v = await cs.until(
        "appointment", "A3", lambda v: v["status"] == "deleted" and in_sync(v), "A3 deleted"
    )
    assert v["supply"]["reservations"] == []
    assert v["erp"]["demand"] == []
    assert cs.net_supply("A3") == {}
    assert cs.net_demand("A3") == {}
    assert [r.data["reason"] for r in cs.of("A3", "billing", "reversal")] == ["deleted"]

    # Completed: charges posted with supply lines; the provider's own card was reserved.
    patel = card("27447", "DR-PATEL")
    assert patel != general
    await cs.publish(
        "appointment.book",
        "A4",
        "book-A4",
        book("27447", "MAIN-OR", "2027-03-04T07:30:00-05:00", "SUMMIT-PPO", "DR-PATEL"),
    )
    v = await cs.until("appointment", "A4", in_sync, "A4 booked")
    assert reservations(v) == {("MAIN-OR", i): q for i, q in patel.items()}
    kit = await cs.view("item", "KNEE-KIT@MAIN-OR")
    assert kit is not None
    assert (kit["on_hand"], kit["reserved"]) == (4, 1)
    used = {"KNEE-KIT": 2, "BONE-CEMENT": 2}
    lines: list[dict[str, Any]] = [{"line_id": "1", "code": "27447", "amount": "18000.00"}]
    lines += [
        {
            "line_id": str(n),
            "code": CHARGE_CODE[i],
            "quantity": q,
            "amount": str(UNIT_COST[i] * q),
        }
        for n, (i, q) in enumerate(used.items(), start=2)
    ]
    await cs.publish("appointment.post_charges", "A4", "dft-A4-1", {"lines": lines})
    v = await cs.until(
        "appointment", "A4", lambda v: v["status"] == "completed" and in_sync(v), "completed"
    )
    assert Decimal(v["billing"]["total"]) == Decimal("18000.00") + sum(
        UNIT_COST[i] * q for i, q in used.items()
    )
    assert [c["line_id"] for c in v["billing"]["charges"]] == ["1", "2", "3"]
    assert v["supply"]["reservations"] == []
    assert v["erp"]["demand"] == []
    # Consumption: on hand down (kit 4 -> 2, cement 10 -> 8), reservations gone.
    kit = await cs.until("item", "KNEE-KIT@MAIN-OR", lambda v: v["on_hand"] == 2, "consumed")
    assert kit["reserved"] == 0
    cement_item = await cs.view("item", "BONE-CEMENT@MAIN-OR")
    assert cement_item is not None
    assert (cement_item["on_hand"], cement_item["reserved"]) == (8, 0)
    [consumption] = cs.of("A4", "supply", "consumption")
    consumed = {line["item_id"]: line["quantity"] for line in consumption.data["lines"]}
    assert consumed == used
    assert sorted(r.data["line_id"] for r in cs.of("A4", "billing", "charge")) == ["1", "2", "3"]
    # The ERP holds a posting per consumed item: quantity x unit cost, to the cost center.
    postings = cs.of("A4", "erp", "posting")
    assert sorted(r.data["item_id"] for r in postings) == sorted(used)
    for r in postings:
        q = used[r.data["item_id"]]
        assert r.data["quantity"] == q
        assert Decimal(str(r.data["amount"])) == q * UNIT_COST[r.data["item_id"]]
        assert r.data["cost_center"] == COST_CENTER["MAIN-OR"]

    # A credit reverses its charge line.
    credit = {
        "line_id": "4",
        "code": "27447",
        "type": "credit",
        "amount": "18000.00",
        "reverses": "1",
    }
    await cs.publish("appointment.post_charges", "A4", "dft-A4-2", {"lines": [credit]})
    v = await cs.until(
        "appointment",
        "A4",
        lambda v: len(v["billing"]["charges"]) == 4 and in_sync(v),
        "the credit",
    )
    assert Decimal(v["billing"]["total"]) == sum(UNIT_COST[i] * q for i, q in used.items())
    [credited] = cs.of("A4", "billing", "credit")
    assert credited.data["reverses_line_id"] == "1"

    # Feedback from billing: the claim is denied.
    await cs.sim("claim", "A4", "--status", "denied", "--reason", "no authorization on file")
    v = await cs.until(
        "appointment", "A4", lambda v: v["billing"]["claim_status"] == "denied", "claim status"
    )

    # The kit crossed its reorder point (2 on hand, reorder point 2): one PO, acknowledged by ERP.
    kit = await cs.until(
        "item",
        "KNEE-KIT@MAIN-OR",
        lambda v: [p["status"] for p in v["purchase_order_details"]] == ["acknowledged"],
        "the purchase order acknowledged",
    )
    [po_id] = kit["purchase_orders"]
    assert kit["on_order"] == 3
    assert kit["available"] == 2 + 3
    [po] = [r for r in cs.records("erp", "purchase_order") if r.data["po_id"] == po_id]
    assert po.data["quantity"] == 3
    assert po.data["supplier_id"] == "SUP-ORTHO"
    assert po.data["item_id"] == "KNEE-KIT"
    assert po.data["facility_id"] == "MAIN-OR"
    # Goods received: on order moves to on hand.
    await cs.sim("receive", po_id)
    kit = await cs.until("item", "KNEE-KIT@MAIN-OR", lambda v: v["on_order"] == 0, "received")
    assert kit["on_hand"] == 2 + 3

    # The view has every field the issue lists; everything is in sync at the end.
    final = await cs.view("appointment", "A4")
    assert final is not None
    v = final
    assert v["id"] == "A4"
    assert v["status"] == "completed"
    assert v["procedures"] == ["27447"]
    assert (v["facility"], v["room"], v["start"]) == (
        "MAIN-OR",
        "OR-3",
        "2027-03-04T12:30:00+00:00",
    )
    assert v["billing"]["readiness"] == "ready"
    assert {"charges", "total"} <= set(v["billing"])
    assert [(c["line_id"], c["code"], c["type"]) for c in v["billing"]["charges"]] == [
        ("1", "27447", "charge"),
        ("2", CHARGE_CODE["KNEE-KIT"], "charge"),
        ("3", CHARGE_CODE["BONE-CEMENT"], "charge"),
        ("4", "27447", "credit"),
    ]
    assert v["supply"] == {"reservations": []}
    assert v["erp"] == {"demand": []}
    assert set(v["sync"]) == set(SYSTEMS)
    for appointment in ("A1", "A2", "A3", "A4"):
        shown = await cs.view("appointment", appointment)
        assert shown is not None
        for system in SYSTEMS:
            sync = shown["sync"][system]
            assert (sync["state"], sync["last_error"]) == ("in_sync", ""), (appointment, system)
    report = await cs.json("report")
    assert report["appointments"]["by_status"] == {"cancelled": 1, "deleted": 2, "completed": 1}
    sims = report["simulators"]["systems"]
    assert sims["erp"]["operations"]["posting"]["created"] == 2
    assert sims["billing"]["operations"]["reversal"]["created"] == 3


# -- 2. billing down while bookings continue ------------------------------------------------
async def test_billing_outage_supply_and_erp_go_on_and_billing_catches_up_once(
    deployment: Cli,
) -> None:
    cs = deployment
    await cs.load_demo()
    await cs.sim("fail", "billing", "--for", "20", "--mode", "down")
    bookings = {
        "B1": ("27447", "MAIN-OR", "NORTHWIND-HMO", "pending_authorization"),
        "B2": ("66984", "ASC-NORTH", "BASIC-CARE", "not_covered"),
        "B3": ("29881", "ASC-SOUTH", "SUMMIT-PPO", "ready"),
        "B4": ("47562", "MAIN-OR", "", "pending_coverage"),
    }
    for n, (appointment, (procedure, facility, payer, _)) in enumerate(bookings.items(), 1):
        start_at = f"2027-04-0{n}T08:00:00-04:00"
        await cs.publish(
            "appointment.book",
            appointment,
            f"book-{appointment}",
            book(procedure, facility, start_at, payer),
        )
    # Completion during the outage too: consumption reaches supply and ERP.
    await cs.publish(
        "appointment.post_charges",
        "B1",
        "dft-B1",
        {
            "lines": [
                {"line_id": "1", "code": "27447", "amount": "18000.00"},
                {"line_id": "2", "code": CHARGE_CODE["KNEE-KIT"], "amount": "4250.00"},
            ]
        },
    )
    for appointment, (procedure, facility, _, readiness) in bookings.items():

        def settled(v: dict[str, Any], a: str = appointment) -> bool:
            return (
                v["sync"]["supply"]["state"] == "in_sync"
                and v["sync"]["erp"]["state"] == "in_sync"
                and (a != "B1" or v["status"] == "completed")
            )

        v = await cs.until(
            "appointment", appointment, settled, "supply and ERP in sync while billing is down"
        )
        assert v["sync"]["billing"]["state"] == "pending", v["sync"]
        assert v["billing"]["readiness"] == readiness
        held = cs.net_supply(appointment)
        expected = card(procedure) if appointment != "B1" else {}
        assert held == {(facility, i): q for i, q in expected.items()}, appointment
    [consumption] = cs.of("B1", "supply", "consumption")
    assert [line["item_id"] for line in consumption.data["lines"]] == ["KNEE-KIT"]
    assert [r.data["item_id"] for r in cs.of("B1", "erp", "posting")] == ["KNEE-KIT"]
    assert cs.records("billing") == []

    await cs.sim("heal", "billing")
    for appointment in bookings:
        await cs.until("appointment", appointment, in_sync, "billing caught up", timeout_s=30)
    # Each expected record exactly once in billing's own records: nothing lost, none twice.
    billed = cs.records("billing")
    keys = Counter(r.key for r in billed)
    assert max(keys.values()) == 1
    by_appointment = Counter((r.data["appointment_id"], r.operation) for r in billed)
    assert by_appointment == Counter(
        {(a, "readiness"): 1 for a in bookings} | {("B1", "charge"): 2}
    )
    for r in cs.records("billing", "readiness"):
        assert r.data["readiness"] == bookings[r.data["appointment_id"]][3]
    report = json.loads(await cs.sim("report", "--json"))
    assert report["systems"]["billing"]["created"] == len(billed) == 6
    assert report["systems"]["billing"]["fault"] is None


# -- 3. ERP down across completions and a router crash: one PO per crossing ------------------
async def test_erp_outage_and_router_sigkill_create_exactly_one_po_per_crossing(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    # The broker (the session nats-server) and the simulators live on: only the router dies.
    sim_prefix = f"{unique_prefix}sim"
    env = base_env(
        CARESYNC_NATS__URL=nats_url,
        CARESYNC_STREAMS__SUBJECT_PREFIX=unique_prefix,
        CARESYNC_STREAMS__STREAM_PREFIX=unique_prefix.upper(),
        **{f"CARESYNC_DOWNSTREAM__{s.upper()}__SUBJECT_PREFIX": sim_prefix for s in SYSTEMS},
    )
    data = tmp_path / "data"
    data.mkdir()
    cs = Cli(data, env, data / "sim.db", ["--sim-prefix", sim_prefix])
    log = tmp_path / "caresync.log"
    sim = await start(
        ["sim", "--data-dir", str(data), "--sim-prefix", sim_prefix], env, log, "ready"
    )
    router: Process | None = None
    try:
        router = await start(["up", "--data-dir", str(data)], env, log, "router ready")
        await cs.load_demo()
        # Stock already at its reorder point orders at load: wait for those orders to land.
        at_load = {"HIP-KIT@ASC-NORTH", "KNEE-KIT@ASC-SOUTH", "HIP-KIT@ASC-SOUTH"}
        await poll(
            lambda: anyio.to_thread.run_sync(cs.records, "erp", "purchase_order"),
            lambda rows: {f"{r.data['item_id']}@{r.data['facility_id']}" for r in rows} == at_load,
            "the orders raised at load",
        )
        await cs.sim("fail", "erp", "--for", "120", "--mode", "down")

        # C1 is performed: 2 kits used (4 on hand, reorder point 2) -> one crossing.
        await cs.publish(
            "appointment.book",
            "C1",
            "book-C1",
            book("27447", "MAIN-OR", "2027-05-03T08:00:00-04:00", "SUMMIT-PPO"),
        )
        await cs.publish(
            "appointment.post_charges",
            "C1",
            "dft-C1",
            {"lines": [{"line_id": "1", "code": CHARGE_CODE["KNEE-KIT"], "quantity": 2}]},
        )
        kit = await cs.until(
            "item", "KNEE-KIT@MAIN-OR", lambda v: v["purchase_orders"], "the kit's PO decided"
        )
        v = await cs.until(
            "appointment",
            "C1",
            lambda v: (
                v["status"] == "completed"
                and v["sync"]["supply"]["state"] == "in_sync"
                and v["sync"]["billing"]["state"] == "in_sync"
            ),
            "supply and billing done while ERP is down",
        )
        assert v["sync"]["erp"]["state"] == "pending"

        # The router dies mid-outage (its ERP connector is retrying) and comes back.
        router.send_signal(signal.SIGKILL)
        await router.wait()
        await router.aclose()
        router = None
        router = await start(["up", "--data-dir", str(data)], env, log, "router ready")
        await poll(
            lambda: cs.run("health", check=False), lambda r: r[0] == 0, "the restarted router"
        )

        # C2 after the restart, still during the outage: bone cement crosses (10 on hand,
        # reorder point 4, 6 used by C2).
        await cs.publish(
            "appointment.book",
            "C2",
            "book-C2",
            book("27447", "MAIN-OR", "2027-05-04T08:00:00-04:00", "SUMMIT-PPO"),
        )
        await cs.publish(
            "appointment.post_charges",
            "C2",
            "dft-C2",
            {
                "lines": [
                    {"line_id": "1", "code": CHARGE_CODE["KNEE-KIT"], "quantity": 1},
                    {"line_id": "2", "code": CHARGE_CODE["BONE-CEMENT"], "quantity": 6},
                ]
            },
        )
        cement = await cs.until(
            "item", "BONE-CEMENT@MAIN-OR", lambda v: v["purchase_orders"], "cement's PO decided"
        )
        assert cement["on_hand"] == 10 - 6
        ordered = cs.records("erp", "purchase_order")
        assert len(ordered) == len(at_load), "ERP took an order while down"

        await cs.sim("heal", "erp")
        # After the crash the ERP effect in hand comes back after its ack wait (5 s).
        for appointment in ("C1", "C2"):
            await cs.until("appointment", appointment, in_sync, "ERP caught up", timeout_s=60)
        crossings = {"KNEE-KIT@MAIN-OR": kit, "BONE-CEMENT@MAIN-OR": cement}
        for key in crossings:
            crossings[key] = await cs.until(
                "item",
                key,
                lambda v: [p["status"] for p in v["purchase_order_details"]] == ["acknowledged"],
                "its single PO acknowledged by ERP",
            )
    finally:
        if router is not None:
            await stop(router)
        await stop(sim)

    # ERP's own records: exactly one purchase order per crossing, none created twice.
    orders = [r for r in cs.records("erp", "purchase_order") if r.data["facility_id"] == "MAIN-OR"]
    per_item = Counter(f"{r.data['item_id']}@{r.data['facility_id']}" for r in orders)
    assert per_item == Counter({"KNEE-KIT@MAIN-OR": 1, "BONE-CEMENT@MAIN-OR": 1})
    for key, view in crossings.items():
        [order] = [r for r in orders if f"{r.data['item_id']}@MAIN-OR" == key]
        assert view["purchase_orders"] == [order.data["po_id"]]
        assert view["purchase_order_details"][0]["reference"] == order.reference
    assert len({r.data["po_id"] for r in cs.records("erp", "purchase_order")}) == len(
        cs.records("erp", "purchase_order")
    )
    db = sqlite3.connect(f"file:{cs.sim_db}?mode=ro", uri=True)
    try:
        created = db.execute(
            "SELECT count(*) FROM records WHERE system = 'erp' AND operation = 'purchase_order'"
        ).fetchone()[0]
    finally:
        db.close()
    assert created == len(at_load) + 2


# -- 4. no preference card; reference-data errors -------------------------------------------
async def test_missing_card_is_flagged_and_bad_refdata_changes_nothing(
    deployment: Cli, tmp_path: Path
) -> None:
    cs = deployment
    await cs.load_demo()

    # A procedure without a preference card: accepted, flagged, not dropped.
    await cs.publish(
        "appointment.book",
        "D1",
        "book-D1",
        {
            **book("99999", "MAIN-OR", "2027-06-01T08:00:00-04:00", "SUMMIT-PPO"),
            "procedures": [{"code": "99999"}, {"code": "45378"}],
        },
    )
    await cs.publish(
        "appointment.book",
        "D2",
        "book-D2",
        book("99999", "ASC-NORTH", "2027-06-02T08:00:00-04:00", "SUMMIT-PPO"),
    )
    v = await cs.until("appointment", "D1", in_sync, "D1 booked")
    assert v["status"] == "booked"
    assert v["procedures"] == ["99999", "45378"]
    assert v["missing_preference_cards"] == ["99999"]
    assert reservations(v) == {("MAIN-OR", i): q for i, q in card("45378").items()}
    assert cs.net_supply("D1") == reservations(v)
    v = await cs.until("appointment", "D2", in_sync, "D2 booked")
    assert v["status"] == "booked"
    assert v["missing_preference_cards"] == ["99999"]
    assert v["supply"]["reservations"] == []
    assert v["erp"]["demand"] == []
    assert v["billing"]["readiness"] == "ready"
    assert [r.data["readiness"] for r in cs.of("D2", "billing", "readiness")] == ["ready"]
    _, text = await cs.run("status", "appointment", "D2")
    assert "no preference card for: 99999" in text
    report = await cs.json("report")
    assert report["appointments"]["without_preference_card"] == 2
    # D1 is performed: gloves are consumed (200 on hand at MAIN-OR).
    gloves = CHARGE_CODE["GLOVES-75"]
    await cs.publish(
        "appointment.post_charges",
        "D1",
        "dft-D1",
        {"lines": [{"line_id": "1", "code": gloves, "quantity": 2, "amount": "2.70"}]},
    )
    await cs.until("item", "GLOVES-75@MAIN-OR", lambda v: v["on_hand"] == 198, "consumed")

    # A directory with bad rows: exit 1, each named by file, line and column; nothing changes.
    bad = tmp_path / "bad"
    shutil.copytree(DEMO, bad)
    stock = (bad / "stock.csv").read_text().splitlines()
    kit_line = stock.index("MAIN-OR,KNEE-KIT,4,2,3")
    stock[kit_line] = "MAIN-OR,KNEE-KIT,40,2,3"  # a good change that must not be applied
    stock[kit_line + 1] = stock[kit_line + 1].replace("MAIN-OR,HIP-KIT,3", "MAIN-OR,HIP-KIT,x")
    (bad / "stock.csv").write_text("\n".join(stock) + "\n")
    with (bad / "payer_rules.csv").open("a") as f:
        f.write("ACME,27447,maybe,yes,\n")
    rules_line = len((bad / "payer_rules.csv").read_text().splitlines())
    code, out = await cs.run("refdata", "load", str(bad), check=False)
    assert code == 1, out
    assert "nothing loaded" in out
    assert f"stock.csv:{kit_line + 2}: column 3 (on_hand)" in out, out
    assert f"payer_rules.csv:{rules_line}: column 3 (authorization_required)" in out, out
    code, out = await cs.run("refdata", "load", str(bad), "--json", check=False)
    assert code == 1
    problems = {(p["file"], p["line"], p["column_index"]) for p in json.loads(out)["problems"]}
    assert problems == {
        ("stock.csv", kit_line + 2, 3),
        ("payer_rules.csv", rules_line, 3),
    }
    # The version in force is still the first one, and the stock count was not applied.
    again = await cs.json("refdata", "load", str(DEMO))
    assert (again["version"], again["unchanged"]) == (1, True)
    kit = await cs.view("item", "KNEE-KIT@MAIN-OR")
    assert kit is not None
    assert kit["on_hand"] == 4
    # Loading the same version again does not reset a count consumption has moved since.
    gloves_item = await cs.view("item", "GLOVES-75@MAIN-OR")
    assert gloves_item is not None
    assert gloves_item["on_hand"] == 198


# -- 5. a credit of a supply line ---------------------------------------------------------
async def test_a_credited_supply_line_gives_the_stock_back(deployment: Cli) -> None:
    cs = deployment
    await cs.load_demo()
    await cs.publish(
        "appointment.book",
        "E1",
        "book-E1",
        book("27447", "MAIN-OR", "2027-07-01T08:00:00-04:00", "SUMMIT-PPO"),
    )
    cement = CHARGE_CODE["BONE-CEMENT"]
    charge = {"line_id": "1", "code": cement, "quantity": 2, "amount": "193.00"}
    await cs.publish("appointment.post_charges", "E1", "dft-E1-1", {"lines": [charge]})
    await cs.until("item", "BONE-CEMENT@MAIN-OR", lambda v: v["on_hand"] == 8, "consumed")
    credit = {
        "line_id": "2",
        "code": cement,
        "type": "credit",
        "quantity": 1,
        "amount": "96.50",
        "reverses": "1",
    }
    await cs.publish("appointment.post_charges", "E1", "dft-E1-2", {"lines": [credit]})
    v = await cs.until(
        "appointment",
        "E1",
        lambda v: len(v["billing"]["charges"]) == 2 and in_sync(v),
        "the credit in billing",
    )
    assert Decimal(v["billing"]["total"]) == Decimal("96.50")
    # One bone cement was used in the end: one goes back on the shelf.
    await cs.until(
        "item", "BONE-CEMENT@MAIN-OR", lambda v: v["on_hand"] == 9, "stock given back", 5
    )
