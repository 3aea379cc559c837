"""``caresync replay rebuild``: rebuild local state from the streams."""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack

import anyio
import nats.js.errors

from caresync.actors import default_registry
from caresync.cli.common import CommandError, Context, connect_client, print_json
from caresync.cli.datadir import DataDirError, DataDirLock, read_server_record
from caresync.cli.up import mappings_config
from caresync.router.embedded import EmbeddedNats
from caresync.router.logs import configure_logging
from caresync.router.refdata import RefDataCatalog
from caresync.router.replay import rebuild
from caresync.router.service import make_transport, open_store, subjects_for
from caresync.router.worker import WorkerSettings


async def run_rebuild(ctx: Context, nats_flag: str | None, as_json: bool) -> int:
    """Drop state and rebuild it; the router of this data dir must be stopped."""
    configure_logging("warning", ctx.config.log.format)
    lock = DataDirLock(ctx.data_dir)
    try:
        lock.acquire("caresync replay rebuild")
    except DataDirError as exc:
        raise CommandError(f"{exc}: the router must be stopped during a rebuild") from exc
    try:
        async with AsyncExitStack() as stack:
            url = nats_flag or ctx.config.nats.url
            if not url:
                record = read_server_record(ctx.data_dir)
                if record is not None and not record.embedded:
                    url = record.url
            if not url:
                # The embedded broker's JetStream data lives in the data dir: start it for us.
                server = EmbeddedNats(
                    ctx.data_dir, extra_config=mappings_config(subjects_for(ctx.config))
                )
                await server.start()
                stack.push_async_callback(server.stop)
                url = server.url
            nc = await connect_client(url)
            stack.push_async_callback(nc.close)
            store = await open_store(ctx.config, ctx.data_dir)
            stack.push_async_callback(store.close)
            last = [0]

            def progress(n: int) -> None:
                if n - last[0] >= 10_000:
                    last[0] = n
                    print(f"replayed {n} messages", file=sys.stderr, flush=True)

            transport = make_transport(nc, ctx.config)
            subjects = subjects_for(ctx.config)
            catalog = RefDataCatalog()
            await catalog.restore(store)
            try:
                # Catch up with the reference-data log (the store may have been lost too).
                async with anyio.create_task_group() as tg:
                    await tg.start(catalog.follow, transport, store, subjects.refdata_stream)
                    tg.cancel_scope.cancel()
                report = await rebuild(
                    transport=transport,
                    store=store,
                    registry=default_registry(),
                    subjects=subjects,
                    settings=WorkerSettings.from_config(ctx.config),
                    progress=progress,
                    refdata=catalog.at,
                )
            except nats.js.errors.NotFoundError as exc:
                raise CommandError(f"no input stream to rebuild from at {url}: {exc}") from exc
        summary = {
            "messages": report.messages,
            "entities": report.entities,
            "elapsed_s": round(report.elapsed_s, 3),
            "messages_per_s": round(report.messages / report.elapsed_s) if report.elapsed_s else 0,
            "pending_effects": report.pending_effects,
        }
        if as_json:
            print_json(summary)
        else:
            print(
                f"rebuilt {summary['entities']} entities from {summary['messages']} messages in "
                f"{summary['elapsed_s']} s ({summary['messages_per_s']} msgs/s); "
                f"{summary['pending_effects']} effects never sent will go out at the next start"
            )
        return 0
    finally:
        lock.release()
