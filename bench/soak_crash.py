"""Fault soak: the router SIGKILLed at seeded random points while the workflow mix flows, then a
downstream system down for a minute; everything checked against the pure actors and against
what the simulated systems themselves hold.

One deployment: a nats-server of its own (embedded, in a temporary directory), the router as
``caresync up --nats URL`` in its own process with its connectors on, and the billing, ERP and
supply simulators in this process (so that they outlive the router).  Phases:

1. **crash rounds**: the bench workflow mix (:mod:`caresync.bench.workflow_data`) is
   published; the router is killed with SIGKILL ``--rounds`` times, each time once its
   progress (commands applied + downstream calls recorded) reaches a seeded random point; right
   after each kill the store must hold whole batches only (:func:`batch_invariants`); the
   router is started again; then everything must settle;
2. **outage**: another mix is published while one system (``--system``, ERP by default) is
   down for ``--outage-s`` seconds (``caresync sim fail``): the other two must take all their
   effects and be in sync meanwhile, the down one must be pending; after ``heal`` everything
   settles.

After each phase, once everything has settled: every appointment ends where a run of the pure
actors ends (:mod:`caresync.bench.expected`), the business state of billing, supply, ERP and
items too (purchase orders aside: which crossings happen depends on how appointments
interleave); every sync ledger is settled; every effect is in its simulator's own records
exactly once with the payload the pure run sent, every purchase order exactly once for its
crossing; every command applied exactly once, the offsets at the end of the streams, the
outbox all sent.

Run ``python bench/soak_crash.py --rounds 50`` (any directory), or
``python -m caresync.bench.soak_crash`` from outside the repository.  The building blocks are
shared with ``tests/test_faults.py``, which runs a quick set of the same in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import nats.errors
import orjson
from anyio.abc import Process
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from caresync.actors import default_registry
from caresync.actors.ledger import Ledger
from caresync.bench import fanout as fo
from caresync.bench.expected import Address, Expected, PureRouter, Sent, run_pure
from caresync.bench.refdata import read_back
from caresync.bench.workflow import consumers_idle
from caresync.bench.workflow_data import build_workflow, write_csv
from caresync.bench.workload import Workload
from caresync.cli.refdata import stock_commands
from caresync.codecs import Subjects, decode_envelope
from caresync.config import Config, load_config
from caresync.connectors.acks import ack_id
from caresync.router.embedded import EmbeddedNats
from caresync.router.logs import configure_logging
from caresync.router.service import store_path, subjects_for
from caresync.sim import SimServer, SimSettings

SYSTEMS = ("billing", "erp", "supply")
DEFAULT_SEED = 20261124
POLL_S = 0.1
CROSSING_KINDS = frozenset({"erp.purchase_order"})
"""Effects that exist only because an item crossed its reorder point (the order, and ERP's
call): which crossings happen depends on how appointments interleave at the item actors, so
they are checked against the items' own record of crossings, not against the pure run."""


class SoakError(Exception):
    """Raised when a phase cannot go on: a deadline passed or the router exited."""


def say(text: str) -> None:
    """Progress on stderr."""
    print(f"soak: {text}", file=sys.stderr, flush=True)


# -- the deployment ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Deployment:
    """One router's configuration on one NATS server: prefixes, directories, environment."""

    url: str
    prefix: str
    sim_prefix: str
    data_dir: Path
    env: dict[str, str]
    cfg: Config

    @property
    def subjects(self) -> Subjects:
        """The router's subject and stream names."""
        return subjects_for(self.cfg)

    @property
    def db_path(self) -> Path:
        """The router's SQLite store."""
        return store_path(self.cfg, self.data_dir)

    @property
    def sim_db(self) -> Path:
        """The simulators' own records."""
        return self.data_dir / "sim.db"

    @property
    def log_path(self) -> Path:
        """Where the router process logs (``caresync up``'s stdout and stderr)."""
        return Path(f"{self.data_dir}.log")

    @property
    def input_streams(self) -> list[str]:
        """Every partition's input stream."""
        return [self.subjects.input_stream(p) for p in range(self.subjects.partitions)]

    def simulators(self) -> SimServer:
        """Billing, ERP and supply on ``sim_prefix``, feeding back to this router's prefix."""
        settings = SimSettings(sim_prefix=self.sim_prefix, router_prefix=self.prefix)
        return SimServer(self.url, self.sim_db, settings)


