"""``caresync bench workflow``: the issue 3 mix with connectors and simulators on.

One fresh embedded deployment; the router runs as ``caresync up --nats URL`` in its own process
with the default downstream connectors (NATS request/reply to the ``sim`` prefix), so it also
runs the billing, ERP and supply simulators (their records in ``DIR/sim.db``).  The bench
reference data (:mod:`caresync.bench.workflow_data`) is loaded and the stock applied before
anything is timed.

- **events/s** = commands published / seconds from the first publish until everything is
  settled: every source command applied, the router's and the connectors' consumers idle, the
  outbox all sent, no pending key in any billing, supply or ERP sync ledger, and the
  simulators' feedback outbox empty (read from the stores, read-only, every 0.25 s).
- **latency** = publish -> the last downstream call of the command's tree acknowledged by its
  system (``downstream_calls.at`` of the effects whose causation chain in the outbox leads to
  the command), on a separate paced set of appointments at 50 % of the measured rate.
- The raw nats-py loop (:mod:`caresync.bench.raw_loop`) then moves, for the same commands, as
  many messages as the caresync run moved (internal commands, downstream effects and their
  acknowledgements, simulator feedback).

Checks: purchase orders in the ERP simulator's own records equal the crossings the item actors
recorded (one per crossing, distinct PO ids), no duplicate records in the simulators, no
failed effect (connector calls and ledgers), nothing rejected, dead-lettered or parked.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import orjson
from anyio.abc import Process
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from caresync.actors import billing, erp, item, purchasing, supply
from caresync.bench import fanout as fo
from caresync.bench import report
from caresync.bench.deployment import measure, say
from caresync.bench.workflow_data import build_workflow, write_csv
from caresync.bench.workload import Workload
from caresync.codecs import Subjects, decode_envelope
from caresync.config import Config, load_config
from caresync.router.embedded import EmbeddedNats
from caresync.router.logs import configure_logging
from caresync.router.service import store_path, subjects_for
from caresync.store import read_only_union

SETTLE_POLL_S = 0.25
LATENCY_DEFINITION = (
    "publish -> the last downstream call of that command's tree acknowledged by its system "
    "(downstream_calls.at of every effect whose outbox causation chain leads to the command), "
    "paced at 50% of the measured caresync rate, after a 1 s pause"
)
DOWNSTREAM = (
    "connectors on (NATS request/reply) to the billing, ERP and supply simulators started by "
    "caresync up; end point: every effect acknowledged, every ledger in sync"
)


@dataclass(frozen=True, slots=True)
class Options:
    """What one ``bench workflow`` run does."""

    appointments: int = 5_000
    latency_appointments: int = 500
    seed: int = 7
    json: bool = False
    write_results: bool = False
    base_dir: str | None = None
    keep: bool = False
    command_line: str = "caresync bench workflow"
    processes: int = 1


def options(args: Any, command_line: str) -> Options:
    """From the parsed ``caresync bench`` arguments (``--m`` sets the appointments)."""
    quick = bool(getattr(args, "quick", False))
    m = getattr(args, "m", 2_000)
    appointments = 300 if quick else (m if m != 2_000 else 5_000)
    return Options(
        appointments=appointments,
        latency_appointments=max(20, min(200, appointments // 10)),
        seed=getattr(args, "seed", 7),
        json=args.json,
        write_results=args.write_results,
        base_dir=getattr(args, "data_dir", None),
        keep=getattr(args, "keep", False),
        command_line=command_line,
        processes=getattr(args, "processes", 1),
    )


_say = say


def router_environment(base: Mapping[str, str], processes: int = 1) -> dict[str, str]:
    """Ours minus data dir, config file, NATS URL, log and downstream settings: the default
    connectors (on, to the simulators) whatever the environment says; ``processes`` router
    processes."""
    dropped = (
        "CARESYNC_DATA_DIR",
        "CARESYNC_CONFIG",
        "CARESYNC_NATS__",
        "CARESYNC_LOG__",
        "CARESYNC_DOWNSTREAM__",
    )
    env = {k: v for k, v in base.items() if not k.upper().startswith(dropped)}
    env["CARESYNC_LOG__LEVEL"] = "warning"
    return fo.with_processes(env, processes)


async def run(opts: Options) -> int:
    """Run, print (table or JSON), record if asked; exit status 1 unless every check holds."""
    configure_logging("warning")
    try:
        result = await run_workflow(opts)
    except fo.BenchError as exc:
        if opts.json:
            print(orjson.dumps({"error": str(exc), "checks_ok": False}).decode())
        print(f"caresync bench: {exc}", file=sys.stderr)
        return 1
    print(report.as_json(result) if opts.json else table(result), flush=True)
    if opts.write_results:
        append_results(result, opts.command_line)
        _say(f"appended to {report.RESULTS_PATH}")
    return 0 if result["figures"]["checks_ok"] else 1


# -- reading the stores (read-only, while the router runs) ---------------------------------------
_decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {
    "billing": msgspec.msgpack.Decoder(billing.BillingState),
    "supply": msgspec.msgpack.Decoder(supply.SupplyState),
    "erp": msgspec.msgpack.Decoder(erp.ErpState),
    "purchasing": msgspec.msgpack.Decoder(purchasing.PurchasingState),
    "item": msgspec.msgpack.Decoder(item.ItemState),
}


def _ro(path: Path) -> sqlite3.Connection:
    return read_only_union(path, timeout_s=5.0)  # every partition file of a store


def store_state(
    db_path: Path, source_ids: int, id_like: str, *, ledgers: bool = True
) -> dict[str, int]:
    """Counts that say whether the router has settled (and what it has done).

    ``ledgers``: also decode every billing, supply, ERP and purchasing state and count the
    pending and failed keys of their sync ledgers (the costly part: one state per appointment).
    """
    conn = _ro(db_path)
    try:
        outbox = dict(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"))
        applied = conn.execute(
            "SELECT count(*) FROM applied WHERE kind = 'appointment' AND command_id LIKE ?",
            (id_like,),
        ).fetchone()[0]
        effects = conn.execute(
            "SELECT count(*) FROM outbox WHERE instr(subject, '.out.') > 0"
        ).fetchone()[0]
        pending = failed = opened = 0
        for kind in ("billing", "supply", "erp", "purchasing") if ledgers else ():
            for (blob,) in conn.execute("SELECT state FROM entities WHERE kind = ?", (kind,)):
                ledger = _decoders[kind].decode(blob).ledger
                opened += 1
                pending += len(ledger.pending)
                failed += len(ledger.failed)
        calls = conn.execute(
            "SELECT count(*), count(DISTINCT effect_key) FROM downstream_calls"
        ).fetchone()
        parked = conn.execute("SELECT count(*) FROM parked").fetchone()[0]
    finally:
        conn.close()
    return {
        "source_applied": int(applied),
        "source_expected": source_ids,
        "outbox_rows": sum(outbox.values()),
        "outbox_not_sent": sum(v for k, v in outbox.items() if k != "sent"),
        "effects_sent": int(effects),
        "ledgers": opened,
        "ledger_pending": pending,
        "ledger_failed": failed,
        "downstream_calls": int(calls[0]),
        "effects_called": int(calls[1]),
        "parked_messages": int(parked),
    }


def sim_state(sim_db: Path) -> dict[str, int]:
    """The simulators' records: per system, duplicates and feedback."""
    if not sim_db.exists():
        return {"sim_records": 0, "sim_feedback_pending": 0, "sim_feedback_sent": 0}
    conn = _ro(sim_db)
    try:
        records, distinct_keys, attempts = conn.execute(
            "SELECT count(*), count(DISTINCT system || '|' || key), "
            "coalesce(sum(attempts - 1), 0) FROM records"
        ).fetchone()
        pos, po_ids = conn.execute(
            "SELECT count(*), count(DISTINCT json_extract(data, '$.po_id')) FROM records "
            "WHERE system = 'erp' AND operation = 'purchase_order'"
        ).fetchone()
        sent, pending = conn.execute(
            "SELECT count(sent_at), count(*) - count(sent_at) FROM feedback"
        ).fetchone()
        by_system = dict(conn.execute("SELECT system, count(*) FROM records GROUP BY system"))
    finally:
        conn.close()
    return {
        "sim_records": int(records),
        "sim_duplicate_records": int(records) - int(distinct_keys),
        "sim_duplicate_attempts": int(attempts),
        "sim_billing_records": int(by_system.get("billing", 0)),
        "sim_supply_records": int(by_system.get("supply", 0)),
        "sim_erp_records": int(by_system.get("erp", 0)),
        "sim_purchase_orders": int(pos),
        "sim_po_ids_distinct": int(po_ids),
        "sim_feedback_sent": int(sent),
        "sim_feedback_pending": int(pending),
    }


