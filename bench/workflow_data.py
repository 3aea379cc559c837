"""The workflow bench's data: a small network and a realistic mix of appointments (seeded).

Reference data (written as CSV, loaded with ``caresync refdata load``): 3 facilities
(``wfac0``..``wfac2``), 200 items (``witem0``..``witem199``, charge code ``CDM-<item>``), 10
procedures (``wproc0``..``wproc9``) each with a general preference card of 3 to 5 items, three
payers (one covering everything, one requiring authorization for some procedures, one not
covering one procedure), and every item stocked at every facility.  Stock is sized from the
number of appointments, so that some items cross their reorder points during a run (purchase
orders) and others do not.

Workload: per appointment ``book`` (10 % without a payer: pending coverage), sometimes
``reschedule`` (to another date, 40 % of them to another facility too), then ~15 % ``cancel``
and otherwise ``post_charges`` with the procedure line and one supply line per card item (its
charge code and card quantity), so stock is consumed.  Sent round-robin over the appointments
(each round shuffled), so per-appointment order holds.  No re-sends.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from caresync.bench.workload import BenchCommand, Workload
from caresync.codecs import Subjects, encode_envelope, make_envelope

FACILITIES = tuple(f"wfac{i}" for i in range(3))
ITEMS = tuple(f"witem{i}" for i in range(200))
PROCEDURES = tuple(f"wproc{p}" for p in range(10))
SUPPLIERS = ("WSUP-A", "WSUP-B")
PAYERS = ("WPAY-ALL", "WPAY-AUTH", "WPAY-LIMITED")
RESCHEDULE_RATE = 0.35
MOVE_FACILITY_RATE = 0.4
CANCEL_RATE = 0.15
NO_PAYER_RATE = 0.10
_BASE_TIME = datetime(2027, 1, 1, tzinfo=UTC)


def cards(seed: int) -> dict[str, list[tuple[str, int]]]:
    """Procedure -> its card's (item, quantity): 3 to 5 distinct items, quantity 1 or 2."""
    rng = random.Random(seed * 7919 + 1)
    return {
        p: [(i, rng.choice((1, 1, 2))) for i in rng.sample(ITEMS, rng.randint(3, 5))]
        for p in PROCEDURES
    }


