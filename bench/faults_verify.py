"""The checks of a fault deployment against the oracle, on the stores as they are.

:func:`verify`, once everything has settled: every appointment ends where a run of the pure
actors ends (:mod:`caresync.bench.expected`), the business state of billing, supply, ERP and
items too (purchase orders aside: which crossings happen depends on how appointments
interleave); every sync ledger is settled; every effect is in its simulator's own records
exactly once with the payload the pure run sent, every purchase order exactly once for its
crossing; every command applied exactly once, the offsets at the end of the streams, the
outbox all sent.  :func:`batch_invariants`, even mid-run (right after a SIGKILL): the store
holds whole batches only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from caresync.actors.ledger import Ledger
from caresync.bench.faults_deploy import Deployment
from caresync.bench.faults_oracle import Oracle, is_crossing
from caresync.bench.faults_stores import ledgers, read_only, read_states, sim_records
from caresync.codecs import decode_envelope
from caresync.connectors.acks import ack_id


@dataclass
class Verdict:
    """What the checks found: counts for the report, and every problem (none when all holds)."""

    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> None:
        """Record ``problem`` unless ``ok``."""
        if not ok:
            self.problems.append(problem)


def sample(items: Iterable[Any], n: int = 5) -> str:
    """At most ``n`` of ``items``, sorted, for a problem's message."""
    listed = sorted(map(str, items))
    more = f" (+{len(listed) - n} more)" if len(listed) > n else ""
    return ", ".join(listed[:n]) + more


def business(kind: str, state: Any) -> Any:
    """A state without what the downstream acknowledgements and the crossing order decide
    (ledgers, purchase orders): what must equal the pure run."""
    replace = msgspec.structs.replace
    if kind in ("billing", "supply", "erp"):
        return replace(state, ledger=Ledger())
    if kind == "item":
        return replace(state, purchase_orders=(), crossings=0, armed=True)
    return state