async def consumers_idle(js: JetStreamContext, streams: Sequence[str]) -> bool:
    """Every consumer of ``streams`` has nothing pending and nothing unacknowledged."""
    for stream in streams:
        for info in await js.consumers_info(stream):
            if (info.num_pending or 0) or (info.num_ack_pending or 0):
                return False
    return True


def _settled(s: Mapping[str, int], sim: Mapping[str, int]) -> bool:
    return (
        s["source_applied"] >= s["source_expected"]
        and s["outbox_not_sent"] == 0
        and s["ledger_pending"] == 0
        and sim["sim_feedback_pending"] == 0
    )


async def wait_settled(
    js: JetStreamContext,
    streams: Sequence[str],
    db_path: Path,
    sim_db: Path,
    process: Process,
    *,
    source_ids: int,
    id_like: str,
    deadline_s: float,
    what: str,
) -> tuple[float, dict[str, int]]:
    """Poll until everything is settled twice in a row; (monotonic time first seen, counts)."""
    deadline = time.monotonic() + deadline_s
    first: float | None = None
    s: dict[str, int] = {}
    while True:
        now = time.monotonic()
        try:
            # Cheap first: every effect called, the consumers idle; then the ledgers.
            s = {**store_state(db_path, source_ids, id_like, ledgers=False), **sim_state(sim_db)}
            ok = (
                _settled(s, s)
                and s["effects_called"] >= s["effects_sent"]
                and await consumers_idle(js, streams)
            )
            if ok:
                s = {**store_state(db_path, source_ids, id_like), **sim_state(sim_db)}
                ok = _settled(s, s)
        except sqlite3.Error:
            ok = False
        if ok:
            if first is not None:
                return first, s
            first = now
        else:
            first = None
        if process.returncode is not None:
            raise fo.BenchError(f"{what}: router exited with {process.returncode}; reached {s}")
        if time.monotonic() > deadline:
            raise fo.BenchError(f"{what}: not settled within {deadline_s:g} s; reached {s}")
        await anyio.sleep(SETTLE_POLL_S)


