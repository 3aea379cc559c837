"""Conditions, machine, CPU accounting and the output of the figures (table, JSON, RESULTS.md)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from caresync.bench.fanout import BenchError, percentile
from caresync.bench.peer import DURABILITY as PEER_DURABILITY
from caresync.bench.peer import PeerResult
from caresync.bench.workload import Workload
from caresync.config import Config

DURABILITY = (
    "JetStream file storage, PubAck on every publish, "
    "SQLite WAL synchronous=NORMAL committed per batch before ack"
)
LATENCY_DEFINITION = (
    "publish -> all internal fan-out commands of that command applied, every hop (the "
    "applied_at of the last of them, or of the command itself if it fans out to nothing, "
    "stamped when the router starts applying that batch), paced at a fraction of the "
    "measured caresync throughput (50% unless stated), the same mix of kinds all through a "
    "level (lanes of lifecycles started at a random step; the steps before it sent untimed "
    "first and applied), each level after a 1 s pause"
)
DOWNSTREAM = "connectors off (no simulator): downstream effects end in the output stream, not timed"
IN_FLIGHT = 5000
"""Publishes the driver keeps in flight (awaiting their PubAcks)."""
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nats_server_version() -> str:
    """``nats-server --version`` of the binary the embedded server uses."""
    from caresync.router.embedded import nats_server_binary

    try:
        out = subprocess.run(
            [str(nats_server_binary()), "--version"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return out.stdout.strip() or out.stderr.strip()


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "nats_server": nats_server_version(),
        "nats_py": metadata.version("nats-py"),
        "loadavg_before": " ".join(load),
    }


def _proc_cpu_s(pid: int, *, children: bool = False) -> float:
    """CPU seconds of a process; with ``children``, plus those of its running children (a
    router's other processes) and of the children it has waited for."""
    if not children:
        fields = _stat_fields(Path(f"/proc/{pid}/stat"))
        return (int(fields[11]) + int(fields[12])) / _TICK if fields else 0.0  # utime, stime
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields and (stat.parent.name == str(pid) or fields[1] == str(pid)):
            total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return total / _TICK


def _stat_fields(path: Path) -> list[str]:
    """The fields of a /proc/PID/stat after the command name ([1] is the parent's pid)."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _machine_busy_s() -> float:
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / _TICK


class CpuMeter:
    """CPU seconds of named processes (and of the whole machine) between two snapshots."""

    def __init__(self, pids: Mapping[str, int], trees: frozenset[str] = frozenset()) -> None:
        """``trees``: the names whose children are counted with them (``router``)."""
        self._pids = {**pids, "driver": os.getpid()}
        self._trees = trees
        self._start = self._snap()

    def _snap(self) -> dict[str, float]:
        snap = {
            name: _proc_cpu_s(pid, children=name in self._trees) for name, pid in self._pids.items()
        }
        snap["_machine"] = _machine_busy_s()
        snap["_t"] = time.monotonic()
        return snap

    def cores(self) -> dict[str, float]:
        """Cores used per process since construction; ``other`` is the rest of the machine."""
        end = self._snap()
        wall = max(end["_t"] - self._start["_t"], 1e-9)
        out = {}
        ours = 0.0
        for name in self._pids:
            used = end[name] - self._start[name]
            ours += used
            out[name] = round(used / wall, 2)
        out["other"] = round(max(0.0, end["_machine"] - self._start["_machine"] - ours) / wall, 2)
        return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value).lower() if isinstance(value, bool) else str(value)


def rows(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows: conditions and machine first, then the figures."""
    c, m, f = result["conditions"], result["machine"], result["figures"]
    return [
        ("workload", c["workload"]),
        ("commands N / keys M", f"{_fmt(c['n'])} / {_fmt(c['m'])}"),
        ("unique / duplicates", f"{_fmt(c['unique'])} / {_fmt(c['duplicates'])} re-sends"),
        ("items per preference card", str(c["items"])),
        ("fan-out per command", fanout_text(c)),
        *((f"  {kind}", _kind_text(row)) for kind, row in c["fanout_by_kind"].items()),
        ("downstream", c["downstream"]),
        ("router settings", _fmt(c["router"])),
        ("durability", c["durability"]),
        ("processes", c["processes"]),
        *measured_rows(m, f, rate_label="caresync commands/s", latency=LATENCY_DEFINITION),
        *_level_rows(f.get("latency_levels", [])),
        *(
            (f"  batch stages, {phase}", _fmt(means))
            for phase, means in c.get("stages", {}).items()
        ),
        *_peer_rows(f, c),
        ("exactly_once", _fmt(f["exactly_once"])),
        ("  checks", _fmt(result["checks"])),
    ]


def machine_rows(m: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Where it ran: machine, software, load before the run."""
    return [
        ("machine", f"{m['platform']}; {m['cpu']}; {m['cores']} cores"),
        ("software", f"Python {m['python']}, {m['nats_server']}, nats-py {m['nats_py']}"),
        ("load average before", m["loadavg_before"]),
    ]


def measured_rows(
    m: Mapping[str, Any], f: Mapping[str, Any], *, rate_label: str, latency: str
) -> list[tuple[str, str]]:
    """The rows every benchmark shares: machine, caresync and raw-loop figures, latency."""
    return [
        *machine_rows(m),
        (rate_label, _fmt(f["caresync_commands_per_s"])),
        ("  end-to-end s / publish s", f"{f['caresync_s']:.2f} / {f['caresync_publish_s']:.2f}"),
        ("  cores used", _fmt(f["caresync_cpu_cores"])),
        ("raw loop commands/s", _fmt(f["raw_commands_per_s"])),
        ("  end-to-end s / publish s", f"{f['raw_s']:.2f} / {f['raw_publish_s']:.2f}"),
        ("  cores used", _fmt(f["raw_cpu_cores"])),
        ("ratio caresync / raw", f"{f['ratio']:.3f}"),
        ("latency p50 / p99 ms", f"{f['latency_p50_ms']:.1f} / {f['latency_p99_ms']:.1f}"),
        ("  latency defined as", f"{latency} ({f['latency_rate_per_s']:.0f}/s)"),
        ("  latency commands / max ms", f"{f['latency_n']} / {f['latency_max_ms']:.1f}"),
    ]


def _level_rows(levels: list[dict[str, Any]]) -> list[tuple[str, str]]:
    if len(levels) < 2:
        return []
    return [
        (
            f"latency at {lv['level']:.0%} of peak",
            f"{lv['rate_per_s']:,.0f}/s: p50 {lv['p50_ms']:.1f} / p99 {lv['p99_ms']:.1f} / "
            f"p999 {lv['p999_ms']:.1f} / max {lv['max_ms']:.1f} ms ({lv['n']:,} commands)",
        )
        for lv in levels
    ]


def _peer_rows(f: Mapping[str, Any], c: Mapping[str, Any]) -> list[tuple[str, str]]:
    if "restate_events_per_s" not in f:
        return []
    peer = c["peer"]
    return [
        ("Restate events/s (same N, M)", _fmt(f["restate_events_per_s"])),
        ("  Restate p99 ms (its req-resp)", _fmt(f["restate_p99_ms"])),
        ("  Restate durability / runs", f"{peer['durability']} / {peer['runs']}"),
        ("ratio caresync / Restate", f"{f['ratio_restate']:.1f}"),
    ]


def fanout_text(c: Mapping[str, Any]) -> str:
    """The average fan-out the run had, as moved by caresync and by the raw loop."""
    return (
        f"{c['fanout']:.3f} internal commands per published command "
        f"({_fmt(c['internal_commands'])} for {_fmt(c['n'])}), "
        f"{c['downstream_per_command']:.3f} downstream effects published to the output stream; "
        "the raw loop publishes and consumes every internal command; caresync publishes every "
        "one too, but consumes only those for another partition (it applies the others with "
        "their cause and records them on its local stream)"
    )


def _kind_text(row: Mapping[str, Any]) -> str:
    targets = ", ".join(f"{t} {v:g}" for t, v in row["by_target"].items()) or "nothing"
    return (
        f"{row['internal']:g} internal per command ({targets}; {row['from_appointment']:g} "
        f"from the appointment), {row['downstream']:g} downstream; {_fmt(row['commands'])} "
        "commands"
    )


RowsOf = Callable[[Mapping[str, Any]], list[tuple[str, str]]]


def table(result: Mapping[str, Any], rows_of: RowsOf | None = None) -> str:
    """The figures as an aligned two-column text table."""
    body = (rows_of or rows)(result)
    width = max(len(label) for label, _ in body)
    lines = [f"caresync bench {result['conditions']['workload']}  ({result['date']})"]
    lines += [f"  {label.ljust(width)}  {value}" for label, value in body]
    return "\n".join(lines)


def as_json(result: Mapping[str, Any]) -> str:
    """One JSON object: the figures at the top level, conditions, machine and checks nested."""
    doc = {**result["figures"], **{k: v for k, v in result.items() if k != "figures"}}
    return orjson.dumps(doc).decode()


def append_results(
    result: Mapping[str, Any],
    command_line: str,
    path: Path = RESULTS_PATH,
    rows_of: RowsOf | None = None,
) -> None:
    """Append a dated section with the command line, machine, conditions and figures."""
    body = (rows_of or rows)(result)
    lines = [
        "",
        f"## {result['date']} — `{command_line}`",
        "",
        "| | |",
        "|---|---|",
        *(f"| {label.strip()} | {value.replace('|', '/')} |" for label, value in body),
        "",
    ]
    if not path.exists():
        path.write_text(
            "# caresync bench results\n\nAppended by `caresync bench fanout --write-results`.\n"
        )
    with path.open("a") as f:
        f.write("\n".join(lines))


def today() -> str:
    """The run's UTC timestamp."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def exactly_once(c: dict[str, int]) -> bool:
    """Every check of the run passed (each fan-out applied and sent exactly once)."""
    streams_match = all(
        c[f"{s}_in_stream"] == c[f"{s}_expected"] == c[f"{s}_distinct_msg_ids"]
        and c[f"{s}_missing"] == c[f"{s}_unexpected"] == c[f"{s}_mismatched"] == 0
        for s in ("internal", "downstream")
    )
    return (
        c["missing"] == 0
        and c["unexpected"] == 0
        and c["not_accepted"] == 0
        and c["applied_rows"] == c["expected_rows"]
        and streams_match
        and c["outbox_sent"] == c["outbox_expected"]
        and c["outbox_not_sent"] == 0
        and c["duplicates_skipped"] == c["duplicates_sent"]
        and c["accepted"] == c["accepted_expected"]
        and c["rejected_expected"] == 0
        and c["rejected_dead_parked"] == 0
        and c["stock_commands"] == c["stock_expected"]
        and c["router_exit"] == 0
    )


def build_result(
    seed: int,
    command_line: str,
    cfg: Config,
    info: dict[str, Any],
    workload: Workload,
    cs: dict[str, Any],
    raw: dict[str, Any],
) -> dict[str, Any]:
    """The run's figures, conditions, machine and checks, as printed and recorded."""
    levels = [latency_figures(lv["level"], lv["rate"], lv["latency_ms"]) for lv in cs["levels"]]
    lat = next((lv for lv in levels if lv["level"] == 0.5), levels[0])
    checks: dict[str, int] = cs["checks"]
    caresync_rate = workload.n / cs["elapsed_s"]
    raw_rate = workload.n / raw["elapsed_s"]
    r = cfg.router
    figures = {
        "caresync_commands_per_s": round(caresync_rate, 1),
        "caresync_s": round(cs["elapsed_s"], 3),
        "caresync_publish_s": round(cs["publish_s"], 3),
        "caresync_cpu_cores": cs["cpu"],
        "raw_commands_per_s": round(raw_rate, 1),
        "raw_s": round(raw["elapsed_s"], 3),
        "raw_publish_s": round(raw["publish_s"], 3),
        "raw_cpu_cores": raw["cpu"],
        "ratio": round(caresync_rate / raw_rate, 4),
        "latency_n": lat["n"],
        "latency_rate_per_s": lat["rate_per_s"],
        "latency_p50_ms": lat["p50_ms"],
        "latency_p99_ms": lat["p99_ms"],
        "latency_max_ms": lat["max_ms"],
        "latency_levels": levels,
        "exactly_once": exactly_once(checks),
    }
    model = cs["model"]
    conditions = {
        "workload": "fanout",
        "n": workload.n,
        "m": workload.keys,
        "unique": workload.unique,
        "duplicates": workload.duplicates,
        "kinds": workload.kinds(),
        "items": workload.items_per_procedure,
        "fanout": round(model.internal_sent / workload.n, 4),
        "internal_commands": model.internal_sent,
        "fanout_by_kind": cs["fanout_by_kind"],
        "downstream_per_command": round(model.downstream_sent / workload.n, 4),
        "downstream_effects": model.downstream_sent,
        "downstream": DOWNSTREAM,
        "seed": seed,
        "router": {
            "batch_size": r.batch_size,
            "batches_in_flight": r.batches_in_flight,
            "partitions": cfg.streams.partitions,
            "processes": r.processes,
            "storage": cfg.streams.storage,
            "synchronous": cfg.store.synchronous,
        },
        "driver_in_flight": IN_FLIGHT,
        "durability": DURABILITY,
        "processes": f"{r.processes} router + 1 driver (raw: 1 raw loop + 1 driver), 1 nats-server",
        "refdata": "20 facilities, 10 procedures, 1 payer rule covering all; loaded before timing",
        "latency": LATENCY_DEFINITION,
        "stages": cs.get("stages", {}),
        "raw_counts": {
            k: raw[k] for k in ("consumed_in", "published_fx", "consumed_fx", "published_out")
        },
    }
    return result_doc(command_line, figures, conditions, info, checks)


def latency_figures(level: float, rate: float, sorted_ms: list[float]) -> dict[str, Any]:
    """One latency phase: its load (fraction of peak, commands/s) and percentiles."""
    return {
        "level": level,
        "rate_per_s": round(rate, 1),
        "n": len(sorted_ms),
        "p50_ms": round(percentile(sorted_ms, 50), 2),
        "p99_ms": round(percentile(sorted_ms, 99), 2),
        "p999_ms": round(percentile(sorted_ms, 99.9), 2),
        "max_ms": round(sorted_ms[-1], 2),
    }


def add_peer(result: dict[str, Any], peer: PeerResult) -> None:
    """The Restate peer's figures and the ratio caresync / Restate, into a fan-out result."""
    f = result["figures"]
    f["restate_events_per_s"] = peer.events_per_s
    f["restate_p99_ms"] = peer.p99_ms
    f["ratio_restate"] = round(f["caresync_commands_per_s"] / peer.events_per_s, 2)
    result["conditions"]["peer"] = {
        "name": "restate",
        "runs": peer.runs,
        "seconds": peer.seconds,
        "log": peer.log_path,
        "durability": PEER_DURABILITY,
    }


def result_doc(
    command_line: str,
    figures: dict[str, Any],
    conditions: dict[str, Any],
    info: dict[str, Any],
    checks: dict[str, Any],
) -> dict[str, Any]:
    """One run's result as every workload reports it."""
    return {
        "date": today(),
        "command_line": command_line,
        "figures": figures,
        "conditions": conditions,
        "machine": info,
        "checks": checks,
    }


async def report_run(
    name: str,
    measured: Awaitable[dict[str, Any]],
    *,
    json_out: bool,
    write_results: bool,
    command_line: str,
    rows_of: RowsOf,
    ok: Callable[[dict[str, Any]], bool],
) -> int:
    """Await a workload's measurement, print it (table or JSON), append it to RESULTS.md if
    asked; exit status 1 on a bench error or when ``ok`` says a check failed."""
    try:
        result = await measured
    except BenchError as exc:
        if json_out:
            print(orjson.dumps({"error": str(exc), "ok": False}).decode())
        print(f"caresync bench {name}: {exc}", file=sys.stderr)
        return 1
    result["figures"]["ok"] = ok(result)
    print(as_json(result) if json_out else table(result, rows_of), flush=True)
    if write_results:
        append_results(result, command_line, rows_of=rows_of)
        print(f"bench: appended to {RESULTS_PATH}", file=sys.stderr, flush=True)
    return 0 if result["figures"]["ok"] else 1
