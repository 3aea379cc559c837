"""``caresync replay entity|window`` on the real nats-server and SQLite: a dry run changes
nothing, reference data changed since shows (and, replayed for real, sends once) what it
changes, ``--from`` and windows choose what counts, and bad input stops with exit status 1."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from harness import (
    appointment_workload,
    client,
    load_refdata,
    make_config,
    publish_all,
    running,
    stream_messages,
    wait_for,
)
from nats.js import JetStreamContext
from workflow_network import demo_refdata

from caresync.cli.common import CommandError, Context
from caresync.cli.datadir import DataDirLock
from caresync.cli.replay import ProgressBar, run_replay_entity, run_replay_window
from caresync.cli.up import mappings_config
from caresync.codecs import Subjects, decode_envelope, encode_envelope, make_envelope
from caresync.codecs.refdata import PayerRule, PreferenceCardLine, encode_refdata_set
from caresync.config import Config
from caresync.router.embedded import EmbeddedNats
from caresync.router.replay_diff import Recorded, classify, state_changes
from caresync.router.service import RouterService, store_path, subjects_for
from caresync.store import OutboxRow, read_only_union

pytestmark = pytest.mark.anyio

CARESYNC = str(Path(sys.executable).parent / "caresync")


@dataclass(frozen=True)
class Deployment:
    """A deployment whose router ran a workload and is stopped."""

    cfg: Config
    url: str
    data_dir: Path

    @property
    def ctx(self) -> Context:
        return Context(data_dir=self.data_dir, config=self.cfg, config_path=None)

    @property
    def subjects(self) -> Subjects:
        return subjects_for(self.cfg)


# -- helpers --------------------------------------------------------------------------------------
def worker_last_seq(service: RouterService) -> int:
    assert service.router is not None
    return max(w.stats.last_seq for w in service.router.workers)


def pending_effects(dep: Deployment) -> int:
    path = store_path(dep.cfg, dep.data_dir)
    with contextlib.closing(read_only_union(path)) as db:  # every partition's file
        row = db.execute("SELECT count(*) FROM outbox WHERE status = 'pending'").fetchone()
    return int(row[0])


async def wait_quiet(dep: Deployment, service: RouterService, js: JetStreamContext) -> None:
    """Until the router has applied all its input stream holds and has nothing left to send."""
    stream = dep.subjects.input_stream(0)

    async def quiet() -> bool:
        applied = worker_last_seq(service)
        last = (await js.stream_info(stream)).state.last_seq
        pending = pending_effects(dep)
        again = (await js.stream_info(stream)).state.last_seq
        return applied == last == again and pending == 0

    await wait_for(quiet, what="the router to apply everything and send its effects")


async def fingerprint(dep: Deployment) -> tuple[dict[str, tuple[str, int]], dict[str, int]]:
    """The store files (content, mtime) and every stream's last sequence."""
    files = {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(dep.data_dir.glob("caresync.db*"))
    }
    s = dep.subjects
    names = [
        s.input_stream(0),
        s.output_stream,
        s.dead_letter_stream,
        s.refdata_stream,
        s.raw_stream,
    ]
    async with client(dep.url) as nc:
        js = nc.jetstream()
        streams = {n: int((await js.stream_info(n)).state.last_seq) for n in names}
    return files, streams


def json_doc(out: str) -> Any:
    lines = out.splitlines()
    start = lines.index("{")
    end = len(lines) - lines[::-1].index("}")
    return json.loads("\n".join(lines[start:end]))


def namespace(dep: Deployment, **flags: Any) -> argparse.Namespace:
    values: dict[str, Any] = {
        "kind": "appointment",
        "id": "A0",
        "from_": "",
        "since": "",
        "until": "",
        "dry_run": True,
        "with_current_refdata": False,
        "json": True,
        "nats": dep.url,
        "data_dir": str(dep.data_dir),
        "config": None,
    }
    values.update(flags)
    return argparse.Namespace(**values)


async def replay_entity(
    dep: Deployment, capsys: pytest.CaptureFixture[str], **flags: Any
) -> dict[str, Any]:
    capsys.readouterr()
    assert await run_replay_entity(dep.ctx, namespace(dep, **flags)) == 0
    doc: dict[str, Any] = json_doc(capsys.readouterr().out)
    return doc