def crossings(db_path: Path) -> dict[str, int]:
    """Crossings and purchase orders the item actors recorded."""
    conn = _ro(db_path)
    try:
        total = orders = 0
        for (blob,) in conn.execute("SELECT state FROM entities WHERE kind = 'item'"):
            state = _decoders["item"].decode(blob)
            total += state.crossings
            orders += len(state.purchase_orders)
        failed = conn.execute(
            "SELECT count(*) FROM downstream_calls WHERE outcome = 'failed'"
        ).fetchone()[0]
    finally:
        conn.close()
    return {"item_crossings": total, "item_purchase_orders": orders, "calls_failed": int(failed)}


def tree_latencies_ms(
    db_path: Path, roots: Mapping[str, float], subjects: Subjects
) -> tuple[list[float], int]:
    """Per root command id (-> publish wall time): its last downstream call's ``at`` minus the
    publish (the command's own applied_at if its tree has no downstream effect), sorted; and
    how many roots had no downstream effect."""
    conn = _ro(db_path)
    try:
        children: dict[str, list[str]] = {}
        downstream: set[str] = set()
        out_prefix = f"{subjects.prefix}.out."
        for key, subject, payload in conn.execute("SELECT key, subject, payload FROM outbox"):
            env, _ = decode_envelope(payload)
            children.setdefault(env.causation_id, []).append(key)
            if subject.startswith(out_prefix):
                downstream.add(key)
        acked = dict(conn.execute("SELECT effect_key, max(at) FROM downstream_calls GROUP BY 1"))
        applied = dict(
            conn.execute("SELECT command_id, applied_at FROM applied WHERE kind = 'appointment'")
        )
    finally:
        conn.close()
    out: list[float] = []
    bare = 0
    for root, published in roots.items():
        stack, done = [root], []
        while stack:
            key = stack.pop()
            if key in downstream:
                if key not in acked:
                    raise fo.BenchError(f"effect {key} of {root} was never called")
                done.append(acked[key])
            stack.extend(children.get(key, ()))
        if not done:
            bare += 1
            done.append(applied[root])
        out.append((max(done) - published) * 1000.0)
    return sorted(out), bare