def make_deployment(
    url: str,
    prefix: str,
    data_dir: Path,
    *,
    backoff_max_ms: int = 400,
    settings: Mapping[str, str] | None = None,
) -> Deployment:
    """A deployment with its own subject prefix; connectors on, to simulators on
    ``<prefix>sim``, retrying at most every ``backoff_max_ms``.

    ``settings``: more ``CARESYNC_*`` variables for the router.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    sim_prefix = f"{prefix}sim"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CARESYNC_")}
    env |= {
        "CARESYNC_STREAMS__SUBJECT_PREFIX": prefix,
        "CARESYNC_STREAMS__STREAM_PREFIX": prefix.upper(),
        "CARESYNC_LOG__LEVEL": "warning",
    }
    for system in SYSTEMS:
        env[f"CARESYNC_DOWNSTREAM__{system.upper()}__SUBJECT_PREFIX"] = sim_prefix
        env[f"CARESYNC_DOWNSTREAM__{system.upper()}__BACKOFF_MAX_MS"] = str(backoff_max_ms)
    env |= dict(settings or {})
    cfg = load_config(None, environ=env)
    return Deployment(url, prefix, sim_prefix, data_dir, env, cfg)


class RouterProcess:
    """``caresync up --nats URL`` of a deployment, as a child process."""

    def __init__(self, dep: Deployment) -> None:
        self._dep = dep
        self._process: Process | None = None
        self.starts = 0

    async def start(self, nc: NatsClient) -> None:
        """Start and wait until its health says ready."""
        dep = self._dep
        self._process = await fo.start_router(dep.url, dep.data_dir, dep.env)
        self.starts += 1
        try:
            await fo.wait_ready(nc, dep.subjects, self._process, dep.log_path)
        except fo.BenchError as exc:
            raise SoakError(str(exc)) from None

    def check_alive(self) -> None:
        """Raise SoakError if the router has exited."""
        if self._process is not None and self._process.returncode is not None:
            raise SoakError(
                f"the router exited with {self._process.returncode}:\n"
                f"{fo.log_tail(self._dep.log_path)}"
            )

    async def kill(self) -> None:
        """SIGKILL, and reap (even when cancelled)."""
        process, self._process = self._process, None
        if process is not None:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGKILL)
                await process.wait()
                await process.aclose()

    async def stop(self) -> int:
        """SIGTERM, wait for the drain (SIGKILL after 30 s, and when cancelled); its exit
        status, 0 for a clean stop."""
        process, self._process = self._process, None
        if process is None:
            return 0
        with anyio.CancelScope(shield=True):
            status = await fo.stop_router(process, timeout_s=30.0)
        return status  # noqa: RET504 - returned inside the scope, mypy sees a missing return


async def sim_control(nc: NatsClient, dep: Deployment, op: str, **body: Any) -> dict[str, Any]:
    """One control request to the simulators (what ``caresync sim <op>`` sends)."""
    reply = await nc.request(f"{dep.sim_prefix}.control.{op}", orjson.dumps(body), timeout=10.0)
    answer: dict[str, Any] = orjson.loads(reply.data)
    if "error" in answer:
        raise SoakError(f"simulators refused {op}: {answer['error']}")
    return answer


# -- the oracle: the pure actors on the same reference data and commands ---------------------------
@dataclass
class Oracle:
    """What the router must have done: every message sent so far, through the pure actors."""

    pure: PureRouter
    expected: Expected = field(default_factory=Expected)

    def send(self, messages: Iterable[tuple[str, bytes]]) -> None:
        """Messages (subject, data) in the order they are published."""
        run_pure(self.pure, messages, into=self.expected)

    def applied(self) -> set[Address]:
        """Every command that must be applied, crossing-dependent ones aside."""
        crossing = {s.address for s in self.expected.internal.values() if _crossing(s)}
        return self.expected.applied - crossing

    def effects(self) -> set[str]:
        """Keys of every effect (internal or downstream), crossing-dependent ones aside."""
        sent = (*self.expected.internal.values(), *self.expected.downstream.values())
        return {s.key for s in sent if not _crossing(s)}

    def downstream(self, system: str | None = None) -> dict[str, Sent]:
        """Downstream effects by key (of one system), crossing-dependent ones aside."""
        return {
            key: sent
            for key, sent in self.expected.downstream.items()
            if not _crossing(sent) and (system is None or sent.kind.partition(".")[0] == system)
        }


def _crossing(sent: Sent) -> bool:
    return sent.kind in CROSSING_KINDS


async def load_refdata(
    dep: Deployment, alive: Callable[[], None], *, appointments: int, seed: int
) -> Oracle:
    """``caresync refdata load`` of the workflow bench's reference data (sized for
    ``appointments``); returns once the router keeps that version and applied the stock."""
    directory = dep.data_dir.parent / f"{dep.prefix}-refdata"
    write_csv(directory, appointments, seed)
    try:
        loaded = await fo.load_refdata(
            dep.url, directory, dep.env, dep.data_dir.parent / f"{dep.prefix}-refdata.log"
        )
    except fo.BenchError as exc:
        raise SoakError(str(exc)) from None
    version = int(loaded["version"])
    oracle = Oracle(PureRouter(dep.subjects, read_back(directory, version)))
    stock = stock_commands(dep.subjects, oracle.pure.refdata.dataset, version)
    oracle.send((o.subject, o.payload) for o in stock)

    def loaded_and_stocked() -> bool:
        with _ro(dep.db_path) as conn:
            kept = conn.execute(
                "SELECT count(*) FROM refdata_versions WHERE version = ?", (version,)
            )
            applied = conn.execute("SELECT count(*) FROM applied WHERE command_id LIKE 'stock:%'")
            return bool(kept.fetchone()[0]) and int(applied.fetchone()[0]) >= len(stock)

    await poll(loaded_and_stocked, alive, deadline_s=60.0, what="the reference data and stock")
    return oracle


def workload(dep: Deployment, appointments: int, *, seed: int, prefix: str) -> Workload:
    """The bench workflow mix: book, sometimes reschedule, then cancel or complete with supply
    lines; appointment ids ``<prefix>appt-<i>``."""
    return build_workflow(appointments, seed=seed, prefix=prefix, subjects=dep.subjects)


# -- reading the stores (read-only; the router may be writing) ------------------------------------
def _ro(path: Path) -> closing[sqlite3.Connection]:
    """A read-only connection, closed at the end of its ``with`` block."""
    return closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0))


_registry = default_registry()
_state_decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {
    name: msgspec.msgpack.Decoder(kind.state_type) for name, kind in _registry.kinds.items()
}


def read_states(db_path: Path, kinds: Sequence[str] | None = None) -> dict[tuple[str, str], Any]:
    """Every entity's committed state (of ``kinds``), decoded."""
    sql = "SELECT kind, id, state FROM entities"
    args: tuple[str, ...] = ()
    if kinds is not None:
        sql += f" WHERE kind IN ({','.join('?' * len(kinds))})"
        args = tuple(kinds)
    with _ro(db_path) as conn:
        rows = conn.execute(sql, args).fetchall()
    return {(kind, id_): _state_decoders[kind].decode(raw) for kind, id_, raw in rows}


