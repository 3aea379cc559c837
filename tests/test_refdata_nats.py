"""Reference data on the real nats-server: ``caresync refdata load`` versions and dedupes, a bad
set publishes nothing, and the router's catalog follows the stream, keeps what it saw, and
answers with the version in force at a time."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from harness import count_on, make_config, stream_messages, wait_for
from nats.aio.client import Client as NatsClient

import caresync.config
from caresync.cli.common import Context
from caresync.cli.refdata import run_refdata_load
from caresync.codecs import decode_envelope
from caresync.codecs.refdata import encode_refdata_set
from caresync.codecs.refdata_csv import read_refdata_dir
from caresync.config import Config
from caresync.router.jetstream import JetStreamTransport
from caresync.router.memory_transport import MemoryTransport
from caresync.router.provision import provision
from caresync.router.refdata import RefDataCatalog
from caresync.router.service import open_store, subjects_for

pytestmark = pytest.mark.anyio

DEMO = Path(caresync.config.__file__).parent / "demo"
CARESYNC = str(Path(sys.executable).parent / "caresync")


@pytest.fixture
async def cfg(unique_prefix: str, nc: NatsClient) -> Config:
    config = make_config(unique_prefix)
    await provision(nc.jetstream(), subjects_for(config), config.streams)
    return config


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """A copy of the demo set that a test may edit."""
    return Path(shutil.copytree(DEMO, tmp_path / "demo"))


async def load(
    cfg: Config, url: str, directory: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any]]:
    ctx = Context(data_dir=directory.parent / "data", config=cfg, config_path=None)
    capsys.readouterr()  # drop what came before (provisioning logs)
    status = await run_refdata_load(ctx, url, str(directory), as_json=True)
    # Logs of tasks running meanwhile share stdout: take the one JSON document printed.
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("{")
    return status, json.loads("\n".join(lines[start : lines.index("}", start) + 1]))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


async def refdata_count(nc: NatsClient, cfg: Config) -> int:
    info = await nc.jetstream().stream_info(subjects_for(cfg).refdata_stream)
    return int(info.state.messages)


async def stock_commands(nc: NatsClient, cfg: Config) -> list[Any]:
    subjects = subjects_for(cfg)
    prefix = cfg.streams.subject_prefix
    return await stream_messages(nc.jetstream(), subjects.input_stream(0), f"{prefix}.in.item.>")


async def test_load_versions_and_reports_identical_data_as_unchanged(
    nats_url: str, nc: NatsClient, cfg: Config, demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, first = await load(cfg, nats_url, demo, capsys)
    assert status == 0
    assert first["ok"] is True
    assert first["version"] == 1
    assert first["unchanged"] is False
    assert first["counts"]["items"] == 12
    assert first["counts"]["stock"] == 36
    assert first["stock_commands"] == 36
    assert await refdata_count(nc, cfg) == 1

    commands = await stock_commands(nc, cfg)
    assert len(commands) == 36
    subjects = subjects_for(cfg)
    knee = next(m for m in commands if m.subject == subjects.command("item", "KNEE-KIT@MAIN-OR"))
    env, _ = decode_envelope(knee.data or b"")
    assert (env.id, env.kind, env.entity) == (
        "stock:1:KNEE-KIT@MAIN-OR",
        "item.set_stock",
        "KNEE-KIT@MAIN-OR",
    )
    assert (knee.headers or {})["Nats-Msg-Id"] == env.id
    assert msgspec.json.decode(env.payload_bytes) == {
        "on_hand": 4,
        "reorder_point": 2,
        "reorder_quantity": 3,
        "refdata_version": 1,
    }

    # The same files again (from another directory): same version, nothing new anywhere.
    again = Path(shutil.copytree(demo, demo.parent / "again"))
    status, second = await load(cfg, nats_url, again, capsys)
    assert status == 0
    assert (second["version"], second["unchanged"]) == (1, True)
    assert await refdata_count(nc, cfg) == 1
    assert len(await stock_commands(nc, cfg)) == 36

    # A changed set is version 2; only the stock row that changed goes to its item actor.
    edit(demo / "suppliers.csv", "Acme Surgical Supply", "Acme Surgical Supply Inc")
    edit(demo / "stock.csv", "MAIN-OR,KNEE-KIT,4,2,3", "MAIN-OR,KNEE-KIT,6,2,3")
    status, third = await load(cfg, nats_url, demo, capsys)
    assert status == 0
    assert (third["version"], third["unchanged"], third["stock_commands"]) == (2, False, 1)
    assert await refdata_count(nc, cfg) == 2
    commands = await stock_commands(nc, cfg)
    assert len(commands) == 37
    env, _ = decode_envelope(commands[-1].data or b"")
    assert env.id == "stock:2:KNEE-KIT@MAIN-OR"
    assert msgspec.json.decode(env.payload_bytes)["on_hand"] == 6


async def test_identical_data_is_unchanged_after_the_duplicate_window(
    nats_url: str,
    unique_prefix: str,
    nc: NatsClient,
    demo: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = make_config(unique_prefix, streams={"duplicate_window_s": 1.0})
    await provision(nc.jetstream(), subjects_for(cfg), cfg.streams)
    status, first = await load(cfg, nats_url, demo, capsys)
    assert (status, first["version"]) == (0, 1)
    # Once the window is over, JetStream would store the same Msg-Id again: the load itself
    # must compare with the latest version.  A probe on the input stream (same window) shows
    # when the window is over.
    js = nc.jetstream()
    probe = subjects_for(cfg).command("probe", "x")
    await js.publish(probe, b"{}", headers={"Nats-Msg-Id": "probe"})

    async def window_over() -> bool:
        ack = await js.publish(probe, b"{}", headers={"Nats-Msg-Id": "probe"})
        return not ack.duplicate

    await wait_for(window_over, timeout_s=10.0, what="the duplicate window to pass")
    status, again = await load(cfg, nats_url, demo, capsys)
    assert (status, again["version"], again["unchanged"]) == (0, 1, True)
    assert await refdata_count(nc, cfg) == 1


async def test_a_set_with_one_bad_row_publishes_nothing(
    nats_url: str, nc: NatsClient, cfg: Config, demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(demo / "items.csv", "4250.00", '"4250,00"')
    edit(demo / "stock.csv", "ASC-SOUTH,IOL-LENS,3,2,6", "ASC-SOUTH,IOL-LENS,3,two,6")
    status, out = await load(cfg, nats_url, demo, capsys)
    assert status == 1
    assert out["ok"] is False
    assert [(p["file"], p["line"], p["column"]) for p in out["problems"]] == [
        ("items.csv", 6, "unit_cost"),
        ("stock.csv", 37, "reorder_point"),
    ]
    assert out["problems"][0]["message"] == "'4250,00' is not a number"
    assert await refdata_count(nc, cfg) == 0
    assert await count_on(nc.jetstream(), subjects_for(cfg).input_stream(0), ">") == 0


async def test_the_command_line_prints_every_problem_and_a_summary(
    nats_url: str, unique_prefix: str, cfg: Config, demo: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
    env |= {
        "CARESYNC_STREAMS__SUBJECT_PREFIX": unique_prefix,
        "CARESYNC_STREAMS__STREAM_PREFIX": unique_prefix.upper(),
    }
    args = [CARESYNC, "refdata", "load", "--data-dir", str(tmp_path / "data"), "--nats", nats_url]
    bad = Path(shutil.copytree(demo, tmp_path / "bad"))
    edit(bad / "payer_rules.csv", "SUMMIT-PPO,*,no,yes", "SUMMIT-PPO,*,perhaps,yes")
    edit(bad / "suppliers.csv", "SUP-VISTA,Vista Ophthalmic", "SUP-VISTA,")
    result = await anyio.run_process([*args, str(bad)], env=env, check=False)
    out = result.stdout.decode()
    assert result.returncode == 1
    assert "suppliers.csv:4: column 2 (name): a value is required" in out
    assert "payer_rules.csv:5: column 3 (authorization_required): 'perhaps' is not a boolean" in out
    assert "nothing loaded" in out

    result = await anyio.run_process([*args, str(demo)], env=env, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().startswith(f"loaded version 1 from {demo}: 3 facilities")
    result = await anyio.run_process([*args, str(demo), "--json"], env=env, check=False)
    assert json.loads(result.stdout) == {
        "ok": True,
        "version": 1,
        "unchanged": True,
        "counts": {
            "facilities": 3,
            "suppliers": 3,
            "items": 12,
            "stock": 36,
            "preference_cards": 48,
            "payer_rules": 7,
        },
        "stock_commands": 36,
    }


async def test_the_catalog_follows_the_stream_keeps_versions_and_answers_by_time(
    nats_url: str,
    nc: NatsClient,
    cfg: Config,
    demo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = subjects_for(cfg).refdata_stream
    # Three versions exist before the router starts.
    for n in (1, 2, 3):
        edit(demo / "suppliers.csv", "SUP-ACME,Acme Surgical Supply", f"SUP-ACME,Acme {n}")
        status, out = await load(cfg, nats_url, demo, capsys)
        assert (status, out["version"]) == (0, n)
        edit(demo / "suppliers.csv", f"SUP-ACME,Acme {n}", "SUP-ACME,Acme Surgical Supply")
    between = time.time_ns()

    def acme(data: Any) -> str:
        supplier = data.supplier("SUP-ACME")
        return supplier.name if supplier is not None else ""

    async with await open_store(cfg, tmp_path) as store, anyio.create_task_group() as tg:
        catalog = RefDataCatalog()
        await tg.start(catalog.follow, JetStreamTransport(nc), store.main, stream)
        # Caught up before it said it started: no polling here.
        assert catalog.latest_version == 3
        assert acme(catalog.latest()) == "Acme 3"

        edit(demo / "suppliers.csv", "SUP-ACME,Acme Surgical Supply", "SUP-ACME,Acme 4")
        status, out = await load(cfg, nats_url, demo, capsys)
        assert (status, out["version"]) == (0, 4)

        async def has_four() -> bool:
            return catalog.latest_version == 4

        await wait_for(has_four, what="version 4 in the catalog")
        tg.cancel_scope.cancel()

    versions = catalog.versions()
    assert [v for v, _ in versions] == [1, 2, 3, 4]
    stored = await nc.jetstream().get_msg(stream, seq=4)
    assert stored.time is not None
    # The effective time is the stream's own timestamp, read from the ack subject.
    assert abs(versions[3][1] - int(stored.time.timestamp() * 1e9)) < 1_000_000
    assert versions[2][1] < between < versions[3][1]
    assert acme(catalog.at(between)) == "Acme 3"
    assert acme(catalog.at(versions[3][1])) == "Acme 4"
    assert acme(catalog.at(versions[0][1] - 1)) == ""

    # A new catalog from the store alone knows the same versions, effective at the same times.
    async with await open_store(cfg, tmp_path) as store:
        assert [v for v, _, _ in await store.main.refdata_versions()] == [1, 2, 3, 4]
        await store.reset_state()  # a rebuild keeps reference data
        restored = RefDataCatalog()
        assert await restored.restore(store.main) == 4
    assert restored.versions() == versions
    assert acme(restored.at(between)) == "Acme 3"


async def test_the_catalog_reads_on_after_its_reader_vanishes(
    nats_url: str,
    nc: NatsClient,
    cfg: Config,
    demo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = subjects_for(cfg).refdata_stream
    js = nc.jetstream()
    async with await open_store(cfg, tmp_path) as store, anyio.create_task_group() as tg:
        catalog = RefDataCatalog()
        await tg.start(
            functools.partial(
                catalog.follow,
                JetStreamTransport(nc, expires_s=0.2),
                store.main,
                stream,
                poll_timeout_s=0.2,
            )
        )
        assert catalog.latest_version == 0

        async def reading() -> bool:
            return bool(await js.consumers_info(stream))

        await wait_for(reading, what="the catalog's reader")
        # The server forgets the ephemeral reader (a restart does that to in-memory consumers).
        for info in await js.consumers_info(stream):
            await js.delete_consumer(stream, info.name)
        status, out = await load(cfg, nats_url, demo, capsys)
        assert (status, out["version"]) == (0, 1)

        async def has_one() -> bool:
            return catalog.latest_version == 1

        await wait_for(has_one, what="version 1 read by a new reader")
        tg.cancel_scope.cancel()


async def test_the_catalog_follows_the_memory_transport_too(tmp_path: Path, cfg: Config) -> None:
    transport = MemoryTransport()
    transport.add_stream("REFDATA", ["cs.refdata.load"])
    first = read_refdata_dir(DEMO)
    transport.append("cs.refdata.load", encode_refdata_set(first))
    async with await open_store(cfg, tmp_path) as store, anyio.create_task_group() as tg:
        catalog = RefDataCatalog()
        await tg.start(catalog.follow, transport, store.main, "REFDATA")
        assert catalog.latest_version == 1
        effective = catalog.versions()[0][1]
        assert abs(effective - time.time_ns()) < 60 * 10**9  # the append time, not zero
        transport.append("cs.refdata.load", b"not msgpack")  # skipped, never stops the task
        transport.append("cs.refdata.load", encode_refdata_set(first))

        async def has_three() -> bool:
            return catalog.latest_version == 3

        await wait_for(has_three, what="version 3")
        tg.cancel_scope.cancel()
    assert [v for v, _ in catalog.versions()] == [1, 3]
