"""The ``caresync bench`` arguments, shared by the CLI and ``python -m caresync.bench.cli``.

Kept free of heavy imports: the CLI builds its parser on every start.
"""

from __future__ import annotations

import argparse

WORKLOADS = ("fanout", "latency", "workflow", "ingest", "replay", "entities")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Workload, sizes, seed, output and peer options."""
    parser.add_argument("workload", nargs="?", default="fanout", choices=WORKLOADS)
    parser.add_argument("--n", type=int, default=20_000, help="commands (default 20000)")
    parser.add_argument("--m", type=int, default=2_000, help="entities (default 2000)")
    parser.add_argument(
        "--items",
        type=int,
        default=3,
        help="items on each bench preference card (default 3, as the Restate peer)",
    )
    parser.add_argument(
        "--latency-n",
        type=int,
        default=0,
        help="commands per latency phase (default min(2000, N/4); latency: min(4000, N))",
    )
    parser.add_argument("--seed", type=int, default=7, help="workload seed (default 7)")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="fanout, latency, workflow: router processes (router.processes; partitions are"
        " raised to at least as many); default 1",
    )
    parser.add_argument(
        "--peer",
        choices=["restate"],
        help="fanout: also run ../shared/peers/restate with the same N and M, print the ratio",
    )
    parser.add_argument(
        "--peer-runs", type=int, default=1, help="runs of the peer (its medians; default 1)"
    )
    parser.add_argument(
        "--tail",
        type=float,
        default=0.1,
        help="replay: share of the commands published after the state snapshot (default 0.1)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dirs")
    parser.add_argument("--quick", action="store_true", help="small N for smoke tests")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument(
        "--write-results", action="store_true", help="append the figures to bench/RESULTS.md"
    )