def ledgers(states: Mapping[tuple[str, str], Any]) -> dict[str, list[tuple[str, Ledger]]]:
    """Per system, (entity, ledger) of every sync ledger its owning actors keep."""
    out: dict[str, list[tuple[str, Ledger]]] = {s: [] for s in SYSTEMS}
    for (kind, id_), state in states.items():
        if kind == "billing":
            out["billing"].append((id_, state.ledger))
        elif kind in ("supply", "erp"):
            out[kind].extend((f"{id_}/{name}", ledger) for name, ledger in state.ledgers.items())
    return out


def open_keys(db_path: Path) -> dict[str, int]:
    """Per system, effects sent and not yet acknowledged (pending keys of every ledger)."""
    found = ledgers(read_states(db_path, ("billing", "supply", "erp")))
    return {s: sum(len(ledger.pending) for _, ledger in entries) for s, entries in found.items()}


@dataclass(frozen=True, slots=True)
class SimRecord:
    """One record a simulated system holds (its own row)."""

    system: str
    operation: str
    key: str
    reference: str
    attempts: int
    data: dict[str, Any]


def sim_records(sim_db: Path) -> list[SimRecord]:
    """Everything the simulators hold, oldest first."""
    if not sim_db.exists():
        return []
    with _ro(sim_db) as conn:
        rows = conn.execute(
            "SELECT system, operation, key, reference, attempts, data FROM records ORDER BY rowid"
        ).fetchall()
    return [SimRecord(s, o, k, r, int(a), json.loads(d)) for s, o, k, r, a, d in rows]


