"""``caresync demo``: the core scenario end to end on a fresh embedded deployment.

It starts ``caresync up`` (embedded nats-server, router, simulators) in its own data dir, loads
the demo network, and drives the scenario through the public CLI, printing the sync ledger as
it goes: book, reschedule, cancel, a billing outage while bookings continue, completion with
consumption and replenishment, recovery, goods received, and the final report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

import caresync.config
from caresync.cli.common import CommandError, Context

CARESYNC = str(Path(sys.executable).parent / "caresync")
DEMO_DATA = Path(caresync.config.__file__).parent / "demo"


class _Demo:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}

    async def cli(self, *args: str, check: bool = True) -> str:
        result = await anyio.run_process(
            [CARESYNC, *args, "--data-dir", str(self.data_dir)], env=self.env, check=False
        )
        out = result.stdout.decode()
        if check and result.returncode != 0:
            raise CommandError(f"caresync {' '.join(args)} failed: {result.stderr.decode()}")
        return out

    async def publish(self, kind: str, entity: str, command_id: str, data: dict[str, Any]) -> None:
        await self.cli(
            "publish",
            "--kind",
            kind,
            "--entity",
            entity,
            "--id",
            command_id,
            "--data",
            json.dumps(data),
        )

    async def view(self, kind: str, entity: str) -> dict[str, Any]:
        out = await self.cli("status", kind, entity, "--json", check=False)
        return json.loads(out) if out.strip() else {}

    async def until(
        self, kind: str, entity: str, test: Any, what: str, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            view = await self.view(kind, entity)
            if view and test(view):
                return view
            if time.monotonic() > deadline:
                raise CommandError(f"demo: timed out waiting for {what}")
            await anyio.sleep(0.2)

    async def show(self, appointment: str) -> None:
        print(await self.cli("status", "appointment", appointment), end="")

    async def show_item(self, key: str) -> None:
        print(await self.cli("status", "item", key), end="")


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _in_sync(view: dict[str, Any]) -> bool:
    return all(s["state"] == "in_sync" for s in view.get("sync", {}).values())


async def run_demo(ctx: Context, *, keep: bool = False) -> int:
    """Run the scenario; exit status 0 when every step behaved as the product promises."""
    base = ctx.data_dir if keep else Path(tempfile.mkdtemp(prefix="caresync-demo-"))
    data_dir = base / "demo" if keep else base
    demo = _Demo(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "demo-router.log").open("ab") as log:
        up = await anyio.open_process(
            [CARESYNC, "up", "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=log,
            env=demo.env,
        )
    try:
        assert up.stdout is not None
        ready = BufferedByteReceiveStream(up.stdout)
        with anyio.fail_after(60):
            print((await ready.receive_until(b"\n", 4096)).decode(), flush=True)
        await _scenario(demo)
    finally:
        up.terminate()
        with anyio.move_on_after(15, shield=True):
            await up.wait()
    print(f"\ndemo finished; data in {data_dir}" if keep else "\ndemo finished")
    return 0


async def _scenario(demo: _Demo) -> None:
    _step("load the demo network (facilities, items, stock, preference cards, payer rules)")
    print(await demo.cli("refdata", "load", str(DEMO_DATA)), end="")
    start = "2026-12-07T07:30:00-05:00"

    _step("book a total knee (27447) at MAIN-OR; the payer needs prior authorization")
    await demo.publish(
        "appointment.book",
        "SCHED:A1001",
        "siu-1",
        {
            "procedures": [{"code": "27447"}],
            "facility_id": "MAIN-OR",
            "room": "OR-3",
            "start": start,
            "patient_class": "O",
            "payer_id": "NORTHWIND-HMO",
        },
    )
    await demo.until("appointment", "SCHED:A1001", _in_sync, "the booking to be in sync")
    await demo.show("SCHED:A1001")

    _step("book a cataract (66984) at ASC-NORTH, payer unknown yet; then move it to ASC-SOUTH")
    await demo.publish(
        "appointment.book",
        "SCHED:A1002",
        "siu-2",
        {
            "procedures": [{"code": "66984"}],
            "facility_id": "ASC-NORTH",
            "start": start,
            "visit_number": "V-77",
        },
    )
    await demo.publish(
        "appointment.reschedule",
        "SCHED:A1002",
        "siu-3",
        {"start": "2026-12-14T09:00:00-05:00", "facility_id": "ASC-SOUTH"},
    )
    await demo.publish("visit.register", "V-77", "adt-1", {"payer_id": "SUMMIT-PPO"})
    await demo.until(
        "appointment",
        "SCHED:A1002",
        lambda v: (
            v["facility"] == "ASC-SOUTH" and v["billing"]["readiness"] == "ready" and _in_sync(v)
        ),
        "the reschedule and the coverage",
    )
    await demo.show("SCHED:A1002")

    _step("cancel it: reservations released, demand reversed, billing told to reverse")
    await demo.publish("appointment.cancel", "SCHED:A1002", "siu-4", {"reason": "patient"})
    await demo.until(
        "appointment",
        "SCHED:A1002",
        lambda v: v["status"] == "cancelled" and _in_sync(v),
        "the cancellation",
    )
    await demo.show("SCHED:A1002")

    _step("billing goes down for 15 s; a booking still reaches supply and ERP")
    await demo.cli("sim", "fail", "billing", "--for", "15", "--mode", "down")
    await demo.publish(
        "appointment.book",
        "SCHED:A1003",
        "siu-5",
        {
            "procedures": [{"code": "27447"}],
            "facility_id": "MAIN-OR",
            "start": start,
            "payer_id": "SUMMIT-PPO",
        },
    )
    await demo.until(
        "appointment",
        "SCHED:A1003",
        lambda v: (
            v["sync"]["supply"]["state"] == "in_sync" and v["sync"]["erp"]["state"] == "in_sync"
        ),
        "supply and ERP",
    )
    await demo.show("SCHED:A1003")

    _step(
        "the knee is performed: charges posted, kit and cement consumed, stock crosses its "
        "reorder point, one purchase order goes to ERP"
    )
    await demo.publish(
        "appointment.post_charges",
        "SCHED:A1001",
        "dft-1",
        {
            "lines": [
                {"line_id": "1", "code": "27447", "amount": "18000.00"},
                {"line_id": "2", "code": "CDM-27801", "quantity": 1, "amount": "4250.00"},
                {"line_id": "3", "code": "CDM-27803", "quantity": 2, "amount": "193.00"},
            ]
        },
    )
    item = await demo.until(
        "item", "KNEE-KIT@MAIN-OR", lambda v: v["purchase_orders"], "the purchase order"
    )
    await demo.show_item("KNEE-KIT@MAIN-OR")

    _step("billing comes back: everything queued is delivered, once")
    await demo.cli("sim", "heal", "billing")
    for appointment in ("SCHED:A1001", "SCHED:A1003"):
        await demo.until("appointment", appointment, _in_sync, f"{appointment} in sync", 60)
        await demo.show(appointment)

    _step("ERP reports the goods received: on order moves to on hand")
    await demo.cli("sim", "receive", item["purchase_orders"][0])
    await demo.until("item", "KNEE-KIT@MAIN-OR", lambda v: v["on_order"] == 0, "goods received")
    await demo.show_item("KNEE-KIT@MAIN-OR")

    _step("report")
    print(await demo.cli("report"), end="")
