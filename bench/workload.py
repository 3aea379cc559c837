"""The fan-out workload, pure and seeded: the Restate peer's ``build_events`` for caresync.

N commands over M appointment keys.  Every key gets ``book``, then ``reschedule``..., then
``complete`` (80 %) or ``cancel``; after the first command of a key, 5 % of commands are
re-sent once more with the same command id (the router's own dedupe must absorb them).  The
send order is round-robin over the keys, shuffled in every round, so per-key order holds.

The random draws are made in the peer's order, so one seed gives the peer's keys, facilities
("locations"), procedures, kinds, dates and duplicates.  On the wire (``codecs/scheduling.py``):

- ``book``: ``appointment.book`` of the key's procedure at its facility, on the drawn date,
  for the bench payer (see :mod:`caresync.bench.refdata`);
- ``reschedule``: ``appointment.reschedule`` to the drawn date (same facility);
- ``complete``: ``appointment.post_charges`` with one charge line for the procedure;
- ``cancel``: ``appointment.cancel``.

What each command fans out to is not fixed here: the appointment sends billing, supply and ERP
only what changed.  :mod:`caresync.bench.expected` runs the pure actors over the workload to
know it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from caresync.bench.refdata import FACILITIES, PAYER, PROCEDURES
from caresync.codecs import Subjects, encode_envelope, make_envelope

DUP_RATE = 0.05
SEED = 7
_BASE_TIME = datetime(2027, 1, 1, tzinfo=UTC)

COMMAND = {
    "book": "book",
    "reschedule": "reschedule",
    "cancel": "cancel",
    "complete": "post_charges",
}
"""The peer's event kind -> the appointment command that carries it."""
KINDS = tuple(COMMAND)


@dataclass(frozen=True, slots=True)
class BenchCommand:
    """One message to publish: a command, or the re-send of one (``duplicate``)."""

    key: str
    command_id: str
    name: str
    """The peer's kind: book, reschedule, cancel or complete."""
    facility: str
    procedure: str
    duplicate: bool
    subject: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Workload:
    """The commands in send order."""

    commands: list[BenchCommand]
    keys: int
    items_per_procedure: int
    unique: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unique", sum(1 for c in self.commands if not c.duplicate))

    @property
    def n(self) -> int:
        """Messages published (duplicates included)."""
        return len(self.commands)

    @property
    def duplicates(self) -> int:
        """Re-sends of an already sent command id."""
        return self.n - self.unique

    def unique_commands(self) -> list[BenchCommand]:
        """Every command once, without the re-sends."""
        return [c for c in self.commands if not c.duplicate]

    def kinds(self) -> dict[str, int]:
        """Unique commands per kind."""
        counts = Counter(c.name for c in self.unique_commands())
        return {k: counts[k] for k in KINDS if counts[k]}


def _payload(name: str, key: str, procedure: str, facility: str, start: str) -> Any:
    if name == "book":
        return {
            "procedures": [{"code": procedure}],
            "facility_id": facility,
            "start": start,
            "duration_min": 60,
            "patient_id": f"pat-{key}",
            "payer_id": PAYER,
        }
    if name == "reschedule":
        return {"start": start}
    if name == "complete":
        return {"lines": [{"line_id": f"{key}-l1", "code": procedure, "amount": "100.00"}]}
    return {"reason": "bench"}


def build_workload(
    n: int,
    m: int,
    *,
    items_per_procedure: int = 1,
    dup_rate: float = DUP_RATE,
    seed: int = SEED,
    prefix: str = "",
    subjects: Subjects | None = None,
    interleaved: bool = False,
) -> Workload:
    """N messages over M appointment keys (``<prefix>appt-<i>``), payload bytes included.

    The peer's order is round by round (every booking, then every first reschedule... then
    every end): right for a throughput burst, but paced it offers the heavy bookings and ends
    (7 internal commands each) in long runs between runs of light reschedules (1 each).
    ``interleaved`` starts each key at a random round instead, so that every stretch of the
    send order carries the same mix of kinds; per-key order holds either way.

    ``items_per_procedure`` is not drawn from: it only says which reference data the
    workload is meant for (see :mod:`caresync.bench.refdata`).
    """
    if n < 1 or m < 1 or items_per_procedure < 0:
        raise ValueError("n and m must be positive and items_per_procedure not negative")
    subjects = subjects or Subjects()
    rng = random.Random(seed)
    base, extra = divmod(n, m)
    per_key: list[list[BenchCommand]] = []
    for i in range(m):
        count = base + (1 if i < extra else 0)
        if count == 0:
            continue
        key = f"{prefix}appt-{i}"
        facility = FACILITIES[rng.randrange(len(FACILITIES))]
        procedure = rng.choice(PROCEDURES)
        subject = subjects.command("appointment", key)
        seq: list[BenchCommand] = []
        j = 0
        while len(seq) < count:
            if j == 0:
                name = "book"
            elif len(seq) == count - 1:
                name = "complete" if rng.random() < 0.8 else "cancel"
            else:
                name = "reschedule"
            date = f"2027-{1 + rng.randrange(12):02d}-{1 + rng.randrange(28):02d}"
            envelope = make_envelope(
                id=f"{key}-e{j}",
                kind=f"appointment.{COMMAND[name]}",
                entity=key,
                payload=_payload(name, key, procedure, facility, f"{date}T08:00:00+00:00"),
                occurred_at=_BASE_TIME + timedelta(seconds=j),
                source="caresync-bench",
            )
            command = BenchCommand(
                key,
                envelope.id,
                name,
                facility,
                procedure,
                False,
                subject,
                encode_envelope(envelope),
            )
            seq.append(command)
            j += 1
            if len(seq) < count and j > 1 and rng.random() < dup_rate:
                seq.append(
                    BenchCommand(
                        key,
                        command.command_id,
                        name,
                        facility,
                        procedure,
                        True,
                        subject,
                        command.data,
                    )
                )
        per_key.append(seq)
    order: list[BenchCommand] = []
    rounds = max(len(s) for s in per_key)
    if interleaved:
        starts = [rng.randrange(rounds) for _ in per_key]
        slots = sorted(
            (start + r, rng.random(), k, r)
            for k, (start, s) in enumerate(zip(starts, per_key, strict=True))
            for r in range(len(s))
        )
        order = [per_key[k][r] for _, _, k, r in slots]
        return Workload(order, len(per_key), items_per_procedure)
    for r in range(rounds):
        this_round = [s[r] for s in per_key if r < len(s)]
        rng.shuffle(this_round)
        order.extend(this_round)
    return Workload(order, len(per_key), items_per_procedure)