def progress(db_path: Path) -> int:
    """Commands applied plus downstream calls recorded: grows as the deployment works."""
    if not db_path.exists():
        return 0
    try:
        with _ro(db_path) as conn:
            applied = conn.execute("SELECT count(*) FROM applied").fetchone()[0]
            calls = conn.execute("SELECT count(*) FROM downstream_calls").fetchone()[0]
    except sqlite3.Error:
        return 0
    return int(applied) + int(calls)


def expected_progress(oracle: Oracle) -> int:
    """About what :func:`progress` reaches once everything sent so far is done."""
    effects = len(oracle.expected.downstream)
    return len(oracle.expected.applied) + 2 * effects  # an acknowledgement and a call each


async def poll(
    done: Callable[[], bool] | Callable[[], Awaitable[bool]],
    alive: Callable[[], None],
    *,
    deadline_s: float,
    what: str,
) -> None:
    """Until ``done()`` holds (checking that the router lives); SoakError after the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        alive()
        try:
            result = done()
            ok = await result if not isinstance(result, bool) else result
        except sqlite3.Error:
            ok = False  # the router is creating or migrating its store
        if ok:
            return
        if time.monotonic() > deadline:
            raise SoakError(f"timed out after {deadline_s:g} s waiting for {what}")
        await anyio.sleep(POLL_S)


async def settled(dep: Deployment, js: JetStreamContext) -> bool:
    """Nothing left anywhere: every consumer idle, offsets at the streams' ends, the outbox
    sent, every ledger settled, the simulators' feedback sent."""
    streams = [*dep.input_streams, dep.subjects.output_stream]
    if not await consumers_idle(js, streams):
        return False
    lasts = {s: int((await js.stream_info(s)).state.last_seq) for s in dep.input_streams}
    with _ro(dep.db_path) as conn:
        offsets = dict(conn.execute("SELECT stream, seq FROM offsets").fetchall())
        unsent = conn.execute("SELECT count(*) FROM outbox WHERE status != 'sent'").fetchone()[0]
    if unsent or any(offsets.get(s, 0) != last for s, last in lasts.items()):
        return False
    if any(open_keys(dep.db_path).values()):
        return False
    if dep.sim_db.exists():
        with _ro(dep.sim_db) as conn:
            feedback = conn.execute("SELECT count(*) FROM feedback WHERE sent_at IS NULL")
            if feedback.fetchone()[0]:
                return False
    return True


async def wait_settled(
    dep: Deployment, js: JetStreamContext, alive: Callable[[], None], *, deadline_s: float
) -> float:
    """Until :func:`settled` holds twice in a row; the seconds it took."""
    t0 = time.monotonic()
    streak = [0]

    async def twice() -> bool:
        streak[0] = streak[0] + 1 if await settled(dep, js) else 0
        return streak[0] >= 2

    await poll(twice, alive, deadline_s=deadline_s, what="everything to settle")
    return time.monotonic() - t0


# -- phase 1: SIGKILL at seeded random points ----------------------------------------------------
@dataclass(frozen=True, slots=True)
class Kill:
    """One SIGKILL: the progress it was aimed at and reached, what the store held right after
    it (problems of :func:`batch_invariants`), and how long the restart took."""

    target: int
    reached: int
    invariants: tuple[str, ...]
    restart_s: float


async def kill_rounds(
    dep: Deployment,
    router: RouterProcess,
    nc: NatsClient,
    oracle: Oracle,
    rng: random.Random,
    *,
    rounds: int,
    deadline_s: float,
) -> list[Kill]:
    """Kill the router ``rounds`` times, at as many random points of :func:`progress`
    between where it is now and 95 % of where it ends (:func:`expected_progress`), each
    once progress reaches it (at once after the restart if it already has); check what the
    store holds right after each kill; start the router again."""
    now, ceiling = progress(dep.db_path), int(expected_progress(oracle) * 0.95)
    targets = sorted(rng.sample(range(now + 1, max(now + 1, ceiling)), rounds))
    kills: list[Kill] = []
    for target in targets:

        def reached_target(t: int = target) -> bool:
            return progress(dep.db_path) >= t

        await poll(
            reached_target,
            router.check_alive,
            deadline_s=deadline_s,
            what=f"progress {target}",
        )
        reached = progress(dep.db_path)
        await router.kill()
        invariants = tuple(batch_invariants(dep.db_path, oracle))
        t0 = time.monotonic()
        await router.start(nc)
        kills.append(Kill(target, reached, invariants, time.monotonic() - t0))
        say(f"kill {len(kills)} at progress {reached} (target {target}), restarted")
    return kills


