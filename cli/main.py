"""The ``caresync`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from caresync.bench.args import add_arguments as add_bench_arguments
from caresync.cli.common import CommandError, Context, load_context
from caresync.config import ConfigError, dump_toml


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caresync",
        description="Actor-based router keeping scheduling, billing, supply and ERP in sync.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir", help="data directory (default: $CARESYNC_DATA_DIR or ./.caresync)"
    )
    common.add_argument(
        "--config", help="TOML config file (default: $CARESYNC_CONFIG or DIR/caresync.toml)"
    )
    client = argparse.ArgumentParser(add_help=False, parents=[common])
    client.add_argument(
        "--nats", help="NATS URL (default: nats.url, or the one `caresync up` recorded)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up", parents=[client], help="run the router (embedded nats-server unless --nats)"
    )
    up.set_defaults(run=lambda a, c: _up(a, c))

    process = sub.add_parser(
        "router-process",
        parents=[client],
        help="one more process of a router (started by `caresync up` when router.processes > 1)",
    )
    process.add_argument("--group", type=int, required=True, help="process number, 1..P-1")
    process.add_argument(
        "--parent-pid", type=int, required=True, help="the `caresync up` process it belongs to"
    )
    process.set_defaults(run=lambda a, c: _router_process(a, c))

    health = sub.add_parser(
        "health", parents=[client], help="exit 0 if the router is ready, 1 if not"
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default 3)")
    health.add_argument("--json", action="store_true", help="print the health record as JSON")
    health.set_defaults(run=lambda a, c: _health(a, c))

    status = sub.add_parser(
        "status", parents=[client], help="router summary, or one entity's state"
    )
    status.add_argument("kind", nargs="?", help="entity kind (appointment, billing, supply, erp)")
    status.add_argument("id", nargs="?", help="entity id")
    status.add_argument("--json", action="store_true", help="JSON output")
    status.set_defaults(run=lambda a, c: _status(a, c))

    publish = sub.add_parser(
        "publish", parents=[client], help="publish commands (canonical JSON, HL7 v2, FHIR R4)"
    )
    publish.add_argument("files", nargs="*", help="files of messages in the --format given")
    publish.add_argument("--kind", help="inline command kind, e.g. appointment.book")
    publish.add_argument("--entity", help="inline entity id")
    publish.add_argument("--data", help="inline payload as JSON")
    publish.add_argument("--id", help="inline command id (default: a new UUID)")
    publish.add_argument("--json", action="store_true", help="one JSON object per message")
    publish.add_argument(
        "--format",
        choices=["json", "hl7", "fhir"],
        default="json",
        help="format of the files: canonical JSON envelopes (object, array or lines), HL7 v2 "
        "(one or more messages, MLLP-framed or not, batches) or FHIR R4 JSON (a resource, a "
        "Bundle, or NDJSON)",
    )
    publish.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for each verdict (0: do not wait; default 10)",
    )
    publish.set_defaults(run=lambda a, c: _publish(a, c))

    dlq = sub.add_parser("dlq", help="dead letters: rejected inputs with their raw bytes")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_sub.add_parser("list", parents=[client], help="list dead letters")
    dlq_list.add_argument("--limit", type=int, default=100, help="the last N (default 100)")
    dlq_list.add_argument("--source", default="", help="arrived on this subject (prefix) or format")
    dlq_list.add_argument("--kind", default="", help="command kind (prefix: appointment)")
    dlq_list.add_argument("--reason", default="", help="reason code, or words in the reason")
    dlq_list.add_argument("--since", default="", metavar="TIME", help="stored at or after")
    dlq_list.add_argument("--until", default="", metavar="TIME", help="stored at or before")
    dlq_list.add_argument("--json", action="store_true", help="one JSON object per letter")
    dlq_list.set_defaults(run=lambda a, c: _dlq(a, c))
    dlq_show = dlq_sub.add_parser("show", parents=[client], help="one letter, raw bytes included")
    dlq_show.add_argument("seq", type=int, help="dead-letter sequence (from dlq list)")
    dlq_show.add_argument("--json", action="store_true", help="one JSON object")
    dlq_show.set_defaults(run=lambda a, c: _dlq(a, c))
    dlq_retry = dlq_sub.add_parser(
        "retry", parents=[client], help="re-submit letters through the normal path"
    )
    dlq_retry.add_argument("seqs", type=int, nargs="+", metavar="SEQ", help="letters to retry")
    dlq_retry.add_argument("--wait", type=float, default=10.0, help="seconds per verdict")
    dlq_retry.add_argument("--json", action="store_true", help="one JSON object per letter")
    dlq_retry.set_defaults(run=lambda a, c: _dlq(a, c))
    dlq_drop = dlq_sub.add_parser("drop", parents=[client], help="delete letters for good")
    dlq_drop.add_argument("seqs", type=int, nargs="+", metavar="SEQ", help="letters to drop")
    dlq_drop.set_defaults(run=lambda a, c: _dlq(a, c))

    retry = sub.add_parser(
        "retry-failed",
        parents=[client],
        help="send effects that failed for good once more, with the same idempotency key",
    )
    retry.add_argument(
        "--downstream", default="", choices=["", "billing", "erp", "supply"], help="one system"
    )
    retry.add_argument("--json", action="store_true", help="one JSON object")
    retry.set_defaults(run=lambda a, c: _retry_failed(a, c))

    parked = sub.add_parser("parked", help="entities held back by a failing message")
    parked_sub = parked.add_subparsers(dest="parked_command", required=True, metavar="ACTION")
    parked_list = parked_sub.add_parser("list", parents=[client], help="parked messages")
    parked_list.add_argument("--json", action="store_true", help="one JSON object per message")
    parked_list.set_defaults(run=lambda a, c: _parked(a, c))
    release = parked_sub.add_parser(
        "release", parents=[client], help="re-run an entity's parked messages, in order"
    )
    release.add_argument("entity", nargs="+", metavar="KIND ID", help="KIND ID, or KIND:ID")
    release.add_argument("--json", action="store_true", help="one JSON object")
    release.set_defaults(run=lambda a, c: _parked(a, c))

    mllp = sub.add_parser(
        "mllp", parents=[client], help="MLLP listener: HL7 v2 senders in, HL7 ACKs out"
    )
    mllp.add_argument("--port", type=int, required=True, help="TCP port (0: any free port)")
    mllp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    mllp.set_defaults(run=lambda a, c: _mllp(a, c))

    replay = sub.add_parser("replay", help="re-apply history from the JetStream log")
    replay_sub = replay.add_subparsers(dest="replay_command", required=True, metavar="ACTION")
    rebuild = replay_sub.add_parser(
        "rebuild", parents=[client], help="drop local state and rebuild it"
    )
    rebuild.add_argument("--json", action="store_true", help="JSON summary")
    rebuild.add_argument(
        "--full",
        action="store_true",
        help="fold every stream from its first message, not from the last snapshot",
    )
    rebuild.add_argument("--group", type=int, default=None, help=argparse.SUPPRESS)
    rebuild.set_defaults(run=lambda a, c: _rebuild(a, c))
    snapshot = replay_sub.add_parser(
        "snapshot",
        parents=[client],
        help="snapshot the state into JetStream now (a rebuild starts from it)",
    )
    snapshot.add_argument("--json", action="store_true", help="JSON summary")
    snapshot.set_defaults(run=lambda a, c: _snapshot(a, c))
    replay_common = argparse.ArgumentParser(add_help=False, parents=[client])
    replay_common.add_argument(
        "--dry-run",
        action="store_true",
        help="apply to a scratch copy and print what would change; change nothing",
    )
    replay_common.add_argument(
        "--with-current-refdata",
        action="store_true",
        help="decide with the reference data in force now, not the data of each message's time",
    )
    replay_common.add_argument("--json", action="store_true", help="JSON output")
    entity = replay_sub.add_parser(
        "entity", parents=[replay_common], help="re-apply one entity's history"
    )
    entity.add_argument("kind", help="entity kind (appointment, item, billing, ...)")
    entity.add_argument("id", help="entity id")
    entity.add_argument(
        "--from",
        dest="from_",
        metavar="SEQ|TIME",
        default="",
        help="re-apply from this input-stream sequence or RFC 3339 time (default: all)",
    )
    entity.set_defaults(run=lambda a, c: _replay_entity(a, c))
    window = replay_sub.add_parser(
        "window", parents=[replay_common], help="re-apply the entities touched in a time window"
    )
    window.add_argument("--since", required=True, metavar="TIME", help="RFC 3339 start")
    window.add_argument("--until", required=True, metavar="TIME", help="RFC 3339 end")
    window.add_argument("--kind", default="", help="only entities of this kind")
    window.set_defaults(run=lambda a, c: _replay_window(a, c))

    refdata = sub.add_parser("refdata", help="versioned reference data (CSV sets)")
    refdata_sub = refdata.add_subparsers(dest="refdata_command", required=True, metavar="ACTION")
    refdata_load = refdata_sub.add_parser(
        "load", parents=[client], help="check a directory of CSV files and load it as a version"
    )
    refdata_load.add_argument("directory", metavar="DIR", help="directory of CSV files")
    refdata_load.add_argument("--json", action="store_true", help="one JSON object")
    refdata_load.set_defaults(run=lambda a, c: _refdata_load(a, c))

    bench = sub.add_parser(
        "bench", parents=[common], help="benchmark on a fresh embedded deployment"
    )
    add_bench_arguments(bench)
    bench.set_defaults(run=lambda a, c: _bench(a, c))

    _add_sim_parser(sub, client)

    report = sub.add_parser("report", parents=[client], help="totals in business words")
    report.add_argument("--json", action="store_true", help="one JSON object")
    report.set_defaults(run=lambda a, c: _report(a, c))

    demo = sub.add_parser(
        "demo", parents=[common], help="run the whole scenario on a fresh embedded deployment"
    )
    demo.add_argument("--keep", action="store_true", help="keep the data dir afterwards")
    demo.set_defaults(run=lambda a, c: _demo(a, c))

    config = sub.add_parser("config", help="show the effective configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser(
        "show", parents=[common], help="print the effective config as TOML"
    )
    show.set_defaults(run=lambda a, c: _config_show(c))
    return parser


def _add_sim_parser(sub: Any, client: argparse.ArgumentParser) -> None:
    # The actions repeat the common options with SUPPRESS defaults: with plain defaults,
    # argparse would let `sim ACTION`'s None overwrite a `sim --data-dir X ACTION` value.
    action_common = argparse.ArgumentParser(add_help=False)
    for flag, text in (("--data-dir", "data directory"), ("--config", "TOML config file")):
        action_common.add_argument(flag, default=argparse.SUPPRESS, help=text)
    action_common.add_argument("--nats", default=argparse.SUPPRESS, help="NATS URL")
    action_common.add_argument(
        "--sim-prefix", default=argparse.SUPPRESS, help="simulator subject prefix (default sim)"
    )
    sim = sub.add_parser(
        "sim", parents=[client], help="run the simulated billing, ERP and supply systems"
    )
    sim.add_argument(
        "--sim-prefix", default="sim", help="subject prefix of the simulators (default sim)"
    )
    sim.set_defaults(run=lambda a, c: _sim(a, c))
    actions = sim.add_subparsers(dest="sim_command", metavar="ACTION")
    systems = ("billing", "erp", "supply")
    fail = actions.add_parser("fail", parents=[action_common], help="make a system fail a while")
    fail.add_argument("system", choices=systems)
    fail.add_argument(
        "--for", dest="for_s", type=float, required=True, metavar="SECONDS", help="how long"
    )
    fail.add_argument("--mode", choices=("down", "slow", "errors"), default="down")
    fail.add_argument("--delay", dest="delay_s", type=float, help="slow mode: answer delay (s)")
    heal = actions.add_parser("heal", parents=[action_common], help="clear a system's fault")
    heal.add_argument("system", choices=systems)
    report = actions.add_parser("report", parents=[action_common], help="what each system holds")
    report.add_argument("--json", action="store_true", help="JSON output")
    receive = actions.add_parser(
        "receive", parents=[action_common], help="ERP reports goods received for a PO"
    )
    receive.add_argument("po", metavar="PO", help="PO id or ERP reference (PO-000001)")
    claim = actions.add_parser(
        "claim", parents=[action_common], help="billing reports a claim released or denied"
    )
    claim.add_argument("appointment", metavar="APPOINTMENT")
    claim.add_argument("--status", choices=("released", "denied"), required=True)
    claim.add_argument("--reason", default="", help="denial reason")


async def _sim(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli import sim

    nats_url: str | None = getattr(args, "nats", None)
    prefix: str = getattr(args, "sim_prefix", "sim")
    action = getattr(args, "sim_command", None)
    if action is None:
        return await sim.run_sim(ctx, nats_url, prefix)
    if action == "fail":
        return await sim.run_fail(
            ctx, nats_url, prefix, args.system, args.for_s, args.mode, args.delay_s
        )
    if action == "heal":
        return await sim.run_heal(ctx, nats_url, prefix, args.system)
    if action == "report":
        return await sim.run_report(ctx, nats_url, prefix, args.json)
    if action == "receive":
        return await sim.run_feedback(ctx, nats_url, prefix, "receive", {"po": args.po})
    body = {"appointment_id": args.appointment, "status": args.status, "reason": args.reason}
    return await sim.run_feedback(ctx, nats_url, prefix, "claim", body)


async def _up(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.up import run_up

    return await run_up(ctx, args.nats)


async def _router_process(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.up import run_router_process

    return await run_router_process(ctx, args.nats, args.group, args.parent_pid)


async def _health(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.ops import run_health

    return await run_health(ctx, args.nats, args.timeout, args.json)


async def _status(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.ops import run_status

    if (args.kind is None) != (args.id is None):
        raise CommandError("status takes no arguments (summary) or KIND and ID")
    return await run_status(ctx, args.nats, args.kind, args.id, args.json)


async def _publish(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.ops import build_envelope, run_publish

    inline = None
    if args.kind or args.entity:
        if not (args.kind and args.entity):
            raise CommandError("inline publish needs both --kind and --entity")
        inline = build_envelope(args.kind, args.entity, args.data, args.id)
    elif not args.files:
        raise CommandError("nothing to publish: give FILE... or --kind/--entity")
    if args.format != "json":
        from caresync.cli.ingest import run_publish_raw

        if inline is not None:
            raise CommandError(f"--kind/--entity publish canonical JSON, not {args.format}")
        return await run_publish_raw(ctx, args.nats, args.files, args.format, args.json, args.wait)
    return await run_publish(ctx, args.nats, args.files, inline, args.json, args.wait)


async def _dlq(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli import dlq

    action = args.dlq_command
    if action == "list":
        if args.limit <= 0:
            raise CommandError("--limit must be positive")
        filters = dlq.Filters.from_args(args)
        return await dlq.run_dlq_list(ctx, args.nats, args.limit, filters, args.json)
    if action == "show":
        return await dlq.run_dlq_show(ctx, args.nats, args.seq, args.json)
    if action == "retry":
        return await dlq.run_dlq_retry(ctx, args.nats, args.seqs, args.wait, args.json)
    return await dlq.run_dlq_drop(ctx, args.nats, args.seqs)


async def _retry_failed(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.parked import run_retry_failed

    return await run_retry_failed(ctx, args.nats, args.downstream, args.json)


async def _parked(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli import parked

    if args.parked_command == "list":
        return await parked.run_parked_list(ctx, args.nats, args.json)
    if len(args.entity) == 2:
        kind, entity = args.entity
    elif len(args.entity) == 1 and ":" in args.entity[0]:
        kind, _, entity = args.entity[0].partition(":")
    else:
        raise CommandError("parked release takes KIND ID (or KIND:ID)")
    return await parked.run_parked_release(ctx, args.nats, kind, entity, args.json)


async def _mllp(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.mllp import run_mllp

    return await run_mllp(ctx, args.nats, args.host, args.port)


async def _rebuild(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.rebuild import run_rebuild

    return await run_rebuild(ctx, args.nats, args.json, args.full, args.group)


async def _snapshot(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.rebuild import run_snapshot

    return await run_snapshot(ctx, args.nats, args.json)


async def _replay_entity(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.replay import run_replay_entity

    return await run_replay_entity(ctx, args)


async def _replay_window(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.replay import run_replay_window

    return await run_replay_window(ctx, args)


async def _refdata_load(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.refdata import run_refdata_load

    return await run_refdata_load(ctx, args.nats, args.directory, args.json)


async def _bench(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.bench.cli import run_bench

    status: int = await run_bench(args, ctx)
    return status


async def _report(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.ops import run_report

    return await run_report(ctx, args.nats, args.json)


async def _demo(args: argparse.Namespace, ctx: Context) -> int:
    from caresync.cli.demo import run_demo

    return await run_demo(ctx, keep=args.keep)


async def _config_show(ctx: Context) -> int:
    source = ctx.config_path or "defaults"
    print(f"# effective configuration (from {source} and CARESYNC_* variables)")
    print(dump_toml(ctx.config))
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``caresync`` command; exits with the command's status."""
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace, Context], Awaitable[int]] = args.run
    try:
        ctx = load_context(getattr(args, "data_dir", None), getattr(args, "config", None))
        status = anyio.run(run, args, ctx, backend="asyncio")
    except ConfigError as exc:
        print(f"caresync: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except CommandError as exc:
        print(f"caresync: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(status)