def verify(dep: Deployment, oracle: Oracle, input_last_seq: Mapping[str, int]) -> Verdict:
    """Every check of this module's docstring, on the stores as they are now (everything settled:
    the router stopped, or idle)."""
    v = Verdict()
    with read_only(dep.db_path) as conn:
        applied = {
            (k, e, c): (outcome, int(seq))
            for k, e, c, outcome, seq in conn.execute(
                "SELECT kind, entity, command_id, outcome, seq FROM applied"
            )
        }
        offsets = dict(conn.execute("SELECT stream, seq FROM offsets").fetchall())
        outbox = {
            key: (status, payload)
            for key, status, payload in conn.execute("SELECT key, status, payload FROM outbox")
        }
        calls: dict[str, list[str]] = {}
        for key, outcome in conn.execute(
            "SELECT effect_key, outcome FROM downstream_calls ORDER BY effect_key, attempt"
        ):
            calls.setdefault(key, []).append(outcome)
    states = read_states(dep.db_path)
    records = sim_records(dep.sim_db)

    # Commands: each applied once, accepted, offsets at the end of the streams.
    missing = oracle.applied() - applied.keys()
    v.expect(not missing, f"{len(missing)} commands never applied: {sample(missing)}")
    refused = [a for a, (outcome, _) in applied.items() if outcome != "accepted"]
    v.expect(not refused, f"{len(refused)} commands not accepted: {sample(refused)}")
    # Internal commands applied with their cause share its position; sources have their own.
    sources = oracle.expected.outcomes
    seqs = Counter(seq for (_, _, c), (_, seq) in applied.items() if c in sources)
    twice = [s for s, n in seqs.items() if n > 1]
    v.expect(not twice, f"stream messages applied twice: {sample(twice)}")
    for stream, last in input_last_seq.items():
        v.expect(offsets.get(stream) == last, f"{stream}: offset {offsets.get(stream)} != {last}")
        beyond = [a for a, (_, seq) in applied.items() if seq > last]
        v.expect(not beyond, f"applied past the end of {stream}: {sample(beyond)}")

    v.problems += batch_invariants(dep.db_path, oracle)

    # Outbox: every effect of the pure run there (the crossing-dependent ones aside), all sent,
    # and nothing there without its command applied.
    wanted = oracle.effects()
    v.expect(
        not wanted - outbox.keys(), f"effects not in the outbox: {sample(wanted - outbox.keys())}"
    )
    unsent = [k for k, (status, _) in outbox.items() if status != "sent"]
    v.expect(not unsent, f"{len(unsent)} outbox rows not sent: {sample(unsent)}")
    applied_ids = {c for _, _, c in applied}
    orphans = [
        k
        for k, (_, payload) in outbox.items()
        if decode_envelope(payload)[0].causation_id not in applied_ids
    ]
    v.expect(not orphans, f"outbox rows whose command is not applied: {sample(orphans)}")

    # State: every appointment exactly as in the pure run; the others' business state too.
    pure = oracle.pure.states
    appointments = [key for key in pure if key[0] == "appointment"]
    wrong = [key for key in appointments if states.get(key) != pure[key]]
    v.expect(not wrong, f"{len(wrong)} appointments differ from the pure run: {sample(wrong)}")
    others = [key for key in pure if key[0] in ("billing", "supply", "erp", "item")]
    differ = [
        key
        for key in others
        if key not in states or business(key[0], states[key]) != business(key[0], pure[key])
    ]
    v.expect(not differ, f"{len(differ)} actors differ from the pure run: {sample(differ)}")
    # A facility's purchasing actor exists once it ordered: crossing-dependent (checked below).
    extra = {key for key in states.keys() - pure.keys() if key[0] != "purchasing"}
    v.expect(not extra, f"entities the pure run does not have: {sample(extra)}")

    # Sync ledgers: every effect acknowledged, none failed.
    open_ledgers = [
        f"{system}:{where}"
        for system, entries in ledgers(states).items()
        for where, ledger in entries
        if ledger.pending or ledger.failed or ledger.acked != ledger.wanted
    ]
    v.expect(not open_ledgers, f"ledgers not in sync: {sample(open_ledgers)}")

    # The simulators' own records: each effect exactly once, as the pure run sent it.
    by_key = Counter((r.system, r.key) for r in records)
    dup = [k for k, n in by_key.items() if n > 1]
    v.expect(not dup, f"records held twice: {sample(dup)}")
    plain = {r.key: r for r in records if r.operation != "purchase_order"}
    want = oracle.downstream()
    v.expect(not want.keys() - plain.keys(), f"effects not in the simulators' records: "
             f"{sample(want.keys() - plain.keys())}")  # fmt: skip
    v.expect(not plain.keys() - want.keys(), f"records the pure run never sent: "
             f"{sample(plain.keys() - want.keys())}")  # fmt: skip
    bad = [
        k
        for k, r in plain.items()
        if k in want and (f"{r.system}.{r.operation}" != want[k].kind or r.data != want[k].payload)
    ]
    v.expect(not bad, f"records that differ from the effect sent: {sample(bad)}")

    # Purchase orders: one record per crossing the item actors recorded, each PO id once,
    # and each facility's purchasing actor sent as many as its item actors raised.
    orders = [r for r in records if r.operation == "purchase_order"]
    po_ids = Counter(str(r.data["po_id"]) for r in orders)
    v.expect(max(po_ids.values(), default=1) == 1, f"POs held twice: {sample(po_ids)}")
    items = {key: s for key, s in states.items() if key[0] == "item"}
    item_pos = {po.po_id for s in items.values() for po in s.purchase_orders}
    crossings = sum(s.crossings for s in items.values())
    v.expect(set(po_ids) == item_pos, f"POs in ERP {len(po_ids)} != the items' {len(item_pos)}")
    v.expect(len(item_pos) == crossings, f"{len(item_pos)} POs for {crossings} crossings")
    raised = Counter(s.facility_id for s in items.values() for _ in s.purchase_orders)
    ordered = Counter({f: s.orders for (k, f), s in states.items() if k == "purchasing"})
    v.expect(+ordered == +raised, f"POs sent by the purchasing actors {dict(ordered)} != "
             f"the items' per facility {dict(raised)}")  # fmt: skip
    not_ack = [po.po_id for s in items.values() for po in s.purchase_orders if not po.reference]
    v.expect(not not_ack, f"POs never acknowledged by ERP: {sample(not_ack)}")

    # The connectors: every record acknowledged to its owner once, no effect given up.
    acks = {c for k, _, c in applied if c.startswith("ack:")}
    unacked = [r.key for r in records if ack_id(r.key) not in acks]
    v.expect(not unacked, f"effects without their acknowledgement applied: {sample(unacked)}")
    failed = [k for k, outcomes in calls.items() if "failed" in outcomes]
    v.expect(not failed, f"effects given up: {sample(failed)}")
    finished = [k for k, outcomes in calls.items() if outcomes[-1] in ("created", "duplicate")]

    v.counts = {
        "commands_applied": len(applied),
        "commands_expected": len(oracle.applied()),
        "appointments": len(appointments),
        "actors_compared": len(others),
        "outbox_rows": len(outbox),
        "sim_records": len(records),
        "effects_expected": len(want),
        "purchase_orders": len(po_ids),
        "crossings": crossings,
        "effects_called": len(finished),
        "calls": sum(len(c) for c in calls.values()),
        "retried_calls": sum(c.count("transient") for c in calls.values()),
        "redelivered_records": sum(1 for r in records if r.attempts > 1),
        "ledgers": sum(len(e) for e in ledgers(states).values()),
    }
    return v


