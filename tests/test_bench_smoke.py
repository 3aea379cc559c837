"""``caresync bench fanout --quick --json`` runs end to end and reports exactly-once.

No timing assertions: the figures only have to be there and positive.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from caresync.bench.workload import build_workload


def _caresync() -> list[str]:
    script = Path(sys.executable).parent / "caresync"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from caresync.cli import main; main()"]


def test_workload_mirrors_the_peer_shape() -> None:
    w = build_workload(2_000, 200, items_per_procedure=3)
    assert w.n == 2_000
    assert w.keys == 200
    assert w.fanout == 5
    assert 0 < w.duplicates < 0.1 * w.n
    first = {}
    for c in w.commands:
        first.setdefault(c.key, c.name)
        assert len(c.effect_ids()) == 5
    assert set(first.values()) == {"book"}
    assert w == build_workload(2_000, 200, items_per_procedure=3)  # seeded


def test_bench_fanout_quick_json(tmp_path: Path) -> None:
    try:
        result = subprocess.run(
            [*_caresync(), "bench", "fanout", "--quick", "--json", "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench did not finish in 120 s; stderr:\n{exc.stderr!r}")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # exactly one JSON object, nothing else on stdout
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
    assert doc["checks"]["missing"] == 0
