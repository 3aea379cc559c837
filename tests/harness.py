"""Helpers for integration tests against the real nats-server (imported by test modules)."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api
from workflow_network import Network, demo_refdata

from caresync.actors.contract import Registry
from caresync.codecs import Subjects, encode_envelope, make_envelope
from caresync.codecs.refdata import encode_refdata_set
from caresync.config import Config, load_config
from caresync.router.service import RouterService


def make_config(prefix: str, **sections: dict[str, object]) -> Config:
    """Defaults with this test's own subject/stream prefix, plus section overrides."""
    cfg = load_config(None, environ={})
    # Connectors only where a test asks for them (no simulator is running otherwise).
    off = msgspec.structs.replace(cfg.downstream.billing, enabled=False)
    cfg = msgspec.structs.replace(
        cfg, downstream=msgspec.structs.replace(cfg.downstream, billing=off, erp=off, supply=off)
    )
    streams = msgspec.structs.replace(
        cfg.streams,
        subject_prefix=prefix,
        stream_prefix=prefix.upper(),
        **sections.pop("streams", {}),
    )
    cfg = msgspec.structs.replace(cfg, streams=streams)
    for name, values in sections.items():
        cfg = msgspec.structs.replace(
            cfg, **{name: msgspec.structs.replace(getattr(cfg, name), **values)}
        )
    return cfg


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], *, timeout_s: float = 20.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout_s``."""
    try:
        with anyio.fail_after(timeout_s):
            while not await predicate():  # noqa: ASYNC110 - polls NATS/SQLite state with a deadline
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


@dataclass(frozen=True, slots=True)
class Sent:
    """One command of a workload."""

    subject: str
    data: bytes
    command_id: str
    appointment: str
    name: str
    payload: dict[str, object] | None
    occurred_at: datetime


STEPS = ("book", "reschedule", "reschedule", "reschedule", "post_charges")
FACILITIES = ("MAIN", "NORTH")


def appointment_workload(prefix: str, appointments: int, seed: int = 7) -> list[Sent]:
    """Each appointment: booked, rescheduled 3 times (later dates), charged; interleaved at random.

    Per-entity order is kept (that is what a source system guarantees); across entities the
    order is shuffled.  Applied out of order, a reschedule before its booking is rejected, and
    the final dates would differ — which is what the order tests look for.  Bookings use the
    card of procedure 27447 in tests/workflow_network.demo_refdata (gauze 4, knee-kit 1).
    """
    rng = random.Random(seed)
    subjects = Subjects(prefix=prefix, stream_prefix=prefix.upper())
    per_entity: list[list[Sent]] = []
    base = datetime(2027, 1, 1, tzinfo=UTC)
    for a in range(appointments):
        appt = f"A{a}"
        seq = []
        for step, name in enumerate(STEPS):
            payload: dict[str, object]
            if name == "book":
                payload = {
                    "procedures": [{"code": "27447"}],
                    "facility_id": FACILITIES[a % len(FACILITIES)],
                    "start": "2027-01-01T08:00:00+00:00",
                    "payer_id": "ACME",
                }
            elif name == "reschedule":
                payload = {"start": f"2027-02-{step:02d}T08:00:00+00:00"}
            else:
                payload = {"lines": [{"line_id": f"{appt}-L1", "code": "27447", "amount": "900"}]}
            cid = f"{appt}-{step}"
            at = base + timedelta(minutes=step)
            env = make_envelope(
                id=cid, kind=f"appointment.{name}", entity=appt, payload=payload, occurred_at=at
            )
            seq.append(
                Sent(
                    subjects.command("appointment", appt),
                    encode_envelope(env),
                    cid,
                    appt,
                    name,
                    payload,
                    at,
                )
            )
        per_entity.append(seq)
    order: list[Sent] = []
    cursors = [0] * len(per_entity)
    live = list(range(len(per_entity)))
    while live:
        i = rng.choice(live)
        order.append(per_entity[i][cursors[i]])
        cursors[i] += 1
        if cursors[i] == len(per_entity[i]):
            live.remove(i)
    return order


@dataclass(frozen=True, slots=True)
class Expected:
    """What the pure actors make of a workload: the oracle for runs through the router."""

    internal: int
    """Commands actors send each other (cs.int.>)."""
    downstream: int
    """Effects for downstream systems (cs.out.>)."""
    network: Network

    @property
    def applied(self) -> int:
        """Source commands plus internal ones, all accepted."""
        return len(self.network.applied)


def expected(sent: list[Sent]) -> Expected:
    """Run the workload through the pure actors (tests/workflow_network.py)."""
    net = Network()
    for s in sent:
        net.send("appointment", s.appointment, s.name, s.payload, id=s.command_id, at=s.occurred_at)
    assert net.rejected == [], net.rejected
    return Expected(internal=len(net.internal), downstream=len(net.downstream), network=net)


async def load_refdata(js: JetStreamContext, service: RouterService) -> int:
    """Publish the demo reference data and wait until the router follows it; its version."""
    ack = await js.publish(
        service.subjects.refdata_subject, encode_refdata_set(demo_refdata().dataset)
    )

    async def known() -> bool:
        return service.catalog.latest_version >= ack.seq

    await wait_for(known, what="the router to load the reference data")
    return int(ack.seq)


async def publish_all(js: JetStreamContext, sent: list[Sent], *, msg_id: bool = True) -> None:
    """Publish with PubAcks, in order."""
    for s in sent:
        headers = {"Nats-Msg-Id": s.command_id} if msg_id else None
        await js.publish(s.subject, s.data, headers=headers)


async def stream_messages(
    js: JetStreamContext, stream: str, subject_filter: str
) -> list[api.RawStreamMsg]:
    """Every message of ``stream`` on ``subject_filter`` (read directly, in order)."""
    info = await js.stream_info(stream)
    out = []
    seq = 1
    while seq <= info.state.last_seq:
        try:
            msg = await js.get_msg(stream, seq=seq, next=True, subject=subject_filter)
        except Exception:
            break
        if msg.seq is None:
            break
        out.append(msg)
        seq = msg.seq + 1
    return out


async def count_on(js: JetStreamContext, stream: str, subject_filter: str) -> int:
    """How many messages ``stream`` holds on ``subject_filter``."""
    info = await js.stream_info(stream, subjects_filter=subject_filter)
    return sum((info.state.subjects or {}).values())


@asynccontextmanager
async def running(
    cfg: Config, url: str, data_dir: Path, registry: Registry | None = None
) -> AsyncIterator[RouterService]:
    """A router service on the session's nats-server until the block ends (then it drains)."""
    service = RouterService(cfg, nats_url=url, data_dir=data_dir, registry=registry)
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        try:
            yield service
        finally:
            service.stop()


@asynccontextmanager
async def client(url: str) -> AsyncIterator[NatsClient]:
    """A plain nats-py connection for the test's own publishing and reading."""
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.close()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
