"""``caresync mllp``: an MLLP listener in front of the router's raw HL7 stream."""

from __future__ import annotations

import signal
import sys

import anyio

from caresync.cli.common import CommandError, Context, resolve_url
from caresync.router.jetstream import connect
from caresync.router.logs import configure_logging
from caresync.router.mllp import MllpServer
from caresync.router.raw_client import RawSubmitter
from caresync.router.service import subjects_for


async def run_mllp(ctx: Context, nats_flag: str | None, host: str, port: int) -> int:
    """Serve until SIGINT/SIGTERM; prints one line with the port once listening."""
    cfg = ctx.config
    configure_logging(cfg.log.level, cfg.log.format)
    url = resolve_url(ctx, nats_flag)
    try:
        nc = await connect(url, name="caresync-mllp", connect_timeout_s=cfg.nats.connect_timeout_s)
    except Exception as exc:
        raise CommandError(f"cannot reach NATS at {url}: {exc}") from exc
    submitter = RawSubmitter(nc, subjects_for(cfg), wait_s=cfg.ingest.verdict_timeout_s)
    server = MllpServer(submitter, max_frame_bytes=cfg.ingest.max_message_bytes)
    try:
        async with anyio.create_task_group() as tg:
            try:
                bound = await tg.start(server.serve, host, port)
            except OSError as exc:
                raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
            print(
                f"caresync mllp: listening on {host}:{bound}, messages to {url}",
                flush=True,
            )
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                async for signum in received:
                    print(
                        f"caresync mllp: {signal.Signals(signum).name} received, stopping "
                        f"({server.handled} messages answered)",
                        file=sys.stderr,
                        flush=True,
                    )
                    tg.cancel_scope.cancel()
                    break
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            await nc.close()
    return 0
