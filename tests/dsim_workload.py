"""The seeded workload of the simulation: what the sources send, and how big a run is.

A seed's workload is the source log: scheduling (SIU/FHIR), charges (DFT), coverage and visits
(ADT), stock counts and supply requests (reference data, FHIR) of a few cases, items and
facilities, each source's messages in the order it sends them (stale and swapped scheduling
messages and resends included), the sources interleaved at random.  Everything is drawn from
the one :class:`random.Random` passed in, so a seed always gives the same log.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
from workflow_network import T0

Key = tuple[str, str]
"""(entity kind, entity id)."""

FACILITIES = ("MAIN", "NORTH")
ITEMS = ("gauze", "knee-kit", "lens")
CHARGE_CODES = {"gauze": "C-GAUZE", "knee-kit": "C-KNEE", "lens": "C-LENS"}
PROCEDURES = ("27447", "27447", "66984", "99999")
PAYERS = ("ACME", "ACME", "STRICT", "CHEAP", "")
OFFSETS = (timezone(timedelta(hours=-5)), UTC, timezone(timedelta(hours=1)))
SCHEDULING = ("book", "sync", "reschedule", "modify", "cancel", "no_show", "delete")
"""Appointment commands of the scheduling source: the ones a source timestamp orders."""
SYSTEMS = ("billing", "erp", "supply")


# -- messages ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Message:
    """One command in an entity's input log, with its payload as it travels on the wire.

    Sources send JSON (their timestamps keep their offsets); actors' fan-out is msgpack.
    """

    kind: str
    entity: str
    name: str
    id: str
    occurred_at: datetime
    data: bytes
    wire_json: bool
    origin: str

    @property
    def key(self) -> Key:
        return (self.kind, self.entity)


def source(
    kind: str, entity: str, name: str, id: str, at: datetime, payload: Any, origin: str
) -> Message:
    """A source command (JSON on the wire)."""
    return Message(kind, entity, name, id, at, msgspec.json.encode(payload), True, origin)


# -- the workload -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Profile:
    """The size of a run and how often each fault happens (weights relative to one another)."""

    name: str
    appointments: tuple[int, int]
    visits: int
    max_changes: int
    crash: float
    redeliver: float
    passivate: float
    replay_probe: float
    drain: float
    connector_crash: float
    ack_failure: float
    fifo_breaks: float = 0.0
    """How often an effect overtakes the one its sender committed before it, for the same
    target.  The router never does this (0 in every profile); it is here to show what the
    actors would do if it did."""


SHORT = Profile("short", (1, 3), 1, 3, 0.25, 0.15, 0.2, 0.05, 0.08, 0.15, 0.05)
LONG = Profile("long", (5, 8), 2, 5, 0.15, 0.1, 0.2, 0.02, 0.03, 0.15, 0.05)
PROFILES = {p.name: p for p in (SHORT, LONG)}


class _Stream:
    """The messages of one source conversation, in the order the source sends them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.messages: list[Message] = []
        self.n = 0

    def add(
        self, kind: str, entity: str, name: str, at: datetime, payload: Any, origin: str
    ) -> Message:
        self.n += 1
        msg = source(kind, entity, name, f"{self.prefix}:{name}:{self.n}", at, payload, origin)
        self.messages.append(msg)
        return msg


def _start(rng: random.Random) -> datetime:
    # Late evening in UTC-5 is the next day in UTC: the case's date must come from its offset.
    return datetime(
        2027,
        3,
        rng.randint(8, 12),
        rng.choice((7, 13, 22, 23)),
        rng.choice((0, 30)),
        tzinfo=rng.choice(OFFSETS),
    )


def _procedures(rng: random.Random) -> list[dict[str, str]]:
    codes = list(dict.fromkeys(rng.choice(PROCEDURES) for _ in range(rng.randint(1, 2))))
    return [
        {"code": c, "provider_id": "DR-WHO" if c == "27447" and rng.random() < 0.25 else ""}
        for c in codes
    ]


