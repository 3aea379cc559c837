"""Operating a running router from the CLI: parked entities listed and released, dead letters
listed with filters, shown, retried through the normal path and dropped."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from harness import client, load_refdata, make_config, running, wait_for
from test_cli import CARESYNC
from test_router_nats import POKE, Poked, Pokes, poke_message, stats

from caresync.actors import Accepted, Registry, default_registry
from caresync.actors.appointment import AppointmentState
from caresync.codecs import encode_envelope, make_envelope
from caresync.config import Config, dump_toml
from caresync.router.service import open_store, subjects_for

pytestmark = pytest.mark.anyio

SICK = {"on": True}
"""While on, a poisoned poke fails; the operator 'fixes the bug' by turning it off."""


def _decide(state: Pokes, command: Any) -> Accepted[Poked]:
    if command.payload.poison and SICK["on"]:
        raise ValueError(f"cannot digest {command.id}")
    return Accepted(events=(Poked(),))


SOMETIMES = dataclasses.replace(POKE, decide=_decide)


async def cli(
    cfg: Config, url: str, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run ``caresync ARGS --nats URL --config <this test's config>`` off the event loop."""
    config = tmp_path / "caresync.toml"
    if not config.exists():
        config.write_text(dump_toml(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
    command = [CARESYNC, *args, "--nats", url, "--config", str(config)]
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            command, capture_output=True, text=True, timeout=60, env=env, check=False
        )
    )


