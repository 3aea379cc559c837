"""``caresync replay entity|window``: re-apply history from the streams (``rebuild`` and
``snapshot`` are in :mod:`caresync.cli.rebuild`).

Every replay runs with the router of the data dir stopped (it takes the data-dir lock) and, when
no NATS URL is configured, starts the embedded broker from the data dir.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.js.errors

from caresync.actors import default_registry
from caresync.actors.contract import Registry
from caresync.cli.common import CommandError, Context, connect_client, print_json
from caresync.cli.datadir import DataDirError, DataDirLock, pid_alive, read_server_record
from caresync.cli.up import mappings_config
from caresync.router.embedded import EmbeddedNats
from caresync.router.errors import RouterError
from caresync.router.logs import configure_logging
from caresync.router.refdata import RefDataCatalog
from caresync.router.replay_diff import EffectLine, EntityReplay, totals
from caresync.router.replay_entity import EntityReplayer, History
from caresync.router.replay_streams import read_catalog
from caresync.router.service import make_transport, open_store, store_path, subjects_for
from caresync.store import PartitionedStore

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LISTED = 20
"""Effects listed per group in the text output (all of them are in --json)."""


def lock_data_dir(ctx: Context, what: str, during: str) -> DataDirLock:
    lock = DataDirLock(ctx.data_dir)
    try:
        lock.acquire(what)
    except DataDirError as exc:
        raise CommandError(f"{exc}: the router must be stopped during {during}") from exc
    return lock


async def broker_url(
    ctx: Context, nats_flag: str | None, stack: AsyncExitStack, *, beside_router: bool = False
) -> str:
    """``--nats``, ``nats.url``, the server record, else the embedded broker started for us.

    ``beside_router``: the command may run while the router does, and then uses the broker of
    the recorded router if it is alive, embedded or not."""
    url = nats_flag or ctx.config.nats.url
    if not url:
        try:
            record = read_server_record(ctx.data_dir)
        except DataDirError as exc:
            raise CommandError(str(exc)) from exc
        if record is not None and (
            not record.embedded or (beside_router and pid_alive(record.pid))
        ):
            url = record.url
    if not url:
        # The embedded broker's JetStream data lives in the data dir: start it for us.
        server = EmbeddedNats(ctx.data_dir, extra_config=mappings_config(subjects_for(ctx.config)))
        await server.start()
        stack.push_async_callback(server.stop)
        url = server.url
    return url


# -- entity and window ----------------------------------------------------------------------------
class ProgressBar:
    """A text bar on stderr for long replays: drawn on a terminal, or past 1000 messages."""

    def __init__(self, label: str = "replaying") -> None:
        self.label = label
        self._total = 0
        self._done = 0
        self._tty = sys.stderr.isatty()
        self._drawn_at = 0.0
        self._tenths = -1
        self._shown = False

    def expect(self, messages: int) -> None:
        """``messages`` more to read."""
        self._total += messages

    def advance(self, messages: int) -> None:
        """``messages`` more read."""
        self._done += messages
        self._draw()

    def _draw(self) -> None:
        total = max(self._total, self._done, 1)
        if not (self._tty or total > 1000):
            return
        if self._tty:
            now = time.monotonic()
            if now - self._drawn_at < 0.1 and self._done < total:
                return
            self._drawn_at = now
            filled = 30 * self._done // total
            bar = "#" * filled + "." * (30 - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {self._done}/{total} messages")
            sys.stderr.flush()
        else:
            tenths = 10 * self._done // total
            if tenths <= self._tenths:
                return
            self._tenths = tenths
            print(f"{self.label}: {self._done}/{total} messages", file=sys.stderr, flush=True)
        self._shown = True

    def close(self) -> None:
        """End the bar's line."""
        if self._shown and self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


@dataclass(frozen=True, slots=True)
class _Run:
    """What every entity or window replay works with."""

    replayer: EntityReplayer
    store: PartitionedStore
    catalog: RefDataCatalog