def _details(rng: random.Random, appt: str, visits: list[str]) -> dict[str, Any]:
    visit = rng.choice(visits) if visits and rng.random() < 0.4 else ""
    return {
        "procedures": _procedures(rng),
        "facility_id": rng.choice(FACILITIES),
        "start": _start(rng),
        "duration_min": 90,
        "room": "OR-1",
        "providers": ["DR-WHO"] if rng.random() < 0.15 else [],
        "patient_class": "O",
        "patient_id": f"P-{appt}",
        "visit_number": visit,
        "payer_id": "" if visit and rng.random() < 0.6 else rng.choice(PAYERS),
    }


def _charges(
    rng: random.Random, appt: str, details: dict[str, Any], first_line: int
) -> list[dict[str, Any]]:
    lines = [
        {"line_id": f"{appt}-L{first_line}", "code": p["code"], "amount": "1000.00"}
        for p in details["procedures"][:1]
    ]
    for item in rng.sample(ITEMS, rng.randint(0, 2)):
        quantity = rng.randint(1, 5)
        lines.append(
            {
                "line_id": f"{appt}-L{first_line + len(lines)}",
                "code": CHARGE_CODES[item],
                "quantity": quantity,
                "amount": f"{quantity * 3}.00",
            }
        )
    return lines


def _appointment_stream(
    rng: random.Random, appt: str, visits: list[str], profile: Profile
) -> _Stream:
    """A case's life at its sources: scheduling (SIU/FHIR), charges (DFT), coverage (ADT)."""
    stream = _Stream(appt)
    t = T0 + timedelta(minutes=rng.randint(0, 600))
    details = _details(rng, appt, visits)
    sched: list[Message] = []

    def schedule(name: str, payload: Any) -> None:
        sched.append(stream.add("appointment", appt, name, t, payload, "sched"))

    schedule("book" if rng.random() < 0.8 else "sync", details)
    booked = True
    posted: list[dict[str, Any]] = []
    for _ in range(rng.randint(0, profile.max_changes)):
        t += timedelta(minutes=rng.randint(1, 240))
        r = rng.random()
        if r < 0.2:
            change: dict[str, Any] = {"start": _start(rng)}
            if rng.random() < 0.5:
                change["facility_id"] = rng.choice(FACILITIES)
            details = {**details, **change}
            schedule("reschedule", change)
        elif r < 0.4:
            change = rng.choice(
                (
                    {"procedures": _procedures(rng)},
                    {"procedures_added": _procedures(rng)},
                    {"procedures_removed": [rng.choice(PROCEDURES)]},
                    {"providers_added": ["DR-WHO"]},
                    {"providers": []},
                    {"payer_id": rng.choice(PAYERS)},
                )
            )
            schedule("modify", change)
        elif r < 0.5:
            details = {**details, "start": _start(rng), "payer_id": rng.choice(PAYERS)}
            schedule("sync", details)
        elif r < 0.65:
            schedule(rng.choice(("cancel", "cancel", "no_show", "delete")), {"reason": "x"})
            booked = False
        elif r < 0.75:
            if not booked:
                details = _details(rng, appt, visits)
            schedule("book", details)
            booked = True
        elif r < 0.85:
            payload = {"payer_id": rng.choice(PAYERS[:4]), "patient_class": "I"}
            stream.add("appointment", appt, "coverage", t, payload, "adt")
        elif r < 0.95:
            lines = _charges(rng, appt, details, len(posted) + 1)
            posted += lines
            via_visit = details["visit_number"] and rng.random() < 0.4
            if via_visit:
                visit = details["visit_number"]
                stream.add("visit", visit, "post_charges", t, {"lines": lines}, "dft")
            else:
                stream.add("appointment", appt, "post_charges", t, {"lines": lines}, "dft")
            booked = False
        if posted and rng.random() < 0.3:
            supply_lines = [line for line in posted if line["code"].startswith("C-")]
            if supply_lines:
                line = rng.choice(supply_lines)
                credit = {
                    "line_id": f"{appt}-L{len(posted) + 1}",
                    "code": line["code"],
                    "type": "credit",
                    "quantity": rng.randint(1, line["quantity"]),
                    "amount": "3.00",
                    "reverses": line["line_id"],
                }
                posted.append(credit)
                stream.add("appointment", appt, "post_charges", t, {"lines": [credit]}, "dft")
        if rng.random() < 0.05:
            claim = {"appointment_id": appt, "status": "denied", "claim_id": f"CLM-{appt}"}
            stream.add("billing", appt, "claim_status", t, claim, "billing")
    # Stale messages: an older scheduling message that arrives after newer ones.
    if len(sched) > 1 and rng.random() < 0.35:
        old = sched[0].occurred_at - timedelta(minutes=rng.randint(1, 30))
        stale: tuple[tuple[str, dict[str, Any]], ...] = (
            ("reschedule", {"start": _start(rng), "facility_id": rng.choice(FACILITIES)}),
            ("modify", {"procedures": _procedures(rng)}),
            ("cancel", {"reason": "old"}),
            ("book", _details(rng, appt, visits)),
        )
        name, payload = rng.choice(stale)
        stream.add("appointment", appt, name, old, payload, "sched")
    _swap_adjacent_scheduling(rng, stream.messages)
    return stream


