"""``caresync bench ingest``: HL7 v2 decode rates on one core, and raw SIU bookings through the
router on a fresh embedded deployment.

Two figures answer "is ingest the bottleneck?":

- **decode**: ``decode_hl7`` plus canonical envelope encoding, in-process, one core
  (:mod:`caresync.bench.ingest`), for an SIU S12 and a DFT P03;
- **through the router**: N distinct SIU S12 bookings published raw to ``cs.raw.hl7`` before
  the router starts, then timed from start until (a) the ingest stage has decoded, published
  and committed all of them, and (b) the router is idle with every booking and its fan-out
  applied.  Ingest keeps up when (a) finishes well before (b).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import nats
import orjson

from caresync.bench.deployment import say
from caresync.bench.ingest import run_ingest
from caresync.bench.report import RESULTS_PATH, machine, today
from caresync.cli.up import mappings_config
from caresync.config import load_config
from caresync.router.embedded import EmbeddedNats
from caresync.router.logs import configure_logging
from caresync.router.service import RouterService, subjects_for

SIU = (
    "MSH|^~\\&|SCHED|GENHOSP|CARESYNC|GENHOSP|20261124081500-0500||SIU^S12^SIU_S12|B{i}|P|2.5.1\r"
    "SCH||A{i}^GENHOSP|||||||120|min\r"
    "PID|1||MRN-{i}^^^GENHOSP^MR||DOE^JANE\r"
    "PV1|1|O|MAIN-OR^OR-3^^MAIN-OR||||||||||||||||V-{i}\r"
    "RGS|1\r"
    "AIS|1|A|27447^Total knee^CPT|20261202073000-0500|||120|min\r"
    "AIL|1|A|MAIN-OR^OR-3^^MAIN-OR\r"
    "AIP|1|A|DR-PATEL^Patel^Raj\r"
)


async def through_router(n: int, base_dir: str | None, keep: bool) -> dict[str, Any]:
    """Preload ``n`` raw bookings, start the router, time ingest and the whole router."""
    configure_logging("warning")
    cfg = load_config(None, environ={})
    subjects = subjects_for(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="caresync-bench-ingest-", dir=base_dir))
    try:
        async with EmbeddedNats(tmp / "nats", extra_config=mappings_config(subjects)) as server:
            nc = await nats.connect(server.url, name="caresync-bench", pending_size=64 << 20)
            js = nc.jetstream()
            # Streams first (the router provisions them too; this only lets us preload).
            from caresync.router.provision import provision

            await provision(js, subjects, cfg.streams)
            say(f"ingest: publishing {n} raw SIU S12 bookings")
            acks = [
                await js.publish_async(subjects.raw("hl7"), SIU.format(i=i).encode())
                for i in range(n)
            ]
            for ack in acks:
                await ack
            service = RouterService(cfg, nats_url=server.url, data_dir=tmp / "router")
            async with anyio.create_task_group() as tg:
                started = time.perf_counter()
                await tg.start(service.run)
                ingest_s = await _until_ingested(service, n)
                total_s = await _until_idle(service, js, subjects.input_stream(0))
                service.stop()
            ingest = service.ingest
            assert ingest is not None
            assert service.router is not None
            applied = sum(w.stats.accepted for w in service.router.workers)
            await nc.close()
        return {
            "n": n,
            "ingest_s": ingest_s - started,
            "total_s": total_s - started,
            "ingest_per_s": n / (ingest_s - started),
            "end_to_end_per_s": n / (total_s - started),
            "commands_applied": applied,
            "rejected": ingest.stats.rejected,
        }
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


async def _until_ingested(service: RouterService, n: int) -> float:
    with anyio.fail_after(600):
        while service.ingest is None or service.ingest.stats.messages < n:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    return time.perf_counter()


async def _until_idle(service: RouterService, js: Any, stream: str) -> float:
    """When the router has applied everything in its input stream, and nothing new came."""
    assert service.router is not None
    with anyio.fail_after(1200):
        while True:
            last = (await js.stream_info(stream)).state.last_seq
            if all(w.stats.last_seq >= last for w in service.router.workers):
                done = time.perf_counter()
                await anyio.sleep(0.3)
                if (await js.stream_info(stream)).state.last_seq == last:
                    return done
            await anyio.sleep(0.02)


async def run(args: argparse.Namespace, command_line: str) -> int:
    """The ``caresync bench ingest`` command."""
    n = 1_000 if args.quick else args.n
    seconds = 0.5 if args.quick else 3.0
    say(f"ingest: decode rates, {seconds:g} s each")
    decode = run_ingest(seconds)
    routed = await through_router(n, getattr(args, "data_dir", None), args.keep)
    result = {
        "date": today(),
        "command": command_line,
        "machine": machine(),
        "decode": decode,
        "router": routed,
        "ingest_not_the_bottleneck": decode["siu_per_s"] > routed["end_to_end_per_s"],
    }
    if args.json:
        print(orjson.dumps(result).decode())
    else:
        print(_table(result))
    if args.write_results:
        with RESULTS_PATH.open("a") as f:
            f.write(_markdown(result))
        say(f"appended to {RESULTS_PATH}")
    return 0 if routed["rejected"] == 0 else 1


def _rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    d, t, m = r["decode"], r["router"], r["machine"]
    return [
        ("machine", f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, Python {m.get('python')}"),
        (
            "decode + envelope, one core",
            f"SIU S12 ({d['siu_bytes']:.0f} B) {d['siu_per_s']:,.0f} msgs/s; "
            f"DFT P03 3 FT1 ({d['dft_bytes']:.0f} B) {d['dft_per_s']:,.0f} msgs/s",
        ),
        (
            "through the router",
            f"{t['n']:,} raw SIU S12 bookings: ingest stage {t['ingest_per_s']:,.0f} msgs/s "
            f"({t['ingest_s']:.2f} s); every booking and its fan-out applied "
            f"{t['end_to_end_per_s']:,.0f} bookings/s ({t['total_s']:.2f} s)",
        ),
        ("durability", "raw publish with PubAck; commands PubAcked and committed before ack"),
        ("ingest faster than the router end to end", str(r["ingest_not_the_bottleneck"])),
    ]


def _table(r: dict[str, Any]) -> str:
    rows = _rows(r)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def _markdown(r: dict[str, Any]) -> str:
    lines = ["", f"## {r['date']} — `{r['command']}`", "", "| | |", "|---|---|"]
    lines += [f"| {label} | {value.replace('|', '/')} |" for label, value in _rows(r)]
    return "\n".join(lines) + "\n"
