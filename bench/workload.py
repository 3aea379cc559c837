"""The fan-out workload, pure and seeded: the Restate peer's ``build_events`` for caresync.

N commands over M appointment keys.  Every key gets ``book``, then ``reschedule``..., then
``complete`` (80 %) or ``cancel``; after the first command of a key, 5 % of commands are
re-sent once more with the same command id (the router's own dedupe must absorb them).  The
send order is round-robin over the keys, shuffled in every round, so per-key order holds.

The random draws are made in the peer's order, so one seed gives the peer's keys, facilities
("locations"), procedures, kinds and duplicates.  Every accepted command fans out to
``billing:<appt>``, ``supply:<facility>:<item>`` per item of its procedure and
``erp:<facility>``: ``items_per_procedure + 2`` internal commands.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from caresync.codecs import Subjects, encode_envelope, make_envelope

PROCEDURES = tuple(f"proc{p}" for p in range(10))
FACILITIES = 20
DUP_RATE = 0.05
SEED = 7
_BASE_TIME = datetime(2027, 1, 1, tzinfo=UTC)

# The supply operation each appointment change asks for (see caresync.actors.appointment).
SUPPLY_OP = {"book": "reserve", "reschedule": "hold", "cancel": "release", "complete": "consume"}


def procedure_items(procedure: str, items_per_procedure: int) -> tuple[str, ...]:
    """The items a procedure consumes: ``items_per_procedure`` of its own."""
    p = PROCEDURES.index(procedure)
    return tuple(f"item{p * items_per_procedure + j}" for j in range(items_per_procedure))


@dataclass(frozen=True, slots=True)
class BenchCommand:
    """One message to publish: a command, or the re-send of one (``duplicate``)."""

    key: str
    command_id: str
    name: str
    facility: str
    items: tuple[str, ...]
    duplicate: bool
    subject: str
    data: bytes

    def effect_ids(self) -> list[str]:
        """Ids of the internal commands this command fans out to when accepted."""
        op = SUPPLY_OP[self.name]
        cid, fac = self.command_id, self.facility
        return [
            f"{cid}:billing",
            *(f"{cid}:supply:{fac}:{item}:{op}" for item in self.items),
            f"{cid}:erp:{fac}",
        ]


@dataclass(frozen=True, slots=True)
class Workload:
    """The commands in send order, and what the router must do with them."""

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

    @property
    def fanout(self) -> int:
        """Internal commands per accepted command."""
        return self.items_per_procedure + 2

    @property
    def expected_internal(self) -> int:
        """Internal (fan-out) commands the router must send: one per effect id."""
        return self.unique * self.fanout

    @property
    def expected_accepted(self) -> int:
        """Commands the router must accept: the unique inputs and every fan-out command."""
        return self.unique * (1 + self.fanout)

    @property
    def completes(self) -> int:
        """Unique ``complete`` commands: each makes billing send one downstream charge."""
        return sum(1 for c in self.commands if c.name == "complete" and not c.duplicate)

    def unique_commands(self) -> list[BenchCommand]:
        """Every command once, without the re-sends."""
        return [c for c in self.commands if not c.duplicate]

    def expected_applied(self) -> set[str]:
        """Every command id the store must record: inputs and their fan-out commands."""
        out: set[str] = set()
        for c in self.unique_commands():
            out.add(c.command_id)
            out.update(c.effect_ids())
        return out


def _payload(name: str, procedure: str, facility: str, date: str, items: tuple[str, ...]) -> object:
    if name == "book":
        return {"procedure": procedure, "facility": facility, "date": date, "items": list(items)}
    if name == "reschedule":
        return {"date": date}
    return None


def build_workload(
    n: int,
    m: int,
    *,
    items_per_procedure: int = 1,
    dup_rate: float = DUP_RATE,
    seed: int = SEED,
    prefix: str = "",
    subjects: Subjects | None = None,
) -> Workload:
    """N messages over M appointment keys (``<prefix>appt-<i>``), payload bytes included."""
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
        facility = f"fac{rng.randrange(FACILITIES)}"
        procedure = rng.choice(PROCEDURES)
        items = procedure_items(procedure, items_per_procedure)
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
                kind=f"appointment.{name}",
                entity=key,
                payload=_payload(name, procedure, facility, date, items),
                occurred_at=_BASE_TIME + timedelta(seconds=j),
                source="caresync-bench",
            )
            command = BenchCommand(
                key, envelope.id, name, facility, items, False, subject, encode_envelope(envelope)
            )
            seq.append(command)
            j += 1
            if len(seq) < count and j > 1 and rng.random() < dup_rate:
                seq.append(
                    BenchCommand(
                        key, command.command_id, name, facility, items, True, subject, command.data
                    )
                )
        per_key.append(seq)
    order: list[BenchCommand] = []
    rounds = max(len(s) for s in per_key)
    for r in range(rounds):
        this_round = [s[r] for s in per_key if r < len(s)]
        rng.shuffle(this_round)
        order.extend(this_round)
    return Workload(order, len(per_key), items_per_procedure)
