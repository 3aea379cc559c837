"""``caresync bench WORKLOAD --quick --json`` runs end to end and reports exactly-once.

No timing assertions: the figures only have to be there and positive.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from caresync.bench.expected import PureRouter, fanout_by_kind, run_pure
from caresync.bench.fanout import BenchError
from caresync.bench.peer import find_script, parse_summary
from caresync.bench.refdata import read_back, write_csv
from caresync.bench.workload import build_workload
from caresync.codecs import Subjects
from caresync.router.processes import caresync_command


def bench_json(tmp_path: Path, workload: str, *extra: str) -> dict[str, Any]:
    """``caresync bench WORKLOAD --quick --json``: exit 0 and exactly one JSON object on stdout."""
    try:
        result = subprocess.run(
            [
                *caresync_command(),
                "bench",
                workload,
                "--quick",
                "--json",
                "--data-dir",
                str(tmp_path),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench did not finish in 120 s; stderr:\n{exc.stderr!r}")
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_workload_mirrors_the_peer_shape() -> None:
    w = build_workload(2_000, 200, items_per_procedure=3)
    assert w.n == 2_000
    assert w.keys == 200
    assert 0 < w.duplicates < 0.1 * w.n
    per_key: dict[str, list[str]] = {}
    for c in w.unique_commands():
        per_key.setdefault(c.key, []).append(c.name)
    assert len(per_key) == 200
    ended = 0
    for names in per_key.values():
        assert names[0] == "book"
        assert set(names[1:-1]) <= {"reschedule"}
        # As in the peer: a re-send that fills the key's last slot leaves it without an end.
        ended += names[-1] in ("complete", "cancel")
    assert ended > 0.8 * len(per_key)
    assert set(w.kinds()) == {"book", "reschedule", "complete", "cancel"}
    assert w == build_workload(2_000, 200, items_per_procedure=3)  # seeded


def test_pure_model_fans_out_per_command_kind(tmp_path: Path) -> None:
    """With 3 items per card: billing, supply and ERP from the appointment, then 3 item
    commands from supply, for a booking and for its end; a reschedule only tells ERP."""
    subjects = Subjects()
    w = build_workload(400, 40, items_per_procedure=3, subjects=subjects)
    write_csv(tmp_path, 3)
    pure = PureRouter(subjects, read_back(tmp_path, version=1))
    model = run_pure(pure, [(c.subject, c.data) for c in w.commands])
    assert model.rejected == 0
    assert model.duplicates == w.duplicates
    assert model.internal_sent == len(model.internal)  # every Msg-Id distinct
    kinds = fanout_by_kind(model.outcomes, {c.command_id: c.name for c in w.unique_commands()})
    assert kinds["book"]["by_target"] == {
        "billing.update": 1,
        "erp.demand": 1,
        "item.reserve": 3,
        "procedure.update": 1,
        "supply.plan": 1,
    }
    for end in ("complete", "cancel"):
        assert kinds[end]["by_target"] == {
            "billing.update": 1,
            "erp.demand": 1,
            "item.release": 3,
            "procedure.update": 1,
            "supply.plan": 1,
        }
        assert kinds[end]["from_appointment"] == 4
    assert set(kinds["reschedule"]["by_target"]) == {"erp.demand"}  # unless the date is the same
    assert 0.9 < kinds["reschedule"]["internal"] <= 1


def test_bench_fanout_quick_json(tmp_path: Path) -> None:
    doc = bench_json(tmp_path, "fanout")
    for name in (
        "caresync_commands_per_s",
        "raw_commands_per_s",
        "ratio",
        "latency_p50_ms",
        "latency_p99_ms",
    ):
        assert isinstance(doc[name], int | float), name
        assert doc[name] > 0, name
    assert doc["exactly_once"] is True, doc["checks"]
    assert doc["conditions"]["n"] == 2_000
    assert doc["conditions"]["fanout"] > 1
    assert doc["checks"]["missing"] == 0
    assert doc["checks"]["internal_in_stream"] == doc["checks"]["internal_expected"] > 0
    assert doc["checks"]["stock_commands"] > 0


def test_bench_fanout_in_two_router_processes_is_exactly_once(tmp_path: Path) -> None:
    """Two processes on two partitions sharing the store: same exactly-once checks."""
    doc = bench_json(tmp_path, "fanout", "--processes", "2")
    router = doc["conditions"]["router"]
    assert (router["processes"], router["partitions"]) == (2, 2)
    assert doc["exactly_once"] is True, doc["checks"]
    checks = doc["checks"]
    assert checks["applied_rows"] == checks["expected_rows"] > 0
    assert checks["downstream_in_stream"] == checks["downstream_distinct_msg_ids"] > 0
    assert checks["outbox_not_sent"] == 0
    assert doc["caresync_cpu_cores"]["router"] > 0


def test_bench_latency_quick_json(tmp_path: Path) -> None:
    """Three paced phases at 25/50/75 % of the measured peak, each with p50/p99/p999."""
    doc = bench_json(tmp_path, "latency")
    assert doc["conditions"]["workload"] == "latency"
    levels = doc["latency_levels"]
    assert [lv["level"] for lv in levels] == [0.25, 0.5, 0.75]
    rates = [lv["rate_per_s"] for lv in levels]
    assert rates == sorted(rates)
    assert rates[0] > 0
    for lv in levels:
        assert lv["n"] == 500
        assert 0 < lv["p50_ms"] <= lv["p99_ms"] <= lv["p999_ms"] <= lv["max_ms"]
    assert doc["latency_p99_ms"] == levels[1]["p99_ms"]
    assert doc["exactly_once"] is True, doc["checks"]


def test_restate_summary_line_is_read() -> None:
    out = (
        "runs: 3\nend-to-end events/s:  median 185.2\n"
        "restate: 20000 events, 2000 keys, 185.2 events/s end-to-end, p99 188.0 ms\n"
    )
    assert parse_summary(out) == (20_000, 2_000, 185.2, 188.0)
    with pytest.raises(BenchError, match="no summary line"):
        parse_summary("restate-peer: npm failed\n")


def test_restate_harness_is_found_beside_the_repository_or_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "run_restate_peer.sh"
    script.write_text("#!/bin/sh\n")
    assert find_script(str(script)) == script
    monkeypatch.setenv("CARESYNC_RESTATE_PEER", str(script))
    assert find_script() == script
    monkeypatch.setenv("CARESYNC_RESTATE_PEER", str(tmp_path / "absent.sh"))
    beside = Path(__file__).resolve().parents[2] / "shared/peers/restate/run_restate_peer.sh"
    if beside.is_file():
        assert find_script() == beside
    else:
        with pytest.raises(BenchError, match="CARESYNC_RESTATE_PEER"):
            find_script()


def test_bench_workflow_quick_json(tmp_path: Path) -> None:
    """Connectors and simulators on: figures present, every check true (no timing asserts)."""
    doc = bench_json(tmp_path, "workflow")
    for name in (
        "events_per_s",
        "raw_commands_per_s",
        "ratio",
        "latency_p50_ms",
        "latency_p99_ms",
    ):
        assert isinstance(doc[name], int | float), name
        assert doc[name] > 0, name
    assert doc["checks_ok"] is True, doc["check_results"]
    assert all(doc["check_results"].values()), doc["check_results"]
    checks = doc["checks"]
    assert checks["sim_purchase_orders"] == checks["item_crossings"] > 0
    assert checks["sim_duplicate_records"] == 0
    assert checks["calls_failed"] == checks["ledger_failed"] == 0
    assert doc["conditions"]["appointments"] == 300


def test_bench_ingest_quick_json(tmp_path: Path) -> None:
    """Decode rates and raw bookings through the router: figures present, nothing rejected."""
    doc = bench_json(tmp_path, "ingest")
    assert doc["decode"]["siu_per_s"] > 0
    assert doc["decode"]["dft_per_s"] > 0
    routed = doc["router"]
    assert routed["n"] == 1_000
    assert routed["rejected"] == 0
    # every booking was applied, with its fan-out (procedure, billing, supply, ERP, visit...)
    assert routed["commands_applied"] > routed["n"]
    assert routed["ingest_per_s"] > 0
    assert routed["end_to_end_per_s"] > 0


def test_bench_replay_quick_json(tmp_path: Path) -> None:
    """A history applied live with a state snapshot at 90 %, then rebuilt from the snapshot and
    in full: figures present, both states equal to the live one."""
    doc = bench_json(tmp_path, "replay")
    full = doc["full"]
    for name in ("events_per_s", "source_events_per_s", "rebuild_s", "rss_peak_mb"):
        for figures in (doc, full):
            assert isinstance(figures[name], int | float), name
            assert figures[name] > 0, name
    assert doc["ok"] is True, doc["checks"]
    assert doc["conditions"]["n"] == 20_000
    assert doc["tail_commands"] == 2_000
    assert doc["source_events"] == 20_000 + doc["checks"]["stock_commands"]
    # One partition: every internal command is applied with its cause, recorded on cs.loc.
    assert doc["internal_messages"] == 0
    assert doc["local_records"] > 0
    input_messages = doc["source_events"] + doc["internal_messages"]
    assert full["messages_replayed"] == input_messages
    assert 0 < doc["messages_replayed"] == input_messages - doc["snapshot_offset"]
    assert doc["snapshot_used"] is True
    assert doc["snapshot_bytes"] > 0
    assert doc["entities"] == full["entities"] > doc["conditions"]["m"]
    assert doc["state_matches_live"] is True
    assert full["state_matches_live"] is True
    assert doc["pending_effects"] == full["pending_effects"] == 0


def test_bench_entities_quick_json(tmp_path: Path) -> None:
    """M bookings, idle, restart: every appointment booked once, memory and restart measured."""
    doc = bench_json(tmp_path, "entities")
    for name in (
        "router_rss_idle_mb",
        "router_rss_busy_mb",
        "nats_server_rss_idle_mb",
        "restart_to_ready_s",
        "restart_to_ready_line_s",
    ):
        assert isinstance(doc[name], int | float), name
        assert doc[name] > 0, name
    assert doc["ok"] is True, doc["checks"]
    assert doc["conditions"]["m"] == 20_000
    assert doc["booked"] == doc["appointments"] == 20_000
    assert doc["live_actors_idle"] == 0
    assert doc["checks"]["ready_after_restart"] is True
    assert doc["checks"]["refused"] == 0


def test_steady_workload_keeps_its_mix_from_first_to_last_command() -> None:
    """Paced, a workload whose keys all start together books at its head and ends at its
    tail: a steady one has the throughput workload's mix in every stretch, and every key's
    commands in order once its warm-up (the lifecycles' beginnings) is sent first."""
    n, m = 20_000, 2_000  # lifecycles of 10 commands: 1 booking, 8 reschedules, 1 end
    w = build_workload(n, m, items_per_procedure=3, dup_rate=0.0, steady=True)
    assert w.n == n
    assert w.duplicates == 0
    assert 0.35 * n < len(w.warmup) < 0.55 * n  # a lane starts at step 0..9: 4.5 on average
    # Every key in order: booked first, never past its end, warm-up before the timed part.
    per_key: dict[str, list[str]] = {}
    for c in [*w.warmup, *w.commands]:
        per_key.setdefault(c.key, []).append(c.command_id)
    for key, ids in per_key.items():
        assert ids == sorted(ids, key=lambda cid: int(cid.rsplit("-e", 1)[1])), key
        assert ids[0].endswith("-e0"), key
    assert len(per_key) == w.keys
    # The mix of each tenth of the timed commands, first and last included.
    tenth = n // 10
    for i in range(10):
        names = Counter(c.name for c in w.commands[i * tenth : (i + 1) * tenth])
        assert 0.07 * tenth < names["book"] < 0.13 * tenth, (i, names)
        assert 0.07 * tenth < names["complete"] + names["cancel"] < 0.13 * tenth, (i, names)
    # The old shape, for contrast: the peer's order books every key in its first tenth.
    head = Counter(c.name for c in build_workload(n, m, dup_rate=0.0).commands[:tenth])
    assert head["book"] == tenth
    assert w == build_workload(n, m, items_per_procedure=3, dup_rate=0.0, steady=True)