# -- the run --------------------------------------------------------------------------------------
async def run_workflow(opts: Options) -> dict[str, Any]:
    """Build the workloads, start the deployment, measure caresync then the raw loop."""
    env = router_environment(os.environ, opts.processes)
    cfg = load_config(None, environ=env)
    subjects = subjects_for(cfg)
    workload = build_workflow(opts.appointments, seed=opts.seed, subjects=subjects)
    latency = build_workflow(
        opts.latency_appointments, seed=opts.seed + 1, prefix="wl-", subjects=subjects
    )
    info = report.machine()

    async def caresync_phase(
        nc: NatsClient, js: JetStreamContext, server: EmbeddedNats, tmp: Path
    ) -> dict[str, Any]:
        return await _caresync(nc, js, server, tmp, env, cfg, opts, workload, latency)

    cs, raw = await measure(
        cfg=cfg,
        workload=workload,
        caresync_phase=caresync_phase,
        unit="events/s",
        prefix="caresync-bench-wf-",
        base_dir=opts.base_dir,
        keep=opts.keep,
    )
    return build_result(opts, cfg, info, workload, cs, raw)


async def _caresync(
    nc: NatsClient,
    js: JetStreamContext,
    server: EmbeddedNats,
    tmp: Path,
    env: dict[str, str],
    cfg: Config,
    opts: Options,
    workload: Workload,
    latency: Workload,
) -> dict[str, Any]:
    subjects = subjects_for(cfg)
    router_dir = tmp / "router"
    db_path = store_path(cfg, router_dir)
    sim_db = router_dir / "sim.db"
    streams = subjects.input_streams()
    streams.append(subjects.output_stream)
    process = await fo.start_router(server.url, router_dir, env)
    try:
        await fo.wait_ready(nc, subjects, process, Path(f"{router_dir}.log"))
        # -- reference data: loaded, kept by the router, stock applied; not timed
        refdata_dir = tmp / "refdata"
        stock_rows = write_csv(refdata_dir, opts.appointments, opts.seed)
        loaded = await fo.load_refdata(server.url, refdata_dir, env, tmp / "refdata.log")
        version, stock_sent = int(loaded["version"]), int(loaded["stock_commands"])
        await fo.wait_refdata(db_path, process, version)
        await fo.wait_applied(
            nc,
            subjects,
            process,
            accepted=stock_sent,
            duplicates=0,
            deadline_s=60.0,
            what="stock commands",
        )
        deadline_s = 300.0 + workload.n / 5
        _say(
            f"caresync workflow: {opts.appointments} appointments, {workload.n} commands "
            f"{workload.kinds()}; refdata version {version}, {stock_sent} stock commands; in {tmp}"
        )
        before = {**store_state(db_path, 0, "wf-%", ledgers=False), **sim_state(sim_db)}
        # -- timed: throughput to "all downstream effects acknowledged"
        meter = report.CpuMeter(
            {"router": process.pid, "nats-server": server.pid}, trees=frozenset({"router"})
        )
        messages = [(c.subject, c.data) for c in workload.commands]
        t0 = time.monotonic()
        publish_s = await fo.publish_all(js, messages)
        settled_at, after = await wait_settled(
            js,
            streams,
            db_path,
            sim_db,
            process,
            source_ids=workload.unique,
            id_like="wf-%",
            deadline_s=deadline_s,
            what="throughput phase",
        )
        elapsed = settled_at - t0
        cpu = meter.cores()
        # -- paced latency subset
        rate = 0.5 * workload.n / elapsed
        published = await fo.latency_phase(js, latency, rate)
        _, final = await wait_settled(
            js,
            streams,
            db_path,
            sim_db,
            process,
            source_ids=latency.unique,
            id_like="wl-%",
            deadline_s=deadline_s,
            what="latency phase",
        )
        record = await fo.health(nc, subjects)
    finally:
        with anyio.CancelScope(shield=True):
            status = await fo.stop_router(process)
    reached = fo.totals(record)
    lat, bare = tree_latencies_ms(db_path, published, subjects)
    final = {**store_state(db_path, latency.unique, "wl-%"), **sim_state(sim_db)}
    items = crossings(db_path)
    # Message moves of the throughput phase: internal commands and downstream effects (outbox),
    # one acknowledgement per effect called, and the simulators' feedback.
    moves = (
        (after["outbox_rows"] - before["outbox_rows"])
        + (after["effects_called"] - before["effects_called"])
        + (after["sim_feedback_sent"] - before["sim_feedback_sent"])
    )
    checks: dict[str, int] = {
        "item_crossings": items["item_crossings"],
        "item_purchase_orders": items["item_purchase_orders"],
        "sim_purchase_orders": final["sim_purchase_orders"],
        "sim_po_ids_distinct": final["sim_po_ids_distinct"],
        "sim_records": final["sim_records"],
        "sim_billing_records": final["sim_billing_records"],
        "sim_supply_records": final["sim_supply_records"],
        "sim_erp_records": final["sim_erp_records"],
        "sim_duplicate_records": final["sim_duplicate_records"],
        "sim_duplicate_attempts": final["sim_duplicate_attempts"],
        "sim_feedback_sent": final["sim_feedback_sent"],
        "sim_feedback_pending": final["sim_feedback_pending"],
        "calls_failed": items["calls_failed"],
        "ledgers_open": final["ledgers"],
        "ledger_pending": final["ledger_pending"],
        "ledger_failed": final["ledger_failed"],
        "downstream_calls": final["downstream_calls"],
        "effects_called": final["effects_called"],
        "outbox_rows": final["outbox_rows"],
        "outbox_not_sent": final["outbox_not_sent"],
        "commands_applied": after["source_applied"] + final["source_applied"],
        "commands_expected": workload.unique + latency.unique,
        "rejected_dead_parked": sum(
            reached.get(k, 0) for k in ("rejected", "dead_lettered", "parked")
        ),
        "parked_messages": final["parked_messages"],
        "stock_commands": stock_sent,
        "stock_expected": stock_rows,
        "refdata_version": version,
        "latency_without_effects": bare,
        "router_exit": status,
    }
    return {
        "elapsed_s": elapsed,
        "publish_s": publish_s,
        "cpu": cpu,
        "latency_ms": lat,
        "latency_rate": rate,
        "latency_n": len(lat),
        "checks": checks,
        "moves": moves,
        "effects": after["effects_called"] - before["effects_called"],
        "internal_and_effects": after["outbox_rows"] - before["outbox_rows"],
        "feedback": after["sim_feedback_sent"] - before["sim_feedback_sent"],
        "deadline_s": deadline_s,
    }


