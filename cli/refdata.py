"""``caresync refdata load DIR``: check a directory of CSV files and publish it as a new version.

A set with any problem publishes nothing.  A good set is one msgpack message on the
reference-data stream (its sequence is the version), with ``Nats-Msg-Id`` = the sha256 of its
content, so that loading the same data again is recognised and reported as unchanged.

Each stock row that is new or changed since the previous version then goes to its item actor
as an ``item.set_stock`` command whose id names the version, so that re-running a load repeats
nothing.  Rows the previous version already had are not sent again: a stock count sets the
item's on-hand quantity, and re-sending an unchanged count (because, say, a payer rule was
corrected) would undo every consumption recorded since.
"""

from __future__ import annotations

from pathlib import Path

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from caresync.cli.common import CommandError, Context, connect_client, print_json, resolve_url
from caresync.codecs import RefDataError, Subjects, WireFormat, encode_envelope, make_envelope
from caresync.codecs.errors import DecodeError
from caresync.codecs.refdata import (
    RefDataSet,
    decode_refdata_set,
    encode_refdata_set,
    refdata_digest,
)
from caresync.codecs.refdata_csv import read_refdata_dir
from caresync.router.jetstream import JetStreamTransport
from caresync.router.service import subjects_for
from caresync.router.transport import Outbound, PublishStatus

_MSG_ID = "Nats-Msg-Id"
_PUBLISH_TIMEOUT_S = 10.0
_PUBLISH_ATTEMPTS = 5


def stock_commands(
    subjects: Subjects, dataset: RefDataSet, version: int, previous: RefDataSet | None = None
) -> list[Outbound]:
    """An ``item.set_stock`` command per stock row of ``dataset`` (loaded as ``version``)
    that is not in ``previous`` with the same figures."""
    before = {
        (r.facility_id, r.item_id): (r.on_hand, r.reorder_point, r.reorder_quantity)
        for r in (previous.stock if previous is not None else [])
    }
    out = []
    for row in dataset.stock:
        figures = (row.on_hand, row.reorder_point, row.reorder_quantity)
        if before.get((row.facility_id, row.item_id)) == figures:
            continue
        entity = f"{row.item_id}@{row.facility_id}"
        command_id = f"stock:{version}:{entity}"
        env = make_envelope(
            id=command_id,
            kind="item.set_stock",
            entity=entity,
            payload={
                "on_hand": row.on_hand,
                "reorder_point": row.reorder_point,
                "reorder_quantity": row.reorder_quantity,
                "refdata_version": version,
            },
            occurred_at=dataset.loaded_at,
            source="caresync/refdata",
            fmt=WireFormat.JSON,
        )
        out.append(Outbound(command_id, subjects.command("item", entity), encode_envelope(env)))
    return out


async def run_refdata_load(
    ctx: Context, nats_flag: str | None, directory: str, as_json: bool
) -> int:
    """Check ``directory`` and publish it as a new reference-data version; 1 on any problem."""
    try:
        dataset = read_refdata_dir(Path(directory))
    except RefDataError as exc:
        if as_json:
            print_json({"ok": False, "problems": [p.as_dict() for p in exc.problems]})
        else:
            print(f"{directory}: {len(exc.problems)} problem(s), nothing loaded:")
            for problem in exc.problems:
                print(f"  {problem}")
        return 1
    subjects = subjects_for(ctx.config)
    url = resolve_url(ctx, nats_flag)
    nc = await connect_client(url)
    try:
        js = nc.jetstream()
        version, unchanged = await _publish_set(js, subjects, dataset)
        previous = await _version_before(js, subjects, version)
        commands = stock_commands(subjects, dataset, version, previous)
        await _publish_commands(JetStreamTransport(nc), commands)
    finally:
        await nc.close()
    counts = dataset.counts()
    if as_json:
        print_json(
            {
                "ok": True,
                "version": version,
                "unchanged": unchanged,
                "counts": counts,
                "stock_commands": len(commands),
            }
        )
    else:
        what = f"unchanged, version {version}" if unchanged else f"loaded version {version}"
        tables = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in counts.items())
        print(
            f"{what} from {directory}: {tables}; {len(commands)} stock command(s) sent "
            "(rows new or changed since the previous version)"
        )
    return 0


async def _publish_set(
    js: JetStreamContext, subjects: Subjects, dataset: RefDataSet
) -> tuple[int, bool]:
    """(version, unchanged): publish the set unless the latest version has the same content."""
    digest = refdata_digest(dataset)
    stream = subjects.refdata_stream
    # JetStream forgets Msg-Ids after its duplicate window: compare with the latest version too.
    try:
        last = await js.get_last_msg(stream, subjects.refdata_subject)
    except nats.js.errors.NotFoundError:
        last = None
    except nats.errors.Error as exc:
        raise CommandError(f"cannot read stream {stream}: {_describe(exc)}") from exc
    if last is not None and last.seq and (last.headers or {}).get(_MSG_ID) == digest:
        return int(last.seq), True
    try:
        ack = await js.publish(
            subjects.refdata_subject,
            encode_refdata_set(dataset),
            timeout=_PUBLISH_TIMEOUT_S,
            headers={_MSG_ID: digest},
        )
    except nats.js.errors.NoStreamResponseError as exc:
        raise CommandError(
            f"no stream stores {subjects.refdata_subject}: start the router once "
            "(`caresync up`) so that it creates its streams"
        ) from exc
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        raise CommandError(f"publishing the reference data failed: {_describe(exc)}") from exc
    return int(ack.seq), bool(ack.duplicate)


async def _version_before(
    js: JetStreamContext, subjects: Subjects, version: int
) -> RefDataSet | None:
    """The set loaded just before ``version`` (the stream holds nothing else), if readable."""
    if version <= 1:
        return None
    try:
        msg = await js.get_msg(subjects.refdata_stream, seq=version - 1)
        return decode_refdata_set(msg.data or b"")
    except nats.js.errors.NotFoundError:
        return None  # gone (max_age, deleted): every row counts as new
    except DecodeError:
        return None
    except nats.errors.Error as exc:
        raise CommandError(
            f"cannot read reference-data version {version - 1}: {_describe(exc)}"
        ) from exc


async def _publish_commands(transport: JetStreamTransport, commands: list[Outbound]) -> None:
    """Publish with PubAcks, sending again (same Msg-Ids) what did not get one in time."""
    pending = commands
    for _ in range(_PUBLISH_ATTEMPTS):
        if not pending:
            return
        results = await transport.publish(pending, _PUBLISH_TIMEOUT_S)
        failed = [r for r in results if r.status is PublishStatus.FAILED]
        if failed:
            raise CommandError(
                f"{len(failed)} stock command(s) refused, first {failed[0].key}: {failed[0].error}"
            )
        retry = {r.key for r in results if r.status is PublishStatus.RETRY}
        pending = [m for m in pending if m.key in retry]
    if pending:
        raise CommandError(
            f"{len(pending)} stock command(s) got no PubAck after {_PUBLISH_ATTEMPTS} attempts; "
            "run the load again (it repeats nothing)"
        )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = ["run_refdata_load", "stock_commands"]