@asynccontextmanager
async def _replaying(ctx: Context, args: argparse.Namespace, what: str) -> AsyncIterator[_Run]:
    """Lock the data dir, reach the broker, open the store and read the reference data."""
    path = store_path(ctx.config, ctx.data_dir)
    if not path.exists():
        raise CommandError(f"no store at {path}: nothing was applied with this data dir")
    configure_logging("warning", ctx.config.log.format)
    lock = lock_data_dir(ctx, what, "a replay")
    try:
        async with AsyncExitStack() as stack:
            url = await broker_url(ctx, args.nats, stack)
            nc = await connect_client(url)
            stack.push_async_callback(nc.close)
            store = await open_store(ctx.config, ctx.data_dir)
            stack.push_async_callback(store.close)
            transport = make_transport(nc, ctx.config)
            subjects = subjects_for(ctx.config)
            try:
                catalog = await read_catalog(transport, store.main, subjects)
                replayer = EntityReplayer(
                    transport=transport,
                    store=store,
                    registry=default_registry(),
                    subjects=subjects,
                    catalog=catalog,
                    current_refdata=args.with_current_refdata,
                )
                yield _Run(replayer, store, catalog)
            except nats.js.errors.NotFoundError as exc:
                raise CommandError(f"no caresync streams at {url}: {exc}") from exc
            except RouterError as exc:
                raise CommandError(str(exc)) from exc
    finally:
        lock.release()


async def run_replay_entity(ctx: Context, args: argparse.Namespace) -> int:
    """Re-apply one entity's history (``--from`` on: the messages whose effects count)."""
    registry = default_registry()
    _check_kind(registry, args.kind)
    if not args.id:
        raise CommandError("an entity id is required")
    from_seq, from_ns = _parse_from(args.from_)
    bar = ProgressBar(f"{args.kind} {args.id}")
    try:
        async with _replaying(ctx, args, "caresync replay entity") as run:
            history = await run.replayer.history(args.kind, args.id, bar)
            if not history.messages:
                raise CommandError(await _no_history(run.store, history))
            start = _start(history, from_seq, from_ns, args.from_)
            result = await run.replayer.replay(history, from_seq=start, dry_run=args.dry_run)
    finally:
        bar.close()
    _output(args, run.catalog, [result], None)
    if result.error:
        raise CommandError(f"{args.kind} {args.id!r}: {result.error}; nothing was written")
    return 0


async def run_replay_window(ctx: Context, args: argparse.Namespace) -> int:
    """Re-apply the entities with input messages in [since, until], each from its first one."""
    registry = default_registry()
    if args.kind:
        _check_kind(registry, args.kind)
    since_ns = _parse_time(args.since, "--since")
    until_ns = _parse_time(args.until, "--until")
    if since_ns > until_ns:
        raise CommandError(f"--since {args.since} is after --until {args.until}")
    bar = ProgressBar("replaying")
    results: list[EntityReplay] = []
    try:
        async with _replaying(ctx, args, "caresync replay window") as run:
            touched = await run.replayer.touched(since_ns, until_ns, args.kind)
            if not touched:
                of_kind = f" for kind {args.kind!r}" if args.kind else ""
                raise CommandError(
                    f"no input message was applied between {args.since} and {args.until}"
                    f"{of_kind}: nothing to replay"
                )
            for n, t in enumerate(touched, 1):
                bar.label = f"entity {n}/{len(touched)}"
                history = await run.replayer.history(t.kind, t.entity, bar)
                results.append(
                    await run.replayer.replay(history, from_seq=t.first_seq, dry_run=args.dry_run)
                )
    finally:
        bar.close()
    window = {"since": args.since, "until": args.until, "kind": args.kind or None}
    _output(args, run.catalog, results, window)
    failed = [r for r in results if r.error]
    if failed:
        names = ", ".join(f"{r.kind} {r.id!r}" for r in failed[:5])
        raise CommandError(f"{len(failed)} entities could not be replayed ({names}); see above")
    return 0


# -- input ----------------------------------------------------------------------------------------
def _check_kind(registry: Registry, kind: str) -> None:
    if registry.get(kind) is None:
        known = ", ".join(sorted(registry.kinds))
        raise CommandError(f"unknown entity kind {kind!r}; known kinds: {known}")


def _parse_from(text: str) -> tuple[int, int]:
    """(seq, 0) or (0, timestamp_ns) from ``--from``; (0, 0) when not given."""
    if not text:
        return 0, 0
    if text.isdigit():
        if int(text) < 1:
            raise CommandError("--from 0: stream sequences start at 1")
        return int(text), 0
    return 0, _parse_time(text, "--from", "a stream sequence or an RFC 3339 time")


def _parse_time(text: str, flag: str, expected: str = "an RFC 3339 time") -> int:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(
            f"{flag} {text!r} is not {expected} (like 2027-01-01T08:00:00Z)"
        ) from None
    if at.tzinfo is None:
        raise CommandError(f"{flag} {text!r} has no UTC offset: add Z or +hh:mm")
    return (at - _EPOCH) // timedelta(microseconds=1) * 1000