def check_results(c: Mapping[str, int]) -> dict[str, bool]:
    """Each check, passed or not."""
    return {
        "one_po_per_crossing": c["sim_purchase_orders"]
        == c["item_crossings"]
        == c["item_purchase_orders"]
        == c["sim_po_ids_distinct"],
        "crossings_happened": c["item_crossings"] > 0,
        "no_duplicate_records": c["sim_duplicate_records"] == 0,
        "no_failed_effects": c["calls_failed"] == 0 and c["ledger_failed"] == 0,
        "all_in_sync": c["ledger_pending"] == 0 and c["outbox_not_sent"] == 0,
        "feedback_delivered": c["sim_feedback_pending"] == 0,
        "all_applied": c["commands_applied"] == c["commands_expected"],
        "nothing_refused": c["rejected_dead_parked"] == 0 and c["parked_messages"] == 0,
        "stock_loaded": c["stock_commands"] == c["stock_expected"],
        "router_clean_exit": c["router_exit"] == 0,
    }


# -- output ---------------------------------------------------------------------------------------
def build_result(
    opts: Options,
    cfg: Config,
    info: dict[str, Any],
    workload: Workload,
    cs: dict[str, Any],
    raw: dict[str, Any],
) -> dict[str, Any]:
    """The run's figures, conditions, machine and checks, as printed and recorded."""
    lat: list[float] = cs["latency_ms"]
    passed = check_results(cs["checks"])
    rate = workload.n / cs["elapsed_s"]
    raw_rate = workload.n / raw["elapsed_s"]
    r = cfg.router
    figures = {
        "events_per_s": round(rate, 1),
        "caresync_commands_per_s": round(rate, 1),
        "caresync_s": round(cs["elapsed_s"], 3),
        "caresync_publish_s": round(cs["publish_s"], 3),
        "caresync_cpu_cores": cs["cpu"],
        "raw_commands_per_s": round(raw_rate, 1),
        "raw_s": round(raw["elapsed_s"], 3),
        "raw_publish_s": round(raw["publish_s"], 3),
        "raw_cpu_cores": raw["cpu"],
        "ratio": round(rate / raw_rate, 4),
        "latency_n": len(lat),
        "latency_rate_per_s": round(cs["latency_rate"], 1),
        "latency_p50_ms": round(fo.percentile(lat, 50), 2),
        "latency_p99_ms": round(fo.percentile(lat, 99), 2),
        "latency_max_ms": round(lat[-1], 2),
        "checks_ok": all(passed.values()),
    }
    conditions = {
        "workload": "workflow",
        "appointments": workload.keys,
        "n": workload.n,
        "kinds": workload.kinds(),
        "latency_appointments": opts.latency_appointments,
        "moves": cs["moves"],
        "moves_detail": {
            "internal_and_effects": cs["internal_and_effects"],
            "acks": cs["effects"],
            "feedback": cs["feedback"],
        },
        "downstream_effects": cs["effects"],
        "downstream": DOWNSTREAM,
        "seed": opts.seed,
        "router": {
            "batch_size": r.batch_size,
            "batches_in_flight": r.batches_in_flight,
            "partitions": cfg.streams.partitions,
            "processes": r.processes,
            "storage": cfg.streams.storage,
            "synchronous": cfg.store.synchronous,
        },
        "durability": report.DURABILITY,
        "processes": f"{r.processes} router (with connectors and simulators) + 1 driver "
        "(raw: 1 raw loop + 1 driver), 1 nats-server",
        "refdata": "3 facilities, 200 items, 10 procedures with cards of 3-5 items, 3 payers; "
        "stock sized so that some items cross their reorder points",
        "latency": LATENCY_DEFINITION,
        "raw_counts": {k: raw[k] for k in ("consumed_in", "published_fx", "consumed_fx")},
    }
    return {
        "date": report.today(),
        "command_line": opts.command_line,
        "figures": figures,
        "conditions": conditions,
        "machine": info,
        "checks": cs["checks"],
        "check_results": passed,
    }


