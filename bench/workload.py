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
    warmup: list[BenchCommand] = field(default_factory=list)
    """Commands to send (and see applied) before ``commands``, untimed: the beginnings of the
    lifecycles a steady workload is in the middle of when it starts (see build_workload)."""
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
    steady: bool = False,
) -> Workload:
    """N messages over M appointment keys (``<prefix>appt-<i>``), payload bytes included.

    The peer's order is round by round (every booking, then every first reschedule... then
    every end): right for a throughput burst, but paced it offers the heavy bookings and ends
    (7 internal commands each) in long runs between runs of light reschedules (1 each).

    ``steady`` makes a workload to pace instead, with the same mix of kinds in every stretch
    of it, first and last included: M lanes of N/M commands each (the lifecycle length K).
    Lane ``l`` starts at a random step ``o`` of a lifecycle: its key's first ``o`` commands
    are the untimed :attr:`Workload.warmup`, the other ``K - o`` (the end included) are timed,
    then the lane's second key (``<prefix>appt-<M + l>``) takes its first ``o`` commands and is
    left open.  So at each round every lane is at a uniformly drawn step of a lifecycle: one
    round in K is a booking, one an end, as in the throughput workload on average.  (Keys that
    all start at round 0 would book together at the head and end together at the tail: paced
    at 50 % of the peak, the head and tail offer more than the peak and the latency measured
    there is a queue's.)  The rounds are sent in order, shuffled within; per-key order holds.

    ``items_per_procedure`` is not drawn from: it only says which reference data the
    workload is meant for (see :mod:`caresync.bench.refdata`).
    """
    if n < 1 or m < 1 or items_per_procedure < 0:
        raise ValueError("n and m must be positive and items_per_procedure not negative")
    subjects = subjects or Subjects()
    rng = random.Random(seed)
    base, extra = divmod(n, m)
    per_key: list[list[BenchCommand]] = []
    for i in range(2 * m if steady else m):
        count = base + (1 if i % m < extra else 0)
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
    if steady:
        return _steady(per_key, rng, items_per_procedure)
    order: list[BenchCommand] = []
    rounds = max(len(s) for s in per_key)
    for r in range(rounds):
        this_round = [s[r] for s in per_key if r < len(s)]
        rng.shuffle(this_round)
        order.extend(this_round)
    return Workload(order, len(per_key), items_per_procedure)


def _steady(
    per_key: list[list[BenchCommand]], rng: random.Random, items_per_procedure: int
) -> Workload:
    """The lanes of a ``steady`` workload (see :func:`build_workload`): ``per_key`` holds
    the M first keys, then the M second keys, each a whole lifecycle."""
    m = len(per_key) // 2
    timed: list[tuple[int, float, BenchCommand]] = []
    warm: list[tuple[int, float, BenchCommand]] = []
    keys = m
    for first, second in zip(per_key[:m], per_key[m:], strict=True):
        step = rng.randrange(len(first))
        keys += step > 0
        lane = first[step:] + second[:step]
        warm += [(r, rng.random(), c) for r, c in enumerate(first[:step])]
        timed += [(r, rng.random(), c) for r, c in enumerate(lane)]
    return Workload(
        [c for _, _, c in sorted(timed, key=_slot)],
        keys,
        items_per_procedure,
        warmup=[c for _, _, c in sorted(warm, key=_slot)],
    )


def _slot(item: tuple[int, float, BenchCommand]) -> tuple[int, float]:
    return item[0], item[1]
