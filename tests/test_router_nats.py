"""The router on the real nats-server: order, dedupe beyond the window, dead letters, parking,
and rebuild — each test with its own subject and stream prefix on the session server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from harness import (
    appointment_workload,
    client,
    count_on,
    expected,
    load_refdata,
    make_config,
    publish_all,
    running,
    stream_messages,
    wait_for,
)
from nats.aio.client import Client as NatsClient
from workflow_network import demo_refdata

from caresync.actors import Accepted, EntityKind, Registry, default_registry
from caresync.actors.appointment import AppointmentState
from caresync.codecs import Subjects, encode_envelope, make_envelope
from caresync.codecs.refdata import encode_refdata_set
from caresync.config import Config
from caresync.router.refdata import RefDataCatalog
from caresync.router.replay import rebuild
from caresync.router.service import RouterService, make_transport, open_store, subjects_for
from caresync.router.worker_settings import WorkerSettings
from caresync.store import PartitionedStore

pytestmark = pytest.mark.anyio


def stats(service: RouterService) -> dict[str, int]:
    assert service.router is not None
    totals: dict[str, int] = {}
    for worker in service.router.workers:
        for key, value in worker.stats.as_dict().items():
            totals[key] = totals.get(key, 0) + value
    return totals


async def appointment_states(cfg: Config, data_dir: Path) -> dict[str, AppointmentState]:
    async with await open_store(cfg, data_dir) as store:
        rows = await store.entities("appointment")
    return {r.id: msgspec.msgpack.decode(r.state, type=AppointmentState) for r in rows}


async def test_per_entity_order_with_many_entities_interleaved(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(unique_prefix, router={"batch_size": 64})
    sent = appointment_workload(unique_prefix, appointments=300)
    subjects = subjects_for(cfg)
    oracle = expected(sent)
    async with running(cfg, nats_url, tmp_path) as service, client(nats_url) as nc:
        await load_refdata(nc.jetstream(), service)
        await publish_all(nc.jetstream(), sent)

        async def all_applied() -> bool:
            return stats(service)["accepted"] >= oracle.applied

        await wait_for(all_applied, what=f"{oracle.applied} accepted commands")
        assert stats(service)["rejected"] == 0  # an out-of-order apply would be rejected

        # Applied with their causes (one partition), then recorded once committed: none goes
        # through the input stream.
        async def all_recorded() -> bool:
            records = await count_on(
                nc.jetstream(), subjects.local_stream, f"{unique_prefix}.loc.>"
            )
            assert records <= oracle.internal
            return records == oracle.internal

        await wait_for(all_recorded, what=f"{oracle.internal} records in the local stream")
        js = nc.jetstream()
        assert await count_on(js, subjects.input_stream(0), f"{unique_prefix}.int.>") == 0
    states = await appointment_states(cfg, tmp_path)
    assert len(states) == 300
    for state in states.values():
        assert state.details is not None
        start = state.details.start.date().isoformat()
        assert (state.status, start, state.version) == ("completed", "2027-02-03", 5)
        assert state == oracle.network.state("appointment", state.id)


async def test_duplicates_are_noops_after_the_jetstream_window(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(unique_prefix, streams={"duplicate_window_s": 1.0})
    sent = appointment_workload(unique_prefix, appointments=1)
    book = sent[0]
    applied = expected([book]).applied
    async with running(cfg, nats_url, tmp_path) as service, client(nats_url) as nc:
        js = nc.jetstream()
        await load_refdata(js, service)
        await js.publish(book.subject, book.data, headers={"Nats-Msg-Id": book.command_id})

        async def booked() -> bool:
            return stats(service)["accepted"] == applied

        await wait_for(booked, what="the booking")

        # Re-send with the same Msg-Id until JetStream has forgotten it (its window is 1 s):
        # the stream then stores it again, and only the router's own dedupe stands.
        async def stored_again() -> bool:
            ack = await js.publish(
                book.subject, book.data, headers={"Nats-Msg-Id": book.command_id}
            )
            return not ack.duplicate

        await wait_for(stored_again, timeout_s=10, what="JetStream to forget the Msg-Id")

        async def deduped() -> bool:
            return stats(service)["duplicates"] >= 1

        await wait_for(deduped, what="the router to see the duplicate")
        assert stats(service)["accepted"] == applied
        assert stats(service)["rejected"] == 0
    states = await appointment_states(cfg, tmp_path)
    assert states["A0"].version == 1


async def test_bad_input_is_dead_lettered_with_raw_bytes_and_the_router_keeps_going(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(unique_prefix)
    subjects = subjects_for(cfg)
    good = appointment_workload(unique_prefix, appointments=1)[0]
    good_applied = expected([good]).applied
    bad: list[tuple[str, bytes, str]] = [
        (subjects.command("appointment", "X1"), b"{not json", "malformed json"),
        (
            subjects.command("appointment", "X2"),
            b'{"kind":"appointment.book","entity":"X2","occurred_at":"2026-01-01T00:00:00Z"}',
            "`id`",
        ),
        (
            f"{unique_prefix}.in.spaceship.S1",
            encode_envelope(make_envelope(id="s1", kind="spaceship.launch", entity="S1")),
            "unknown entity kind 'spaceship'",
        ),
        (
            subjects.command("appointment", "X3"),
            encode_envelope(
                make_envelope(
                    id="x3",
                    kind="appointment.book",
                    entity="X3",
                    schema_version=99,
                    payload={"procedure": "p", "facility": "F", "date": "d"},
                )
            ),
            "schema_version 99",
        ),
        (
            subjects.command("appointment", "X4"),
            "\u202e<script>\x00\r\nEvil: 1".encode(),
            "payload starts with byte",
        ),
    ]
    async with running(cfg, nats_url, tmp_path) as service, client(nats_url) as nc:
        js = nc.jetstream()
        await load_refdata(js, service)
        for subject, data, _ in bad:
            await js.publish(subject, data)
        await js.publish(good.subject, good.data)

        async def done() -> bool:
            s = stats(service)
            return s["dead_lettered"] == len(bad) and s["accepted"] == good_applied

        await wait_for(done, what="dead letters and the good booking")
        letters = await stream_messages(js, subjects.dead_letter_stream, f"{unique_prefix}.dlq.>")
        await wait_for(
            lambda: _count(js, subjects.dead_letter_stream, unique_prefix, len(bad)),
            what="dead letters to be published",
        )
        letters = await stream_messages(js, subjects.dead_letter_stream, f"{unique_prefix}.dlq.>")
    assert [m.data for m in letters] == [data for _, data, _ in bad]
    for message, (subject, _, fragment) in zip(letters, bad, strict=True):
        headers: dict[str, Any] = message.headers or {}
        assert fragment in headers["Caresync-Reason"], headers
        assert headers["Caresync-Subject"] == subject
        assert "\n" not in headers["Caresync-Reason"]


async def _count(js: Any, stream: str, prefix: str, n: int) -> bool:
    return await count_on(js, stream, f"{prefix}.dlq.>") >= n


class Poke(msgspec.Struct, frozen=True):
    poison: bool = False


class Pokes(msgspec.Struct, frozen=True):
    id: str
    count: int = 0


class Poked(msgspec.Struct, frozen=True):
    pass


def _decide(state: Pokes, command: Any) -> Accepted[Poked]:
    if command.payload.poison:
        raise ValueError(f"cannot digest {command.id}")
    return Accepted(events=(Poked(),))


def poke_message(
    subjects: Subjects, entity: str, n: int, poison: bool = False
) -> tuple[str, bytes]:
    """Subject and bytes of poke number ``n`` to ``entity`` (id ``<entity>-<n>``)."""
    env = make_envelope(
        id=f"{entity}-{n}", kind="poke.poke", entity=entity, payload={"poison": poison}
    )
    return subjects.command("poke", entity), encode_envelope(env)


POKE = EntityKind(
    name="poke",
    state_type=Pokes,
    commands={"poke": Poke},
    initial=lambda entity: Pokes(id=entity),
    decide=_decide,
    evolve=lambda state, event: Pokes(id=state.id, count=state.count + 1),
)


async def test_a_poison_message_parks_its_entity_and_others_keep_flowing(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(
        unique_prefix,
        supervision={"max_failures": 3, "backoff_initial_ms": 1.0, "backoff_max_ms": 5.0},
    )
    registry = Registry.of(*default_registry().kinds.values(), POKE)
    subjects = subjects_for(cfg)

    def poke(entity: str, n: int, poison: bool = False) -> tuple[str, bytes]:
        return poke_message(subjects, entity, n, poison)

    async with running(cfg, nats_url, tmp_path, registry) as service, client(nats_url) as nc:
        js = nc.jetstream()
        sequence = [poke("sick", 0), poke("sick", 1, poison=True), poke("sick", 2)]
        sequence += [poke(f"well{i}", n) for n in range(5) for i in range(20)]
        for subject, data in sequence:
            await js.publish(subject, data)

        async def flowed() -> bool:
            s = stats(service)
            return s["accepted"] == 1 + 100 and s["parked"] == 2

        await wait_for(flowed, what="healthy entities to finish and the sick one to park")
        async with await open_store(cfg, tmp_path) as store:
            parked = await store.parked("poke", "sick")
            sick = await store.entity("poke", "sick")
            wells = [await store.entity("poke", f"well{i}") for i in range(20)]
    assert [p.command_id for p in parked] == ["sick-1", "sick-2"]
    assert "ValueError: cannot digest sick-1" in parked[0].reason
    assert parked[0].failures == 3
    assert sick is not None
    assert sick.parked
    assert msgspec.msgpack.decode(sick.state, type=Pokes).count == 1
    for well in wells:
        assert well is not None
        assert msgspec.msgpack.decode(well.state, type=Pokes).count == 5


async def live_run(
    cfg: Config, url: str, data_dir: Path, appointments: int
) -> list[tuple[str, str, bytes]]:
    """Run the appointment workload to the end; the committed snapshots afterwards."""
    sent = appointment_workload(cfg.streams.subject_prefix, appointments=appointments)
    oracle = expected(sent)
    async with running(cfg, url, data_dir) as service, client(url) as nc:
        await load_refdata(nc.jetstream(), service)
        await publish_all(nc.jetstream(), sent)

        async def applied() -> bool:
            return stats(service)["accepted"] == oracle.applied

        await wait_for(applied, what="the live run")
    async with await open_store(cfg, data_dir) as store:
        return [(e.kind, e.id, e.state) for e in await store.entities()]


async def catalog_from_log(nc: NatsClient, cfg: Config, store: PartitionedStore) -> RefDataCatalog:
    """The reference data versions, from the store and the refdata stream (as the CLI does)."""
    catalog = RefDataCatalog()
    await catalog.restore(store.main)
    async with anyio.create_task_group() as tg:
        await tg.start(
            catalog.follow, make_transport(nc, cfg), store.main, subjects_for(cfg).refdata_stream
        )
        tg.cancel_scope.cancel()
    return catalog


async def test_replay_rebuild_produces_the_live_state_and_resends_nothing(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(unique_prefix, router={"batch_size": 50})
    subjects = subjects_for(cfg)
    live = await live_run(cfg, nats_url, tmp_path, appointments=60)
    async with await open_store(cfg, tmp_path) as store:
        assert (await store.counts())["outbox_pending"] == 0
    async with client(nats_url) as nc:
        js = nc.jetstream()
        out_before = (await js.stream_info(subjects.output_stream)).state.messages
        in_before = (await js.stream_info(subjects.input_stream(0))).state.messages
        async with await open_store(cfg, tmp_path) as store:
            catalog = await catalog_from_log(nc, cfg, store)
            report = await rebuild(
                transport=make_transport(nc, cfg),
                store=store,
                registry=default_registry(),
                subjects=subjects,
                settings=WorkerSettings.from_config(cfg),
                refdata=catalog.at,
            )
            rebuilt = [(e.kind, e.id, e.state) for e in await store.entities()]
            counts = await store.counts()
        assert (await js.stream_info(subjects.output_stream)).state.messages == out_before
        assert (await js.stream_info(subjects.input_stream(0))).state.messages == in_before
    assert report.messages == in_before
    assert rebuilt == live
    assert counts["outbox_pending"] == 0


async def test_rebuild_from_the_streams_alone_sends_nothing_again(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    # The store is lost entirely; the streams are the log and the ledger of what was sent.
    cfg = make_config(unique_prefix, router={"batch_size": 40})
    subjects = subjects_for(cfg)
    appointments = 30
    live = await live_run(cfg, nats_url, tmp_path, appointments=appointments)
    for leftover in tmp_path.glob("caresync.db*"):
        leftover.unlink()
    async with client(nats_url) as nc, await open_store(cfg, tmp_path) as store:
        catalog = await catalog_from_log(nc, cfg, store)
        await rebuild(
            transport=make_transport(nc, cfg),
            store=store,
            registry=default_registry(),
            subjects=subjects,
            settings=WorkerSettings.from_config(cfg),
            refdata=catalog.at,
        )
        rebuilt = [(e.kind, e.id, e.state) for e in await store.entities()]
        counts = await store.counts()
    assert rebuilt == live
    assert counts["outbox_pending"] == 0
    # every internal and downstream effect, all recognised as sent
    oracle = expected(appointment_workload(unique_prefix, appointments=appointments))
    assert counts["outbox_sent"] == oracle.internal + oracle.downstream


async def test_a_command_stored_after_a_load_is_decided_with_that_load(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    # Live and replay must agree: the router waits for its reference-data follower before a
    # batch, so a booking published right after a load reserves that load's card.
    cfg = make_config(unique_prefix)
    book = appointment_workload(unique_prefix, appointments=1)[0]
    async with running(cfg, nats_url, tmp_path) as service, client(nats_url) as nc:
        js = nc.jetstream()
        await js.publish(
            service.subjects.refdata_subject, encode_refdata_set(demo_refdata().dataset)
        )
        await js.publish(book.subject, book.data)

        async def booked() -> bool:
            return stats(service)["accepted"] >= 1

        await wait_for(booked, what="the booking")
    states = await appointment_states(cfg, tmp_path)
    reserved = [(r.item_id, r.quantity) for r in states["A0"].plan.reservations]
    assert reserved == [("gauze", 4), ("knee-kit", 1)]