def batch_invariants(db_path: Path, oracle: Oracle) -> list[str]:
    """What must hold in every committed state, even mid-run: no batch is half in the store.

    Read in one snapshot: the input messages up to the committed offset applied exactly once
    and none past it (the source commands applied are the first ones published, each at its
    own stream position); every internal command an applied command sends applied with it
    (one partition: all are local, applied in their cause's batch); every command known to the
    pure run that is applied has all its effects in the outbox; no outbox row without its
    command applied.  Assumes one partition and an input stream without duplicates or dead
    letters (what these runs publish).
    """
    problems: list[str] = []
    by_cause: dict[str, set[str]] = {}
    internal_by_cause: dict[str, set[str]] = {}
    for sent in (*oracle.expected.internal.values(), *oracle.expected.downstream.values()):
        if not is_crossing(sent):
            by_cause.setdefault(sent.causation_id, set()).add(sent.key)
    for sent in oracle.expected.internal.values():
        if not is_crossing(sent):
            internal_by_cause.setdefault(sent.causation_id, set()).add(sent.key)
    with read_only(db_path) as conn:
        conn.execute("BEGIN")  # one read transaction: one committed state
        offsets = dict(conn.execute("SELECT stream, seq FROM offsets").fetchall())
        rows = [(str(c), int(s)) for c, s in conn.execute("SELECT command_id, seq FROM applied")]
        outbox = {str(k): bytes(p) for k, p in conn.execute("SELECT key, payload FROM outbox")}
        conn.execute("COMMIT")
    offset = sum(offsets.values())
    ids = {c for c, _ in rows}
    past = [c for c, seq in rows if seq > offset]
    if past:
        problems.append(f"applied past the offset {offset}: {sample(past)}")
    published = list(oracle.expected.outcomes)
    sources = [(seq, c) for c, seq in rows if c in oracle.expected.outcomes]
    if {c for _, c in sources} != set(published[: len(sources)]):
        problems.append(
            f"the {len(sources)} source commands applied are not the first ones published"
        )
    if len({seq for seq, _ in sources}) != len(sources):
        problems.append("source commands applied at the same stream position")
    half = [c for c in ids if not internal_by_cause.get(c, set()) <= ids]
    if half:
        problems.append(f"applied without the internal commands they send: {sample(half)}")
    lost = [c for c in ids if not by_cause.get(c, set()) <= outbox.keys()]
    if lost:
        problems.append(f"applied without all their effects in the outbox: {sample(lost)}")
    orphans = [k for k, p in outbox.items() if decode_envelope(p)[0].causation_id not in ids]
    if orphans:
        problems.append(f"effects in the outbox without their command: {sample(orphans)}")
    return problems
