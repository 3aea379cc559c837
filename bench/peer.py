"""``--peer restate``: the Restate peer harness (``../shared/peers/restate``) in the same session.

The harness installs and runs Restate (server, a Python service of keyed virtual objects, and
its own load driver) on the same N events over M keys with the same 5 % duplicates and 5
one-way effects per event, then prints one summary line::

    restate: N events, M keys, X events/s end-to-end, p99 Y ms

This module finds the harness, runs it after caresync's own phases (never at the same time:
both would share the two cores) and reads that line.  Restate fsyncs every step; the durability
of the two is stated side by side, not equalised.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from caresync.bench.fanout import BenchError

SCRIPT_ENV = "CARESYNC_RESTATE_PEER"
"""Environment variable naming the harness script, if it is not beside the repository."""
_SUMMARY = re.compile(
    r"^restate: (?P<n>\d+) events, (?P<m>\d+) keys, (?P<rate>[\d.]+) events/s end-to-end, "
    r"p99 (?P<p99>[\d.]+) ms\s*$",
    re.MULTILINE,
)
DURABILITY = "Restate 1.7.12: its log fsynced on every step (server defaults), one node"


@dataclass(frozen=True, slots=True)
class PeerResult:
    """What the harness reported (medians over its runs)."""

    events_per_s: float
    p99_ms: float
    runs: int
    seconds: float
    log_path: str


def find_script(explicit: str | None = None) -> Path:
    """The harness: ``explicit``, else ``$CARESYNC_RESTATE_PEER``, else ``../shared/peers/...``
    beside the repository (or beside the current directory)."""
    candidates = [explicit, os.environ.get(SCRIPT_ENV)]
    repo = Path(__file__).resolve().parent.parent
    rel = Path("shared/peers/restate/run_restate_peer.sh")
    candidates += [str(repo.parent / rel), str(Path.cwd().parent / rel), str(Path.cwd() / rel)]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise BenchError(
        f"the Restate peer harness was not found (looked for ../{rel} beside the repository); "
        f"set {SCRIPT_ENV}=PATH/run_restate_peer.sh"
    )


def parse_summary(output: str) -> tuple[int, int, float, float]:
    """(n, m, events/s, p99 ms) from the harness's last line; BenchError if it is not there."""
    found = list(_SUMMARY.finditer(output))
    if not found:
        tail = "\n".join(output.strip().splitlines()[-5:])
        raise BenchError(f"the Restate peer printed no summary line; its last lines:\n{tail}")
    last = found[-1]
    return int(last["n"]), int(last["m"]), float(last["rate"]), float(last["p99"])


def run_restate(n: int, m: int, runs: int, log_path: Path, script: str | None = None) -> PeerResult:
    """Run the harness with the same N and M; its output goes to ``log_path``."""
    path = find_script(script)
    env = {**os.environ, "QUIET_WAIT": os.environ.get("QUIET_WAIT", "30")}
    print(f"bench: running the Restate peer ({path}, {runs} run(s))...", file=sys.stderr)
    t0 = time.monotonic()
    done = subprocess.run(
        ["bash", str(path), str(n), str(m), str(runs)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        check=False,
    )
    log_path.write_text(done.stdout)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.strip().splitlines()[-5:])
        raise BenchError(
            f"the Restate peer exited with status {done.returncode} (log {log_path}):\n{tail}"
        )
    got_n, got_m, rate, p99 = parse_summary(done.stdout)
    if (got_n, got_m) != (n, m):
        raise BenchError(f"the Restate peer ran N={got_n} M={got_m}, not N={n} M={m}")
    return PeerResult(
        events_per_s=rate,
        p99_ms=p99,
        runs=runs,
        seconds=round(time.monotonic() - t0, 1),
        log_path=str(log_path),
    )