# -- checks --------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """What the checks found: counts for the report, and every problem (none when all holds)."""

    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> None:
        """Record ``problem`` unless ``ok``."""
        if not ok:
            self.problems.append(problem)


def _sample(items: Iterable[Any], n: int = 5) -> str:
    listed = sorted(map(str, items))
    more = f" (+{len(listed) - n} more)" if len(listed) > n else ""
    return ", ".join(listed[:n]) + more


def business(kind: str, state: Any) -> Any:
    """A state without what the downstream acknowledgements and the crossing order decide
    (ledgers, their owners, purchase orders): what must equal the pure run."""
    replace = msgspec.structs.replace
    if kind == "billing":
        return replace(state, ledger=Ledger())
    if kind == "supply":
        return replace(state, ledgers={}, owners={})
    if kind == "erp":
        return replace(state, ledgers={}, owners={}, purchase_orders=())
    if kind == "item":
        return replace(state, purchase_orders=(), crossings=0, armed=True)
    return state


def verify(dep: Deployment, oracle: Oracle, input_last_seq: Mapping[str, int]) -> Verdict:
    """Every check of the module docstring, on the stores as they are now (everything settled:
    the router stopped, or idle)."""
    v = Verdict()
    with _ro(dep.db_path) as conn:
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
    v.expect(not missing, f"{len(missing)} commands never applied: {_sample(missing)}")
    refused = [a for a, (outcome, _) in applied.items() if outcome != "accepted"]
    v.expect(not refused, f"{len(refused)} commands not accepted: {_sample(refused)}")
    seqs = Counter(seq for _, seq in applied.values())
    twice = [s for s, n in seqs.items() if n > 1]
    v.expect(not twice, f"stream messages applied twice: {_sample(twice)}")
    for stream, last in input_last_seq.items():
        v.expect(offsets.get(stream) == last, f"{stream}: offset {offsets.get(stream)} != {last}")
        beyond = [a for a, (_, seq) in applied.items() if seq > last]
        v.expect(not beyond, f"applied past the end of {stream}: {_sample(beyond)}")

    v.problems += batch_invariants(dep.db_path, oracle)

    # Outbox: every effect of the pure run there (the crossing-dependent ones aside), all sent,
    # and nothing there without its command applied.
    wanted = oracle.effects()
    v.expect(
        not wanted - outbox.keys(), f"effects not in the outbox: {_sample(wanted - outbox.keys())}"
    )
    unsent = [k for k, (status, _) in outbox.items() if status != "sent"]
    v.expect(not unsent, f"{len(unsent)} outbox rows not sent: {_sample(unsent)}")
    applied_ids = {c for _, _, c in applied}
    orphans = [
        k
        for k, (_, payload) in outbox.items()
        if decode_envelope(payload)[0].causation_id not in applied_ids
    ]
    v.expect(not orphans, f"outbox rows whose command is not applied: {_sample(orphans)}")

    # State: every appointment exactly as in the pure run; the others' business state too.
    pure = oracle.pure.states
    appointments = [key for key in pure if key[0] == "appointment"]
    wrong = [key for key in appointments if states.get(key) != pure[key]]
    v.expect(not wrong, f"{len(wrong)} appointments differ from the pure run: {_sample(wrong)}")
    others = [key for key in pure if key[0] in ("billing", "supply", "erp", "item")]
    differ = [
        key
        for key in others
        if key not in states or business(key[0], states[key]) != business(key[0], pure[key])
    ]
    v.expect(not differ, f"{len(differ)} actors differ from the pure run: {_sample(differ)}")
    extra = states.keys() - pure.keys()
    v.expect(not extra, f"entities the pure run does not have: {_sample(extra)}")

    # Sync ledgers: every effect acknowledged, none failed.
    open_ledgers = [
        f"{system}:{where}"
        for system, entries in ledgers(states).items()
        for where, ledger in entries
        if ledger.pending or ledger.failed or ledger.acked != ledger.wanted
    ]
    v.expect(not open_ledgers, f"ledgers not in sync: {_sample(open_ledgers)}")

    # The simulators' own records: each effect exactly once, as the pure run sent it.
    by_key = Counter((r.system, r.key) for r in records)
    dup = [k for k, n in by_key.items() if n > 1]
    v.expect(not dup, f"records held twice: {_sample(dup)}")
    plain = {r.key: r for r in records if r.operation != "purchase_order"}
    want = oracle.downstream()
    v.expect(not want.keys() - plain.keys(), f"effects not in the simulators' records: "
             f"{_sample(want.keys() - plain.keys())}")  # fmt: skip
    v.expect(not plain.keys() - want.keys(), f"records the pure run never sent: "
             f"{_sample(plain.keys() - want.keys())}")  # fmt: skip
    bad = [
        k
        for k, r in plain.items()
        if k in want and (f"{r.system}.{r.operation}" != want[k].kind or r.data != want[k].payload)
    ]
    v.expect(not bad, f"records that differ from the effect sent: {_sample(bad)}")

    # Purchase orders: one record per crossing the item actors recorded, each PO id once,
    # and the ERP actors sent exactly those.
    orders = [r for r in records if r.operation == "purchase_order"]
    po_ids = Counter(str(r.data["po_id"]) for r in orders)
    v.expect(max(po_ids.values(), default=1) == 1, f"POs held twice: {_sample(po_ids)}")
    items = {key: s for key, s in states.items() if key[0] == "item"}
    item_pos = {po.po_id for s in items.values() for po in s.purchase_orders}
    crossings = sum(s.crossings for s in items.values())
    v.expect(set(po_ids) == item_pos, f"POs in ERP {len(po_ids)} != the items' {len(item_pos)}")
    v.expect(len(item_pos) == crossings, f"{len(item_pos)} POs for {crossings} crossings")
    erp_pos = Counter(po for (k, _), s in states.items() if k == "erp" for po in s.purchase_orders)
    v.expect(set(erp_pos) == item_pos and max(erp_pos.values(), default=1) == 1,
             "the ERP actors' POs are not the items' POs, each once")  # fmt: skip
    not_ack = [po.po_id for s in items.values() for po in s.purchase_orders if not po.reference]
    v.expect(not not_ack, f"POs never acknowledged by ERP: {_sample(not_ack)}")

    # The connectors: every record acknowledged to its owner once, no effect given up.
    acks = {c for k, _, c in applied if c.startswith("ack:")}
    unacked = [r.key for r in records if ack_id(r.key) not in acks]
    v.expect(not unacked, f"effects without their acknowledgement applied: {_sample(unacked)}")
    failed = [k for k, outcomes in calls.items() if "failed" in outcomes]
    v.expect(not failed, f"effects given up: {_sample(failed)}")
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

    Read in one snapshot: every input message up to the committed offset applied exactly once
    and none past it; every command known to the pure run that is applied has all its effects
    in the outbox; no outbox row without its command applied.  Assumes one partition and an
    input stream without duplicates or dead letters (what these runs publish).
    """
    problems: list[str] = []
    by_cause: dict[str, set[str]] = {}
    for sent in (*oracle.expected.internal.values(), *oracle.expected.downstream.values()):
        if not _crossing(sent):
            by_cause.setdefault(sent.causation_id, set()).add(sent.key)
    with _ro(db_path) as conn:
        conn.execute("BEGIN")  # one read transaction: one committed state
        offsets = dict(conn.execute("SELECT stream, seq FROM offsets").fetchall())
        seqs = sorted(int(r[0]) for r in conn.execute("SELECT seq FROM applied"))
        ids = {str(r[0]) for r in conn.execute("SELECT command_id FROM applied")}
        outbox = {str(k): bytes(p) for k, p in conn.execute("SELECT key, payload FROM outbox")}
        conn.execute("COMMIT")
    offset = sum(offsets.values())
    if seqs != list(range(1, offset + 1)):
        problems.append(
            f"applied seqs are not exactly 1..{offset} (the offset): {len(seqs)} rows, "
            f"max {seqs[-1] if seqs else 0}"
        )
    lost = [c for c in ids if not by_cause.get(c, set()) <= outbox.keys()]
    if lost:
        problems.append(f"applied without all their effects in the outbox: {_sample(lost)}")
    orphans = [k for k, p in outbox.items() if decode_envelope(p)[0].causation_id not in ids]
    if orphans:
        problems.append(f"effects in the outbox without their command: {_sample(orphans)}")
    return problems


async def input_ends(dep: Deployment, js: JetStreamContext) -> dict[str, int]:
    """Last sequence of every input stream."""
    return {s: int((await js.stream_info(s)).state.last_seq) for s in dep.input_streams}


# -- phase 2: a downstream system down ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outage:
    """What was seen while one system was down."""

    system: str
    down_s: float
    others_settled_s: float
    """From the start of the outage until the other systems held every effect, in sync."""
    pending_while_down: int
    """Effects for the down system waiting in its ledgers just before ``heal``."""
    records_while_down: int
    """Records the down system took while down (0 expected)."""
    retries_while_down: int
    """Calls to the down system that failed transiently and were retried."""


async def outage(
    dep: Deployment,
    nc: NatsClient,
    js: JetStreamContext,
    oracle: Oracle,
    mix: Workload,
    alive: Callable[[], None],
    *,
    system: str,
    down_s: float,
    deadline_s: float,
) -> Outage:
    """``system`` down (``sim fail --mode down``) while ``mix`` is published; wait until the
    others hold every effect of it and are in sync, and at least ``down_s``; then ``heal``."""
    others = [s for s in SYSTEMS if s != system]
    before = {(r.system, r.key) for r in sim_records(dep.sim_db)}
    retried_before = _transient_calls(dep, system)
    await sim_control(nc, dep, "fail", system=system, for_s=down_s + deadline_s, mode="down")
    t0 = time.monotonic()
    oracle.send((c.subject, c.data) for c in mix.commands)
    await fo.publish_all(js, [(c.subject, c.data) for c in mix.commands])
    want = {s: oracle.downstream(s).keys() for s in others}

    def others_done() -> bool:
        held = {(r.system, r.key) for r in sim_records(dep.sim_db)}
        if any(not {(s, k) for k in keys} <= held for s, keys in want.items()):
            return False
        pending = open_keys(dep.db_path)
        return all(pending[s] == 0 for s in others) and pending[system] > 0

    await poll(others_done, alive, deadline_s=deadline_s, what=f"the systems but {system}")
    others_s = time.monotonic() - t0
    await anyio.sleep(max(0.0, down_s - others_s))
    pending = open_keys(dep.db_path)[system]
    taken = [r for r in sim_records(dep.sim_db) if r.system == system]
    new = sum(1 for r in taken if (r.system, r.key) not in before)
    retries = _transient_calls(dep, system) - retried_before
    await sim_control(nc, dep, "heal", system=system)
    return Outage(system, time.monotonic() - t0, others_s, pending, new, retries)


def _transient_calls(dep: Deployment, system: str) -> int:
    with _ro(dep.db_path) as conn:
        row = conn.execute(
            "SELECT count(*) FROM downstream_calls WHERE system = ? AND outcome = 'transient'",
            (system,),
        ).fetchone()
    return int(row[0])


# -- the soak ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Options:
    """What one soak run does."""

    rounds: int = 50
    appointments: int = 300
    outage_appointments: int = 100
    outage_s: float = 60.0
    system: str = "erp"
    seed: int = DEFAULT_SEED
    base_dir: str | None = None
    keep: bool = False


async def soak(opts: Options) -> dict[str, Any]:
    """Run both phases on a fresh embedded nats-server; the report (``problems`` empty when
    every check held)."""
    work = Path(tempfile.mkdtemp(prefix="caresync-soak-", dir=opts.base_dir))
    ok = False
    try:
        async with EmbeddedNats(work / "nats") as server:
            report = await _soak(server.url, work, opts)
        ok = not report["problems"]
    finally:
        if ok and not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"data and logs kept in {work}")
    return report


async def _soak(url: str, work: Path, opts: Options) -> dict[str, Any]:
    dep = make_deployment(url, "soak", work / "router")
    router = RouterProcess(dep)
    report: dict[str, Any] = {"options": dataclasses.asdict(opts), "problems": []}
    nc = await nats.connect(url, name="caresync-soak")
    try:
        async with dep.simulators():
            try:
                await router.start(nc)
                oracle = await load_refdata(
                    dep,
                    router.check_alive,
                    appointments=opts.appointments + opts.outage_appointments,
                    seed=opts.seed,
                )
                report["crash"] = await _crash_phase(dep, router, nc, oracle, opts, report)
                report["outage"] = await _outage_phase(dep, router, nc, oracle, opts, report)
            except SoakError as exc:
                report["problems"].append(str(exc))
            finally:
                report["router_exit"] = await router.stop()
    finally:
        await nc.close()
    if report["router_exit"] != 0:
        report["problems"].append(f"router exited with {report['router_exit']}")
    return report


async def _crash_phase(
    dep: Deployment,
    router: RouterProcess,
    nc: NatsClient,
    oracle: Oracle,
    opts: Options,
    report: dict[str, Any],
) -> dict[str, Any]:
    js = nc.jetstream(publish_async_max_pending=5000)
    mix = workload(dep, opts.appointments, seed=opts.seed, prefix="wf-")
    oracle.send((c.subject, c.data) for c in mix.commands)
    say(f"crash rounds: {mix.n} commands {mix.kinds()}, {opts.rounds} rounds")
    t0 = time.monotonic()
    await fo.publish_all(js, [(c.subject, c.data) for c in mix.commands])
    rng = random.Random(opts.seed)
    kills = await kill_rounds(dep, router, nc, oracle, rng, rounds=opts.rounds, deadline_s=600.0)
    say("settling")
    settle_s = await wait_settled(dep, js, router.check_alive, deadline_s=900.0)
    found = verify(dep, oracle, await input_ends(dep, js))
    report["problems"] += [f"crash rounds: {p}" for p in found.problems]
    report["problems"] += [
        f"right after kill {n}: {p}" for n, k in enumerate(kills, 1) for p in k.invariants
    ]
    say(f"crash rounds: {len(kills)} kills, settled in {settle_s:.1f} s after the last")
    return {
        "commands": mix.n,
        "kills": len(kills),
        "restart_s_max": round(max((k.restart_s for k in kills), default=0.0), 2),
        "settled_after_last_kill_s": round(settle_s, 1),
        "elapsed_s": round(time.monotonic() - t0, 1),
        "counts": found.counts,
    }


async def _outage_phase(
    dep: Deployment,
    router: RouterProcess,
    nc: NatsClient,
    oracle: Oracle,
    opts: Options,
    report: dict[str, Any],
) -> dict[str, Any]:
    js = nc.jetstream(publish_async_max_pending=5000)
    mix = workload(dep, opts.outage_appointments, seed=opts.seed + 1, prefix="wo-")
    say(f"outage: {opts.system} down {opts.outage_s:g} s, {mix.n} commands")
    seen = await outage(
        dep,
        nc,
        js,
        oracle,
        mix,
        router.check_alive,
        system=opts.system,
        down_s=opts.outage_s,
        deadline_s=600.0,
    )
    settle_s = await wait_settled(dep, js, router.check_alive, deadline_s=900.0)
    found = verify(dep, oracle, await input_ends(dep, js))
    if seen.records_while_down or not seen.pending_while_down:
        report["problems"].append(f"outage: {seen}")
    report["problems"] += [f"after the outage: {p}" for p in found.problems]
    say(f"outage: the others in sync after {seen.others_settled_s:.1f} s, all after the heal")
    return {
        "commands": mix.n,
        "system": seen.system,
        "down_s": round(seen.down_s, 1),
        "others_settled_s": round(seen.others_settled_s, 1),
        "pending_while_down": seen.pending_while_down,
        "records_while_down": seen.records_while_down,
        "retries_while_down": seen.retries_while_down,
        "settled_after_heal_s": round(settle_s, 1),
        "counts": found.counts,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python bench/soak_crash.py [--rounds N] ...``: exit status 1 unless every check held."""
    parser = argparse.ArgumentParser(prog="soak_crash", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="SIGKILLs (default 50)")
    parser.add_argument("--appointments", type=int, default=300, help="crash-phase appointments")
    parser.add_argument("--outage-appointments", type=int, default=100)
    parser.add_argument("--outage-s", type=float, default=60.0, help="how long a system is down")
    parser.add_argument("--system", choices=SYSTEMS, default="erp", help="the system taken down")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--data-dir", help="where the temporary deployment is made")
    parser.add_argument("--keep", action="store_true", help="keep the deployment's files")
    args = parser.parse_args(argv)
    opts = Options(
        rounds=args.rounds,
        appointments=args.appointments,
        outage_appointments=args.outage_appointments,
        outage_s=args.outage_s,
        system=args.system,
        seed=args.seed,
        base_dir=args.data_dir,
        keep=args.keep,
    )
    configure_logging("error")
    report = anyio.run(soak, opts, backend="asyncio")
    print(json.dumps(report, indent=2), flush=True)
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