def rows(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows: conditions and machine first, then the figures."""
    c, m, f = result["conditions"], result["machine"], result["figures"]
    fmt = report._fmt  # the fan-out table's number formatting
    return [
        ("workload", c["workload"]),
        ("appointments / commands", f"{fmt(c['appointments'])} / {fmt(c['n'])}"),
        ("commands by kind", fmt(c["kinds"])),
        (
            "message moves",
            f"{fmt(c['moves'])} ({fmt(c['moves_detail'])}); raw loop the same",
        ),
        ("downstream", c["downstream"]),
        ("reference data", c["refdata"]),
        ("router settings", fmt(c["router"])),
        ("durability", c["durability"]),
        ("processes", c["processes"]),
        *report.measured_rows(m, f, rate_label="caresync events/s", latency=LATENCY_DEFINITION),
        ("checks_ok", fmt(f["checks_ok"])),
        ("  check results", fmt(result["check_results"])),
        ("  counts", fmt(result["checks"])),
    ]


def table(result: Mapping[str, Any]) -> str:
    """The figures as an aligned two-column text table."""
    return report.table(result, rows)


def append_results(
    result: Mapping[str, Any], command_line: str, path: Path = report.RESULTS_PATH
) -> None:
    """Append a dated section to RESULTS.md, in the fan-out sections' format."""
    report.append_results(result, command_line, path, rows)