def _write(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_csv(directory: Path, appointments: int, seed: int) -> int:
    """Write the set into ``directory``; returns the stock rows written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed * 104729 + 3)
    card = cards(seed)
    _write(
        directory / "facilities.csv",
        ("facility_id", "name", "cost_center"),
        [(f, f"Workflow facility {f}", f"CC-{f}") for f in FACILITIES],
    )
    _write(
        directory / "suppliers.csv",
        ("supplier_id", "name"),
        [(s, f"Supplier {s}") for s in SUPPLIERS],
    )
    _write(
        directory / "items.csv",
        ("item_id", "description", "unit", "unit_cost", "supplier_id", "charge_code"),
        [
            (i, f"Item {i}", "EA", f"{1 + n % 37}.50", SUPPLIERS[n % 2], f"CDM-{i}")
            for n, i in enumerate(ITEMS)
        ],
    )
    # Expected reservations per item and facility over the whole run (each appointment is at
    # one of 3 facilities and has one of 10 procedures).
    demand = dict.fromkeys(ITEMS, 0.0)
    for entries in card.values():
        for item, qty in entries:
            demand[item] += qty * appointments / len(FACILITIES) / len(PROCEDURES)
    stock = []
    for f in FACILITIES:
        for i in ITEMS:
            d = demand[i]
            point = max(2, int(d * 0.1))
            # Between half and 1.6 times the expected demand above the reorder point: roughly
            # half the card items at a facility cross it at least once.
            on_hand = point + max(1, int(d * rng.uniform(0.5, 1.6))) + 1 if d else 50
            quantity = max(10, int(d * 0.3)) if d else 10
            stock.append((f, i, on_hand, point, quantity))
    _write(
        directory / "stock.csv",
        ("facility_id", "item_id", "on_hand", "reorder_point", "reorder_quantity"),
        stock,
    )
    _write(
        directory / "preference_cards.csv",
        ("procedure_code", "item_id", "quantity", "provider_id"),
        [(p, i, q, "") for p, entries in card.items() for i, q in entries],
    )
    _write(
        directory / "payer_rules.csv",
        ("payer_id", "procedure_code", "authorization_required", "covered"),
        [
            ("WPAY-ALL", "*", "no", "yes"),
            ("WPAY-AUTH", "*", "no", "yes"),
            ("WPAY-AUTH", "wproc1", "yes", "yes"),
            ("WPAY-AUTH", "wproc2", "yes", "yes"),
            ("WPAY-LIMITED", "*", "no", "yes"),
            ("WPAY-LIMITED", "wproc3", "no", "no"),
        ],
    )
    return len(stock)


def _start(rng: random.Random) -> str:
    month, day, hour = 1 + rng.randrange(12), 1 + rng.randrange(28), 8 + rng.randrange(8)
    return f"2027-{month:02d}-{day:02d}T{hour:02d}:00:00+00:00"


def build_workflow(
    appointments: int, *, seed: int, prefix: str = "wf-", subjects: Subjects | None = None
) -> Workload:
    """The commands of ``appointments`` appointments (``<prefix>appt-<i>``), in send order."""
    if appointments < 1:
        raise ValueError("appointments must be positive")
    subjects = subjects or Subjects()
    rng = random.Random(seed)
    card = cards(seed)
    per_key: list[list[BenchCommand]] = []
    for i in range(appointments):
        key = f"{prefix}appt-{i}"
        facility = rng.choice(FACILITIES)
        procedure = rng.choice(PROCEDURES)
        subject = subjects.command("appointment", key)
        steps: list[tuple[str, str, Any]] = []
        payer = "" if rng.random() < NO_PAYER_RATE else rng.choice(PAYERS)
        steps.append(
            (
                "book",
                "book",
                {
                    "procedures": [{"code": procedure}],
                    "facility_id": facility,
                    "start": _start(rng),
                    "duration_min": 60,
                    "room": f"OR-{rng.randrange(1, 6)}",
                    "patient_id": f"pat-{key}",
                    "visit_number": f"V-{key}",
                    "payer_id": payer,
                },
            )
        )
        if rng.random() < RESCHEDULE_RATE:
            change: dict[str, Any] = {"start": _start(rng)}
            if rng.random() < MOVE_FACILITY_RATE:
                facility = rng.choice([f for f in FACILITIES if f != facility])
                change["facility_id"] = facility
            steps.append(("reschedule", "reschedule", change))
        if rng.random() < CANCEL_RATE:
            steps.append(("cancel", "cancel", {"reason": "bench"}))
        else:
            lines: list[dict[str, Any]] = [
                {"line_id": f"{key}-p", "code": procedure, "amount": "1200.00"}
            ]
            lines += [
                {
                    "line_id": f"{key}-s{j}",
                    "code": f"CDM-{item}",
                    "quantity": qty,
                    "amount": f"{25 * qty}.00",
                }
                for j, (item, qty) in enumerate(card[procedure])
            ]
            steps.append(("complete", "post_charges", {"lines": lines}))
        seq = []
        for j, (name, command, payload) in enumerate(steps):
            envelope = make_envelope(
                id=f"{key}-e{j}",
                kind=f"appointment.{command}",
                entity=key,
                payload=payload,
                occurred_at=_BASE_TIME + timedelta(seconds=j),
                source="caresync-bench",
            )
            seq.append(
                BenchCommand(
                    key,
                    envelope.id,
                    name,
                    facility,
                    procedure,
                    False,
                    subject,
                    encode_envelope(envelope),
                )
            )
        per_key.append(seq)
    order: list[BenchCommand] = []
    for r in range(max(len(s) for s in per_key)):
        this_round = [s[r] for s in per_key if r < len(s)]
        rng.shuffle(this_round)
        order.extend(this_round)
    return Workload(order, len(per_key), 0)