async def replay_window(
    dep: Deployment, capsys: pytest.CaptureFixture[str], **flags: Any
) -> dict[str, Any]:
    capsys.readouterr()
    assert await run_replay_window(dep.ctx, namespace(dep, **flags)) == 0
    doc: dict[str, Any] = json_doc(capsys.readouterr().out)
    return doc


def keys(entity: dict[str, Any], group: str) -> set[str]:
    return {e["key"] for e in entity["effects"][group]}


async def msg_ids(js: JetStreamContext, stream: str) -> Counter[str]:
    return Counter(
        str((m.headers or {}).get("Nats-Msg-Id", ""))
        for m in await stream_messages(js, stream, ">")
    )


# -- a deployment shared by the tests that change nothing ---------------------------------------
@pytest.fixture(scope="module")
async def deployment(
    nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> Deployment:
    prefix = "t" + secrets.token_hex(5)
    dep = Deployment(make_config(prefix), nats_server.url, tmp_path_factory.mktemp("replay"))
    sent = appointment_workload(prefix, appointments=6)
    async with running(dep.cfg, dep.url, dep.data_dir) as service, client(dep.url) as nc:
        js = nc.jetstream()
        await load_refdata(js, service)
        await publish_all(js, sent)

        async def all_in() -> bool:
            return worker_last_seq(service) >= len(sent)

        await wait_for(all_in, what="the workload")
        await wait_quiet(dep, service, js)
    return dep


async def test_a_dry_run_finds_nothing_to_send_and_changes_nothing(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    before = await fingerprint(deployment)
    doc = await replay_entity(deployment, capsys)
    assert (doc["dry_run"], doc["refdata"]) == (True, "in_force")
    [a0] = doc["entities"]
    assert (a0["kind"], a0["id"], a0["messages"], a0["reapplied"]) == ("appointment", "A0", 5, 5)
    assert a0["outcomes"] == {"accepted": 5, "rejected": 0, "duplicates": 0, "dead_lettered": 0}
    assert a0["effects"]["would_send"] == []
    assert a0["effects"]["no_longer_produced"] == []
    sent = a0["effects"]["already_sent"]
    assert {e["status"] for e in sent} == {"sent"}
    assert any(e["key"] == "A0/A0-0:billing" for e in sent)
    assert not any(e["changed"] for e in sent)
    assert a0["state"] == {"changed": False, "existed": True, "fields": []}
    assert a0["written"] is False
    assert await fingerprint(deployment) == before


async def test_from_a_sequence_or_a_time_counts_only_the_later_messages(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    async with client(deployment.url) as nc:
        history = await stream_messages(
            nc.jetstream(),
            deployment.subjects.input_stream(0),
            deployment.subjects.command("appointment", "A3"),
        )
    assert len(history) == 5
    third = history[2]
    assert third.seq is not None
    doc = await replay_entity(deployment, capsys, id="A3", from_=str(third.seq))
    [a3] = doc["entities"]
    assert (a3["messages"], a3["reapplied"], a3["from_seq"]) == (5, 3, third.seq)
    assert a3["effects"]["would_send"] == []
    # Only the effects of the re-applied commands count (A3-2 on), all already sent.
    assert keys(a3, "already_sent")
    assert all(
        k.split(":")[0] in {"A3/A3-2", "A3/A3-3", "A3/A3-4"} for k in keys(a3, "already_sent")
    )
    assert a3["state"]["changed"] is False

    fourth = history[3]
    assert fourth.time is not None
    assert fourth.seq is not None
    doc = await replay_entity(deployment, capsys, id="A3", from_=fourth.time.isoformat())
    [a3] = doc["entities"]
    assert (a3["reapplied"], a3["from_seq"]) == (2, fourth.seq)


async def test_a_window_replays_every_entity_it_touched_and_all_agree_with_the_live_run(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    before = await fingerprint(deployment)
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    until = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    doc = await replay_window(deployment, capsys, since=since, until=until, kind="")
    prefix = deployment.cfg.streams.subject_prefix
    async with client(deployment.url) as nc:
        inputs = await stream_messages(
            nc.jetstream(), deployment.subjects.input_stream(0), f"{prefix}.>"
        )
        # One partition: every internal command was applied with its cause and recorded.
        records = await stream_messages(
            nc.jetstream(), deployment.subjects.local_stream, f"{prefix}.loc.>"
        )
    assert records
    s = deployment.subjects
    addresses = [s.parse_address(m.subject or "") for m in inputs]
    addresses += [s.parse_local(m.subject or "") for m in records]
    touched = {(a.kind, a.entity) for a in addresses}
    assert {(e["kind"], e["id"]) for e in doc["entities"]} == touched
    assert {k for k, _ in touched} >= {"appointment", "billing", "supply", "erp", "procedure"}
    # Every kind, replayed from its log with the data in force, is what the live router made.
    totals = doc["totals"]
    assert totals["entities"] == len(touched)
    assert (totals["would_send"], totals["no_longer_produced"], totals["state_changed"]) == (
        0,
        0,
        0,
    )
    assert totals["errors"] == 0
    assert totals["already_sent"] > 0

    doc = await replay_window(deployment, capsys, since=since, until=until, kind="appointment")
    assert sorted(e["id"] for e in doc["entities"]) == [f"A{i}" for i in range(6)]
    assert doc["window"]["kind"] == "appointment"
    assert await fingerprint(deployment) == before


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        ("entity", {"id": "NOPE"}, "no history for appointment 'NOPE'"),
        ("entity", {"kind": "starship"}, "unknown entity kind 'starship'"),
        ("entity", {"from_": "yesterday"}, "--from 'yesterday' is not a stream sequence"),
        ("entity", {"from_": "2027-01-01T00:00:00"}, "has no UTC offset"),
        ("entity", {"from_": "999999"}, "nothing to re-apply from --from 999999"),
        (
            "window",
            {"since": "2001-01-01T00:00:00Z", "until": "2001-01-02T00:00:00Z"},
            "no input message was applied between",
        ),
        (
            "window",
            {"since": "2001-01-02T00:00:00Z", "until": "2001-01-01T00:00:00Z"},
            "is after --until",
        ),
        ("window", {"since": "now", "until": "later"}, "--since 'now' is not an RFC 3339 time"),
    ],
)
async def test_bad_input_is_a_clear_message_and_changes_nothing(
    deployment: Deployment,
    capsys: pytest.CaptureFixture[str],
    command: str,
    flags: dict[str, Any],
    message: str,
) -> None:
    before = await fingerprint(deployment)
    run = run_replay_entity if command == "entity" else run_replay_window
    with pytest.raises(CommandError, match=message.replace("(", r"\(")):
        await run(deployment.ctx, namespace(deployment, dry_run=False, **flags))
    assert await fingerprint(deployment) == before


async def test_a_replay_needs_the_router_stopped(deployment: Deployment) -> None:
    lock = DataDirLock(deployment.data_dir)
    lock.acquire("a router")
    try:
        with pytest.raises(CommandError, match="must be stopped during a replay"):
            await run_replay_entity(deployment.ctx, namespace(deployment))
    finally:
        lock.release()


async def test_the_command_line_prints_json_and_exits_1_on_an_empty_window(
    deployment: Deployment,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
    prefix = deployment.cfg.streams.subject_prefix
    env |= {
        "CARESYNC_STREAMS__SUBJECT_PREFIX": prefix,
        "CARESYNC_STREAMS__STREAM_PREFIX": prefix.upper(),
    }
    where = ["--data-dir", str(deployment.data_dir), "--nats", deployment.url]
    before = await fingerprint(deployment)
    result = await anyio.run_process(
        [CARESYNC, "replay", "entity", "appointment", "A1", "--dry-run", "--json", *where],
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    doc = json.loads(result.stdout)
    assert doc["totals"]["would_send"] == 0
    assert doc["entities"][0]["id"] == "A1"

    result = await anyio.run_process(
        [CARESYNC, "replay", "entity", "appointment", "A1", "--dry-run", *where],
        env=env,
        check=False,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "appointment A1: 5 messages" in out
    assert "0 would be sent" in out
    assert "nothing was changed" in out

    window = ["--since", "2001-01-01T00:00:00Z", "--until", "2001-01-02T00:00:00Z"]
    result = await anyio.run_process(
        [CARESYNC, "replay", "window", *window, *where], env=env, check=False
    )
    assert result.returncode == 1
    assert "nothing to replay" in result.stderr.decode()
    assert await fingerprint(deployment) == before


# -- reference data changed since ---------------------------------------------------------------
def arthroscopy_workload(prefix: str) -> list[tuple[str, bytes, str]]:
    """B0 and B1: procedure 29881 (no card in the demo data), booked then rescheduled; B2: the
    knee card (27447).  (subject, data, command id) each."""
    subjects = Subjects(prefix=prefix, stream_prefix=prefix.upper())
    base = datetime(2027, 3, 1, tzinfo=UTC)
    out = []
    for n, code in enumerate(("29881", "29881", "27447")):
        appt = f"B{n}"
        book = {
            "procedures": [{"code": code}],
            "facility_id": "MAIN",
            "start": "2027-03-10T08:00:00+00:00",
            "payer_id": "ACME",
        }
        steps = [("book", book), ("reschedule", {"start": "2027-03-12T08:00:00+00:00"})]
        for step, (name, payload) in enumerate(steps):
            cid = f"{appt}-{step}"
            env = make_envelope(
                id=cid,
                kind=f"appointment.{name}",
                entity=appt,
                payload=payload,
                occurred_at=base + timedelta(minutes=step),
            )
            out.append((subjects.command("appointment", appt), encode_envelope(env), cid))
    return out


async def test_reference_data_changed_since_shows_in_a_dry_run_and_a_replay_sends_it_once(
    nats_url: str, unique_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dep = Deployment(make_config(unique_prefix), nats_url, tmp_path)
    v1 = demo_refdata().dataset
    card = PreferenceCardLine(procedure_code="29881", item_id="gauze", quantity=2)
    rule = PayerRule(
        payer_id="ACME", procedure_code="29881", authorization_required=True, covered=True
    )
    v2 = msgspec.structs.replace(
        v1,
        preference_cards=[*v1.preference_cards, card],
        payer_rules=[rule, *v1.payer_rules],
    )
    async with running(dep.cfg, nats_url, tmp_path) as service, client(nats_url) as nc:
        js = nc.jetstream()
        await load_refdata(js, service)
        commands = arthroscopy_workload(unique_prefix)
        for subject, data, cid in commands:
            await js.publish(subject, data, headers={"Nats-Msg-Id": cid})
        await wait_for(lambda: _at_least(service, len(commands)), what="the bookings")
        await wait_quiet(dep, service, js)
        ack = await js.publish(service.subjects.refdata_subject, encode_refdata_set(v2))

        async def v2_known() -> bool:
            return service.catalog.latest_version >= ack.seq

        await wait_for(v2_known, what="the new reference data")

    before = await fingerprint(dep)
    # With the data in force when each message came, the replay is what the router did.
    [b0] = (await replay_entity(dep, capsys, id="B0"))["entities"]
    assert b0["effects"]["would_send"] == []
    assert b0["state"]["changed"] is False
    # With the current data, the card now found reserves gauze: new plans for supply and ERP.
    doc = await replay_entity(dep, capsys, id="B0", with_current_refdata=True)
    assert (doc["refdata"], doc["refdata_version"]) == ("current", ack.seq)
    [b0] = doc["entities"]
    new = {"B0/B0-0:supply:MAIN", "B0/B0-0:erp:MAIN", "B0/B0-1:erp:MAIN"}
    assert keys(b0, "would_send") == new
    assert {e["status"] for e in b0["effects"]["would_send"]} == {"new"}
    # Sent with the old card and the old readiness: the same keys, so never sent again.
    changed = {e["key"] for e in b0["effects"]["already_sent"] if e["changed"]}
    assert changed == {"B0/B0-0:procedure:29881", "B0/B0-0:billing"}
    fields = {f["path"]: f for f in b0["state"]["fields"]}
    assert set(fields) == {"plan.reservations", "plan.missing_cards", "plan.readiness"}
    assert fields["plan.reservations"]["after"] == [{"item_id": "gauze", "quantity": 2}]
    assert fields["plan.missing_cards"]["before"] == ["29881"]
    assert fields["plan.readiness"] == {
        "path": "plan.readiness",
        "before": "ready",
        "after": "pending_authorization",
    }
    assert b0["outcome_changes"] == []
    # The same as text.
    capsys.readouterr()
    await run_replay_entity(dep.ctx, namespace(dep, id="B0", with_current_refdata=True, json=False))
    text = capsys.readouterr().out
    assert "3 would be sent, 2 already sent (2 with other content now, not sent again)" in text
    assert "send    B0/B0-0:supply:MAIN -> " in text
    assert "state: changed: plan.reservations, plan.readiness, plan.missing_cards" in text
    assert f"dry run with the current reference data (version {ack.seq})" in text
    # B2's card did not change: nothing new either way.
    [b2] = (await replay_entity(dep, capsys, id="B2", with_current_refdata=True))["entities"]
    assert b2["effects"]["would_send"] == []
    assert b2["state"]["changed"] is False
    assert await fingerprint(dep) == before

    # For real: the snapshot changes and the new effects wait in the outbox...
    capsys.readouterr()
    args = namespace(dep, id="B0", with_current_refdata=True, dry_run=False, json=False)
    assert await run_replay_entity(dep.ctx, args) == 0
    text = capsys.readouterr().out
    assert "replayed 1 of 1 entities" in text
    assert "1 snapshots changed, 3 effects queued" in text
    [b0] = (await replay_entity(dep, capsys, id="B0", with_current_refdata=True))["entities"]
    assert pending_effects(dep) == len(new)
    # ...a second replay finds them queued and the state as replayed...
    assert keys(b0, "would_send") == new
    assert {e["status"] for e in b0["effects"]["would_send"]} == {"queued"}
    assert b0["state"]["changed"] is False
    [b0] = (await replay_entity(dep, capsys, id="B0", with_current_refdata=True, dry_run=False))[
        "entities"
    ]
    assert pending_effects(dep) == len(new)  # ...and queues nothing twice...
    # ...and the router sends each once at its next start, and acts on them downstream.
    async with running(dep.cfg, nats_url, tmp_path) as service, client(nats_url) as nc:
        js = nc.jetstream()

        async def sent() -> bool:
            ids = await msg_ids(js, dep.subjects.input_stream(0))
            return all(ids[k] == 1 for k in new)

        await wait_for(sent, what="the new effects to be sent")
        await wait_quiet(dep, service, js)
        inputs = await msg_ids(js, dep.subjects.input_stream(0))
        outputs = await msg_ids(js, dep.subjects.output_stream)
        downstream = [
            decode_envelope(m.data or b"")[0]
            for m in await stream_messages(js, dep.subjects.output_stream, ">")
        ]
    assert max(inputs.values()) == 1
    assert max(outputs.values()) == 1
    # Supply and ERP acted on each new plan; every downstream effect once (unique Msg-Ids).
    assert {env.causation_id for env in downstream if env.causation_id in new} == new
    # Everything the replay produced is now sent: nothing left to send.
    [b0] = (await replay_entity(dep, capsys, id="B0", with_current_refdata=True))["entities"]
    assert b0["effects"]["would_send"] == []
    assert new <= keys(b0, "already_sent")
    assert b0["state"]["changed"] is False

    # A window of appointments: B1 gets what B0 got; B0 and B2 have nothing new.
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    until = datetime.now(UTC).isoformat()
    window = namespace(
        dep, kind="appointment", since=since, until=until, dry_run=False, with_current_refdata=True
    )
    capsys.readouterr()
    assert await run_replay_window(dep.ctx, window) == 0
    doc = json_doc(capsys.readouterr().out)
    by_id = {e["id"]: e for e in doc["entities"]}
    assert sorted(by_id) == ["B0", "B1", "B2"]
    assert keys(by_id["B1"], "would_send") == {k.replace("B0", "B1") for k in new}
    assert keys(by_id["B0"], "would_send") == keys(by_id["B2"], "would_send") == set()
    assert doc["totals"]["written"] == 3
    assert pending_effects(dep) == len(new)


async def test_a_parked_entity_is_only_replayed_dry(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    path = store_path(deployment.cfg, deployment.data_dir)

    def park(parked: bool) -> None:
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute(
                "UPDATE entities SET parked = ? WHERE kind = 'appointment' AND id = 'A5'",
                (int(parked),),
            )

    park(True)
    try:
        before = await fingerprint(deployment)
        [a5] = (await replay_entity(deployment, capsys, id="A5"))["entities"]
        assert (a5["parked"], a5["written"], a5["error"]) == (True, False, "")
        with pytest.raises(CommandError, match="is parked: release it first"):
            await run_replay_entity(deployment.ctx, namespace(deployment, id="A5", dry_run=False))
        assert await fingerprint(deployment) == before
    finally:
        park(False)


def test_effects_are_sorted_against_what_the_streams_and_the_outbox_hold() -> None:
    def row(key: str, payload: bytes = b"p") -> OutboxRow:
        return OutboxRow(key=key, subject=f"cs.int.x.{key}", payload=payload)

    produced = [row("new"), row("streamed"), row("recorded", b"other"), row("queued"), row("new")]
    outbox = {
        "recorded": Recorded("cs.int.x.recorded", "sent", b"p"),
        "queued": Recorded("cs.int.x.queued", "pending", b"p"),
        "was-sent": Recorded("cs.int.x.was-sent", "sent", b"p"),
        "was-queued": Recorded("cs.int.x.was-queued", "pending", b"p"),
    }
    previous = {k: f"cs.int.x.{k}" for k in ("was-sent", "was-queued", "was-streamed", "never")}
    diff = classify(produced, previous, {"streamed", "was-streamed"}, outbox)
    assert [(e.key, e.status, e.changed) for e in diff.would_send] == [
        ("new", "new", None),
        ("queued", "queued", False),
    ]
    assert [(e.key, e.changed) for e in diff.already_sent] == [
        ("streamed", None),
        ("recorded", True),
    ]
    assert [(e.key, e.status) for e in diff.no_longer_produced] == [
        ("was-queued", "queued"),
        ("was-sent", "sent"),
        ("was-streamed", "sent"),
    ]
    assert diff.changed_sent == 1


def test_state_changes_name_the_fields_down_to_the_leaves() -> None:
    before = {"status": "booked", "plan": {"date": "d", "lines": [1]}, "gone": 1}
    after = {"status": "booked", "plan": {"date": "e", "lines": [1, 2]}, "new": 2}
    assert [(c.path, c.before, c.after) for c in state_changes(before, after)] == [
        ("plan.date", "d", "e"),
        ("plan.lines", [1], [1, 2]),
        ("gone", 1, None),
        ("new", None, 2),
    ]
    assert state_changes(before, before) == []
    assert [c.path for c in state_changes(None, after)] == ["(state)"]


async def test_with_partitions_each_entity_is_read_from_its_own_partition(
    tmp_path: Path, unique_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config(unique_prefix, streams={"partitions": 3})
    subjects = subjects_for(cfg)
    sent = appointment_workload(unique_prefix, appointments=6)
    async with EmbeddedNats(tmp_path / "nats", extra_config=mappings_config(subjects)) as server:
        dep = Deployment(cfg, server.url, tmp_path / "data")
        async with running(cfg, dep.url, dep.data_dir) as service, client(dep.url) as nc:
            js = nc.jetstream()
            await load_refdata(js, service)
            await publish_all(js, sent)

            async def quiet() -> bool:
                assert service.router is not None
                for w in service.router.workers:
                    if w.stats.last_seq != (await js.stream_info(w.stream)).state.last_seq:
                        return False
                return sum(w.stats.accepted for w in service.router.workers) >= len(sent)

            await wait_for(quiet, what="the workload on every partition")
            await wait_for(lambda: _no_pending(dep), what="every effect to be sent")
        streams = {p: (await js_last(dep.url, subjects.input_stream(p))) for p in range(3)}
        assert all(streams.values())  # the workload spread over the partitions
        since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        until = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
        doc = await replay_window(dep, capsys, since=since, until=until, kind="")
        totals = doc["totals"]
        assert totals["entities"] > 6
        assert {e["stream"] for e in doc["entities"]} == {
            subjects.input_stream(p) for p in range(3)
        }
        assert (totals["would_send"], totals["state_changed"], totals["errors"]) == (0, 0, 0)
        assert totals["already_sent"] > 0
        [a4] = (await replay_entity(dep, capsys, id="A4"))["entities"]
        assert (a4["messages"], a4["effects"]["would_send"]) == (5, [])
        with pytest.raises(CommandError, match="no input stream holds a message for it"):
            await run_replay_entity(dep.ctx, namespace(dep, id="A99"))


async def js_last(url: str, stream: str) -> int:
    async with client(url) as nc:
        return int((await nc.jetstream().stream_info(stream)).state.last_seq)


async def _no_pending(dep: Deployment) -> bool:
    return pending_effects(dep) == 0


async def _at_least(service: RouterService, seq: int) -> bool:
    return worker_last_seq(service) >= seq


def test_the_progress_bar_reports_long_replays_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bar = ProgressBar("appointment A0")
    bar.expect(5000)
    for _ in range(10):
        bar.advance(500)
    bar.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "appointment A0: 500/5000 messages"
    assert err[-1] == "appointment A0: 5000/5000 messages"
    short = ProgressBar()
    short.expect(10)
    short.advance(10)
    assert capsys.readouterr().err == ""