def _swap_adjacent_scheduling(rng: random.Random, messages: list[Message]) -> None:
    """Two scheduling messages that overtook each other: the later-sent one is now stale."""
    positions = [i for i, m in enumerate(messages) if m.name in SCHEDULING]
    pairs = list(itertools.pairwise(positions))
    if pairs and rng.random() < 0.25:
        i, j = rng.choice(pairs)
        messages[i], messages[j] = messages[j], messages[i]


def _visit_stream(rng: random.Random, visit: str) -> _Stream:
    stream = _Stream(visit)
    t = T0 + timedelta(minutes=rng.randint(0, 600))
    for _ in range(rng.randint(0, 2)):
        payload = {"payer_id": rng.choice(PAYERS[:4]), "patient_class": "O", "location": "L1"}
        stream.add("visit", visit, "register", t, payload, "adt")
        t += timedelta(minutes=rng.randint(1, 120))
    return stream


def _stock_stream(rng: random.Random, entity: str) -> _Stream:
    """Stock counts of one item at one facility, as successive reference-data loads send."""
    stream = _Stream(f"stock:{entity}")
    payload: dict[str, Any]
    for version in range(1, 1 + (2 if rng.random() < 0.25 else 1)):
        payload = {
            "on_hand": rng.randint(0, 8),
            "reorder_point": rng.randint(0, 4),
            "reorder_quantity": 0 if rng.random() < 0.1 else rng.randint(1, 8),
            "refdata_version": version,
        }
        stream.add("item", entity, "set_stock", T0, payload, "refdata")
    for n in range(1, 1 + (rng.randint(1, 2) if rng.random() < 0.2 else 0)):
        # A FHIR SupplyRequest, sometimes sent again with other content (a new command id).
        at = T0 + timedelta(minutes=rng.randint(1, 600))
        for _ in range(2 if rng.random() < 0.2 else 1):
            payload = {"request_id": f"SR-{n}", "quantity": rng.randint(1, 6)}
            stream.add("item", entity, "request", at, payload, "fhir")
    return stream


def generate(rng: random.Random, profile: Profile) -> list[Message]:
    """The source log: every source's messages, sources interleaved at random."""
    visits = [f"V{i}" for i in range(1, profile.visits + 1)]
    streams = [
        _appointment_stream(rng, f"A{i}", visits, profile).messages
        for i in range(1, rng.randint(*profile.appointments) + 1)
    ]
    streams += [_visit_stream(rng, v).messages for v in visits]
    streams += [
        _stock_stream(rng, f"{item}@{facility}").messages
        for facility in FACILITIES
        for item in ITEMS
        if rng.random() < 0.8
    ]
    # Sources resend: some messages arrive again later (same id).
    for messages in streams:
        for i in range(len(messages) - 1, -1, -1):
            if rng.random() < 0.08:
                messages.insert(rng.randint(i + 1, len(messages)), messages[i])
    log: list[Message] = []
    queues = [deque(m) for m in streams if m]
    while queues:
        queue = rng.choices(queues, weights=[len(q) for q in queues])[0]
        log.append(queue.popleft())
        if not queue:
            queues.remove(queue)
    return log
