"""``caresync sim``: run the simulated billing, ERP and supply systems, or steer running ones."""

from __future__ import annotations

import signal
import sys
from contextlib import AsyncExitStack
from typing import Any

import anyio
import nats.errors
import orjson

from caresync.cli.common import CommandError, Context, connect_client, print_json, resolve_url
from caresync.router.logs import configure_logging
from caresync.sim import SimAlreadyRunning, SimError, SimServer, SimSettings

SIM_DB = "sim.db"
_CONNECT_TIMEOUT_S = 3.0
_CONTROL_TIMEOUT_S = 10.0  # receive/claim wait up to 3 s for JetStream on the sim's side


async def run_sim(ctx: Context, nats_flag: str | None, sim_prefix: str) -> int:
    """Serve the simulators in the foreground until SIGINT/SIGTERM; exit status 0 then."""
    cfg = ctx.config
    configure_logging(cfg.log.level, cfg.log.format)
    url = resolve_url(ctx, nats_flag)
    db = ctx.data_dir / SIM_DB
    settings = SimSettings(
        sim_prefix=sim_prefix,
        router_prefix=cfg.streams.subject_prefix,
        connect_timeout_s=_CONNECT_TIMEOUT_S,
    )
    async with AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(SimServer(url, db, settings))
        except SimAlreadyRunning as exc:
            raise CommandError(str(exc)) from None
        except SimError as exc:
            raise CommandError(f"simulator failed: {exc}") from None
        except TimeoutError:
            raise CommandError(f"cannot reach NATS at {url} (no connection in time)") from None
        except (OSError, nats.errors.Error) as exc:
            reason = str(exc) or type(exc).__name__
            raise CommandError(f"cannot reach NATS at {url}: {reason}") from None
        print(
            f"caresync sim: billing, erp and supply ready on {url} "
            f"(subjects {sim_prefix}.<system>.<operation>), records in {db}",
            flush=True,
        )
        await _wait_for_signal()
    print("caresync sim: stopped", file=sys.stderr, flush=True)
    return 0


async def _wait_for_signal() -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        async for signum in received:
            print(
                f"caresync sim: {signal.Signals(signum).name} received, stopping",
                file=sys.stderr,
                flush=True,
            )
            return


async def control(
    ctx: Context, nats_flag: str | None, sim_prefix: str, op: str, body: dict[str, Any]
) -> dict[str, Any]:
    """One control request to the running simulators; no answer is a CommandError."""
    url = resolve_url(ctx, nats_flag)
    nc = await connect_client(url, _CONNECT_TIMEOUT_S)
    subject = f"{sim_prefix}.control.{op}"
    try:
        msg = await nc.request(subject, orjson.dumps(body), timeout=_CONTROL_TIMEOUT_S)
    except nats.errors.NoRespondersError:
        raise CommandError(
            f"no simulator is serving {subject} on {url}: start one with `caresync sim`"
        ) from None
    except nats.errors.TimeoutError:
        raise CommandError(f"no answer on {subject} within {_CONTROL_TIMEOUT_S:g} s") from None
    finally:
        await nc.close()
    reply: dict[str, Any] = orjson.loads(msg.data)
    if "error" in reply:
        raise CommandError(f"simulator refused {op}: {reply['error']}")
    return reply


async def run_fail(
    ctx: Context,
    nats_flag: str | None,
    sim_prefix: str,
    system: str,
    for_s: float,
    mode: str,
    delay_s: float | None,
) -> int:
    """Make one system fail for a while."""
    body: dict[str, Any] = {"system": system, "for_s": for_s, "mode": mode}
    if delay_s is not None:
        body["delay_s"] = delay_s
    reply = await control(ctx, nats_flag, sim_prefix, "fail", body)
    slow = f", answering after {reply['fault']['delay_s']:g} s" if mode == "slow" else ""
    print(f"{system}: {mode} for {for_s:g} s{slow}")
    return 0


async def run_heal(ctx: Context, nats_flag: str | None, sim_prefix: str, system: str) -> int:
    """Clear one system's fault now."""
    reply = await control(ctx, nats_flag, sim_prefix, "heal", {"system": system})
    fault = reply["fault"]
    print(f"{system}: healed (was {fault['mode']})" if fault else f"{system}: had no fault")
    return 0


async def run_report(ctx: Context, nats_flag: str | None, sim_prefix: str, as_json: bool) -> int:
    """Print each system's counts and fault."""
    reply = await control(ctx, nats_flag, sim_prefix, "report", {})
    if as_json:
        print_json(reply)
        return 0
    print(f"{'system':<9}{'created':>9}{'dups':>7}{'errors':>8}{'refused':>9}  fault")
    for name, system in reply["systems"].items():
        fault = system["fault"]
        state = f"{fault['mode']} ({fault['remaining_s']:g} s left)" if fault else "-"
        print(
            f"{name:<9}{system['created']:>9}{system['duplicates']:>7}"
            f"{system['errors']:>8}{system['refused']:>9}  {state}"
        )
        for op, c in system["operations"].items():
            print(
                f"  {op:<17}{c['created']:>9}{c['duplicates']:>7}{c['errors']:>8}{c['refused']:>9}"
            )
    fb = reply["feedback"]
    print(f"feedback to caresync: {fb['sent']} sent, {fb['pending']} pending")
    return 0


async def run_feedback(
    ctx: Context, nats_flag: str | None, sim_prefix: str, op: str, body: dict[str, Any]
) -> int:
    """``receive`` or ``claim``: make a system send feedback; exit 1 if it is still queued."""
    reply = await control(ctx, nats_flag, sim_prefix, op, body)
    if reply["published"]:
        print(f"sent {reply['id']} to {reply['subject']}")
        return 0
    print(
        f"queued {reply['id']} for {reply['subject']}: not stored by JetStream yet "
        "(is the router's input stream there?); the simulator keeps retrying",
        file=sys.stderr,
    )
    return 1