def _iso(timestamp_ns: int) -> str:
    return datetime.fromtimestamp(timestamp_ns / 1e9, UTC).isoformat(timespec="seconds")


def _start(history: History, from_seq: int, from_ns: int, text: str) -> int:
    """The first sequence re-applied; a ``--from`` past the history is a CommandError."""
    last = history.messages[-1]
    if from_ns:
        start = history.first_seq_at(from_ns)
    elif from_seq:
        start = from_seq if from_seq <= last.seq else None
    else:
        start = history.messages[0].seq
    if start is None:
        raise CommandError(
            f"nothing to re-apply from --from {text}: the last message of {history.kind} "
            f"{history.entity!r} is seq {last.seq}, stored {_iso(last.timestamp_ns)}"
        )
    return start


async def _no_history(store: PartitionedStore, history: History) -> str:
    where = f"stream {history.stream} holds no message for it"
    if not history.stream:
        where = "no input stream holds a message for it"
    elif history.through_seq == 0:
        where = f"the store has applied nothing of stream {history.stream}"
    message = f"no history for {history.kind} {history.entity!r}: {where}"
    if history.through_seq:
        message += f" through seq {history.through_seq}"
    similar = await store.ids_ending(history.kind, history.entity)
    if similar:
        message += f" (known ids like it: {', '.join(similar)})"
    return message


# -- output ---------------------------------------------------------------------------------------
def _output(
    args: argparse.Namespace,
    catalog: RefDataCatalog,
    results: list[EntityReplay],
    window: dict[str, Any] | None,
) -> None:
    refdata = "current" if args.with_current_refdata else "in_force"
    if args.json:
        doc: dict[str, Any] = {
            "dry_run": bool(args.dry_run),
            "refdata": refdata,
            "refdata_version": catalog.latest_version if args.with_current_refdata else None,
        }
        if window is not None:
            doc["window"] = window
        doc["totals"] = totals(results)
        doc["entities"] = [r.as_dict() for r in results]
        print_json(doc)
        return
    for r in results:
        _print_entity(r)
    sums = totals(results)
    data = (
        f"the current reference data (version {catalog.latest_version})"
        if args.with_current_refdata
        else "the reference data in force at each message"
    )
    if args.dry_run:
        print(f"dry run with {data}: nothing was changed")
        return
    queued = sum(1 for r in results if r.written for e in r.effects.would_send if e.status == "new")
    print(
        f"replayed {sums['written']} of {sums['entities']} entities with {data}: "
        f"{sums['state_changed']} snapshots changed, {queued} effects queued; the router sends "
        "them once at its next start"
    )


def _print_entity(r: EntityReplay) -> None:
    print(
        f"{r.kind} {r.id}: {r.messages} messages in {r.stream}, {r.reapplied} re-applied from "
        f"seq {r.from_seq} ({r.accepted} accepted, {r.rejected} rejected, "
        f"{r.duplicates} duplicates, {r.dead_lettered} dead-lettered)"
    )
    for c in r.outcome_changes:
        print(f"  outcome: seq {c.seq} ({c.command_id}) {c.before} before, {c.after} now")
    fx = r.effects
    changed = (
        f" ({fx.changed_sent} with other content now, not sent again)" if fx.changed_sent else ""
    )
    print(
        f"  effects: {len(fx.would_send)} would be sent, {len(fx.already_sent)} already "
        f"sent{changed}, {len(fx.no_longer_produced)} no longer produced"
    )
    _print_lines("send", fx.would_send)
    _print_lines("changed", [e for e in fx.already_sent if e.changed])
    _print_lines("gone", fx.no_longer_produced)
    _print_lines("failed", fx.undeliverable)
    if r.state:
        print(f"  state: changed: {', '.join(c.path for c in r.state)}")
    else:
        print("  state: unchanged")
    for warning in r.warnings:
        print(f"  warning: {warning}")
    if r.error:
        print(f"  error: {r.error}")


def _print_lines(tag: str, lines: list[EffectLine] | tuple[EffectLine, ...]) -> None:
    for e in lines[:_LISTED]:
        note = ""
        if e.status == "queued":
            note = " (already queued)" if tag == "send" else " (queued earlier: still goes out)"
        print(f"    {tag:7} {e.key} -> {e.subject}{note}")
    if len(lines) > _LISTED:
        print(f"    ... and {len(lines) - _LISTED} more")