async def test_a_released_entity_runs_its_parked_messages_in_order(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(
        unique_prefix,
        supervision={"max_failures": 2, "backoff_initial_ms": 1.0, "backoff_max_ms": 5.0},
    )
    registry = Registry.of(*default_registry().kinds.values(), SOMETIMES)
    subjects = subjects_for(cfg)

    def poke(entity: str, n: int, poison: bool = False) -> tuple[str, bytes]:
        return poke_message(subjects, entity, n, poison)

    SICK["on"] = True
    async with running(cfg, nats_url, tmp_path, registry) as service, client(nats_url) as nc:
        js = nc.jetstream()
        for subject, data in [poke("sick", 0), poke("sick", 1, poison=True), poke("sick", 2)]:
            await js.publish(subject, data)
        await wait_for(lambda: _parked(service, 2), what="the sick entity to park")

        listed = await cli(cfg, nats_url, tmp_path, "parked", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [(r["id"], r["command_id"]) for r in rows] == [
            ("sick", "sick-1"),
            ("sick", "sick-2"),
        ]
        assert "cannot digest sick-1" in rows[0]["reason"]

        # Still broken: the release re-runs it, it parks again, nothing is lost or reordered.
        again = await cli(cfg, nats_url, tmp_path, "parked", "release", "poke", "sick")
        assert again.returncode == 1, again.stdout + again.stderr
        assert "still parked" in again.stdout

        SICK["on"] = False  # the fix is deployed
        released = await cli(cfg, nats_url, tmp_path, "parked", "release", "poke:sick", "--json")
        assert released.returncode == 0, released.stdout + released.stderr
        result = json.loads(released.stdout)
        assert result["parked"] is False
        assert [(m["seq"], m["outcome"]) for m in result["messages"]] == [
            (rows[0]["seq"], "applied"),
            (rows[1]["seq"], "applied"),
        ]
        # Later messages of the entity flow normally again.
        subject, data = poke("sick", 3)
        await js.publish(subject, data)
        await wait_for(lambda: _accepted(service, 4), what="the released entity to flow")

        not_parked = await cli(cfg, nats_url, tmp_path, "parked", "release", "poke", "sick")
        assert not_parked.returncode == 1
        assert "is not parked" in not_parked.stderr

    async with await open_store(cfg, tmp_path) as store:
        assert await store.parked("poke") == []
        sick = await store.entity("poke", "sick")
        applied = [await store.applied_record("poke", "sick", f"sick-{n}") for n in range(4)]
    assert sick is not None
    assert not sick.parked
    assert msgspec.msgpack.decode(sick.state, type=Pokes).id == "sick"
    # applied in input order: each record's stream seq is larger than the one before
    seqs = [record[2] for record in applied if record is not None]
    assert len(seqs) == 4
    assert seqs == sorted(seqs)


async def _parked(service: Any, n: int) -> bool:
    return bool(stats(service)["parked"] >= n)


async def _accepted(service: Any, n: int) -> bool:
    return bool(stats(service)["accepted"] >= n)


async def test_dead_letters_are_listed_shown_retried_and_dropped(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(unique_prefix)
    subjects = subjects_for(cfg)
    book = make_envelope(
        id="book-1",
        kind="appointment.book",
        entity="HOSP:A1",
        payload={
            "procedures": [{"code": "27447"}],
            "facility_id": "MAIN-OR",
            "start": "2027-03-01T08:00:00-05:00",
        },
    )
    cancel = make_envelope(id="cancel-1", kind="appointment.cancel", entity="HOSP:A1", payload={})
    async with running(cfg, nats_url, tmp_path) as service, client(nats_url) as nc:
        await load_refdata(nc.jetstream(), service)
        js = nc.jetstream()
        # The cancel arrives before the booking (a source system's ordering bug): rejected.
        await js.publish(subjects.command("appointment", "HOSP:A1"), encode_envelope(cancel))
        await js.publish(subjects.command("appointment", "HOSP:A2"), b"{not json")
        await js.publish(subjects.raw("hl7"), b"MSH|^~\\&|X\rgarbage\r")
        await wait_for(
            lambda: _letters(js, subjects.dead_letter_stream, 3), what="three dead letters"
        )

        everything = await cli(cfg, nats_url, tmp_path, "dlq", "list", "--json")
        letters = [json.loads(line) for line in everything.stdout.splitlines()]
        assert len(letters) == 3, everything.stdout + everything.stderr
        by_kind = await cli(
            cfg, nats_url, tmp_path, "dlq", "list", "--kind", "appointment.cancel", "--json"
        )
        cancelled = [json.loads(line) for line in by_kind.stdout.splitlines()]
        assert [c["entity"] for c in cancelled] == ["HOSP:A1"]
        from_hl7 = await cli(cfg, nats_url, tmp_path, "dlq", "list", "--source", "hl7", "--json")
        assert [json.loads(x)["format"] for x in from_hl7.stdout.splitlines()] == ["hl7"]
        by_reason = await cli(
            cfg, nats_url, tmp_path, "dlq", "list", "--reason", "undecodable", "--json"
        )
        assert len(by_reason.stdout.splitlines()) == 1
        future = await cli(
            cfg, nats_url, tmp_path, "dlq", "list", "--since", "2999-01-01T00:00:00Z", "--json"
        )
        assert future.stdout == ""

        shown = await cli(cfg, nats_url, tmp_path, "dlq", "show", str(cancelled[0]["seq"]))
        assert shown.returncode == 0, shown.stderr
        assert "not booked: cannot cancel" in shown.stdout
        assert '"id":"cancel-1"' in shown.stdout

        # Retrying before the fix: rejected again, the letter stays.
        early = await cli(cfg, nats_url, tmp_path, "dlq", "retry", str(cancelled[0]["seq"]))
        assert early.returncode == 1, early.stdout + early.stderr
        assert "rejected" in early.stdout
        # The booking arrives; now the retried cancel applies, and its letter leaves the DLQ.
        await js.publish(subjects.command("appointment", "HOSP:A1"), encode_envelope(book))
        retried = await cli(
            cfg, nats_url, tmp_path, "dlq", "retry", str(cancelled[0]["seq"]), "--json"
        )
        assert retried.returncode == 0, retried.stdout + retried.stderr
        assert json.loads(retried.stdout)["verdict"] == "accepted"

        remaining = await cli(cfg, nats_url, tmp_path, "dlq", "list", "--json")
        seqs = [json.loads(line)["seq"] for line in remaining.stdout.splitlines()]
        assert cancelled[0]["seq"] not in seqs
        missing = await cli(cfg, nats_url, tmp_path, "dlq", "drop", "999999")
        assert missing.returncode == 1
        assert "nothing dropped" in missing.stderr
        dropped = await cli(cfg, nats_url, tmp_path, "dlq", "drop", *map(str, seqs))
        assert dropped.returncode == 0, dropped.stderr
        empty = await cli(cfg, nats_url, tmp_path, "dlq", "list", "--json")
        assert empty.stdout == ""
        nothing = await cli(cfg, nats_url, tmp_path, "dlq", "retry", "999999")
        assert nothing.returncode == 1
        assert "no dead letter #999999" in nothing.stdout

    async with await open_store(cfg, tmp_path) as store:
        original = await store.applied_record("appointment", "HOSP:A1", "cancel-1")
        state = await store.entity("appointment", "HOSP:A1")
    # The original stays what it was (rejected); its retry was a command of its own.
    assert original is not None
    assert original[0] == "rejected"
    assert state is not None
    assert msgspec.msgpack.decode(state.state, type=AppointmentState).status == "cancelled"


async def _letters(js: Any, stream: str, n: int) -> bool:
    info = await js.stream_info(stream)
    return bool(info.state.messages >= n)


async def test_a_restart_reads_none_of_the_history_it_already_applied(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    """Recovery speed does not depend on history length: every batch commits each touched
    entity's snapshot with the stream offset, so a restart resumes after the offset."""
    from test_router_nats import live_run

    cfg = make_config(unique_prefix)
    before = await live_run(cfg, nats_url, tmp_path, appointments=250)
    started = anyio.current_time()
    async with running(cfg, nats_url, tmp_path) as service:
        ready_s = anyio.current_time() - started
        await anyio.sleep(0.5)  # time to read anything it wrongly would
        after_restart = stats(service)
    async with await open_store(cfg, tmp_path) as store:
        after = [(e.kind, e.id, e.state) for e in await store.entities()]
        offset = await store.offset(subjects_for(cfg).input_stream(0))
    assert len(before) > 300
    assert offset > 1_000  # the history is long (sources only: fan-out is applied locally) ...
    assert after_restart["received"] == 0  # ... and none of it was read again
    assert after == before
    print(f"restart to ready after {offset} messages of history: {ready_s:.2f} s")


async def test_publishing_a_file_with_no_router_stores_it_without_waiting_per_message(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    from test_ingest_nats import siu

    from caresync.router.provision import provision

    cfg = make_config(unique_prefix)
    async with client(nats_url) as nc:
        await provision(nc.jetstream(), subjects_for(cfg), cfg.streams)
    feed = tmp_path / "feed.hl7"
    feed.write_bytes(b"".join(siu("S12", f"N-{i}", filler=f"N{i}") for i in range(3)))
    published = await cli(
        cfg, nats_url, tmp_path, "publish", "--format", "hl7", str(feed), "--wait", "1", "--json"
    )
    lines = [json.loads(line) for line in published.stdout.splitlines()]
    assert published.returncode == 1, published.stderr  # nothing was decided
    assert [line["verdict"] for line in lines] == ["pending"] * 3
    assert "no router answered" in lines[0]["reason"]
    assert all("not waiting" in line["reason"] for line in lines[1:])
    assert all(line["seq"] > 0 for line in lines)  # stored: a router decides them when it runs
