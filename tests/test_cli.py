"""The command line as a user runs it: ``caresync up`` embedded, health, publish, status, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import pid_alive

import caresync.config

CARESYNC = str(Path(sys.executable).parent / "caresync")


def run(*args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
    return subprocess.run(
        [CARESYNC, *args], capture_output=True, text=True, timeout=timeout_s, env=env, check=False
    )


def wait_until(check: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s")


def start_up(data: Path, log_path: Path) -> subprocess.Popen[str]:
    """``caresync up --data-dir DATA`` with a clean environment; stderr to ``log_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
    with log_path.open("w") as log:
        return subprocess.Popen(
            [CARESYNC, "up", "--data-dir", str(data)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )


def test_up_health_publish_status_and_clean_stop(tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = start_up(data, tmp_path / "up.log")
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        assert "router ready" in line
        assert "nats://127.0.0.1:" in line
        record = json.loads((data / "server.json").read_text())
        assert record["url"] in line
        nats_pid = int(next((data).glob("*.ports")).stem.rsplit("_", 1)[1])

        health = run("health", "--data-dir", str(data))
        assert health.returncode == 0, health.stdout + health.stderr
        assert health.stdout.startswith("ready:")

        demo = Path(caresync.config.__file__).parent / "demo"
        loaded = run("refdata", "load", str(demo), "--data-dir", str(data), "--json")
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        assert json.loads(loaded.stdout)["ok"] is True

        book = run(
            "publish",
            "--data-dir",
            str(data),
            "--kind",
            "appointment.book",
            "--entity",
            "HOSP:A 1.5",
            "--id",
            "cmd-1",
            "--data",
            '{"procedures": [{"code": "27447"}], "facility_id": "MAIN-OR", '
            '"start": "2027-03-01T08:00:00-05:00", "payer_id": "NORTHWIND-HMO"}',
        )
        assert book.returncode == 0, book.stdout + book.stderr
        assert "accepted appointment.book HOSP:A 1.5" in book.stdout
        again = run(
            "publish",
            "--data-dir",
            str(data),
            "--kind",
            "appointment.book",
            "--entity",
            "HOSP:A 1.5",
            "--id",
            "cmd-1",
            "--json",
        )
        assert json.loads(again.stdout)["verdict"] == "duplicate"
        # A command the actor refuses: the publisher is told why, and the exit status says so.
        early = run(
            "publish",
            "--data-dir",
            str(data),
            "--kind",
            "appointment.cancel",
            "--entity",
            "HOSP:B 2",
            "--id",
            "cmd-2",
            "--json",
        )
        assert early.returncode == 1
        verdict = json.loads(early.stdout)
        assert verdict["verdict"] == "rejected"
        assert "not booked: cannot cancel" in verdict["reason"]

        def booked() -> bool:
            status = run("status", "--data-dir", str(data), "appointment", "HOSP:A 1.5", "--json")
            return status.returncode == 0 and json.loads(status.stdout)["status"] == "booked"

        def knee_kit_reserved() -> bool:
            status = run("status", "--data-dir", str(data), "item", "KNEE-KIT@MAIN-OR", "--json")
            reserved = json.loads(status.stdout)["reservations"] if status.returncode == 0 else {}
            return bool(reserved == {"HOSP:A 1.5": 1})

        wait_until(booked)
        wait_until(knee_kit_reserved)
        shown = run("status", "--data-dir", str(data), "appointment", "HOSP:A 1.5", "--json")
        view = json.loads(shown.stdout)
        assert view["billing"]["readiness"] == "pending_authorization"
        assert view["start"] == "2027-03-01T13:00:00+00:00"
        assert {"item_id": "KNEE-KIT", "facility_id": "MAIN-OR", "quantity": 1} in view["supply"][
            "reservations"
        ]
        assert set(view["sync"]) == {"billing", "supply", "erp"}
        text = run("status", "--data-dir", str(data), "appointment", "HOSP:A 1.5")
        assert "appointment HOSP:A 1.5: booked, 27447 at MAIN-OR" in text.stdout
        summary = run("status", "--data-dir", str(data))
        live_entities = int(summary.stdout.split("store: ")[1].split(" entities")[0])
        assert "snapshot CARESYNC_IN: none yet" in summary.stdout
        assert "router: ready" in summary.stdout
        missing = run("status", "--data-dir", str(data), "appointment", "nope")
        assert missing.returncode == 1
        assert "no appointment 'nope' is known" in missing.stdout
        # A snapshot of the running router's state, into JetStream: a rebuild starts there.
        snap = run("replay", "snapshot", "--data-dir", str(data), "--json")
        assert snap.returncode == 0, snap.stdout + snap.stderr
        (taken,) = json.loads(snap.stdout)["snapshots"]
        assert taken["offset"] > 0
        assert taken["rows"]["entities"] == live_entities
        listed = run("status", "--data-dir", str(data))
        described = f"snapshot CARESYNC_IN: state at CARESYNC_IN seq {taken['offset']}, "
        assert described in listed.stdout

        started = time.monotonic()
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=10) == 0
        assert time.monotonic() - started < 10
        wait_until(lambda: not pid_alive(nats_pid), timeout_s=5)
        assert not (data / "server.json").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        assert up.stdout is not None
        up.stdout.close()
    after = run("health", "--data-dir", str(data))
    assert after.returncode == 1
    assert "not ready" in after.stdout

    # With the router stopped, the state is rebuilt from the log (the embedded broker is
    # started for it) and nothing is left to send.
    rebuilt = run("replay", "rebuild", "--data-dir", str(data), "--json", timeout_s=60)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    report = json.loads(rebuilt.stdout)
    assert report["entities"] == live_entities
    assert report["pending_effects"] == 0
    (restored,) = report["snapshots"]
    assert restored["used"]
    assert restored["offsets"] == {"CARESYNC_IN": taken["offset"]}
    assert report["messages"] < taken["offset"]  # only what came after the snapshot
    full = run("replay", "rebuild", "--data-dir", str(data), "--full", timeout_s=60)
    assert full.returncode == 0, full.stdout + full.stderr
    assert f"rebuilt {live_entities} entities from " in full.stdout
    assert "snapshot" not in full.stdout


def test_health_says_why_when_nothing_listens(tmp_path: Path) -> None:
    result = run("health", "--nats", "nats://127.0.0.1:1", "--timeout", "1")
    assert result.returncode == 1
    assert "cannot reach NATS at nats://127.0.0.1:1" in result.stdout


def test_a_config_error_stops_start_up_naming_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[router]\nbatch_sise = 10\n")
    result = run("up", "--data-dir", str(tmp_path / "d"), "--config", str(config))
    assert result.returncode == 2
    assert "router.batch_sise" in result.stderr
    assert str(config) in result.stderr or "bad.toml" in result.stderr


def test_a_second_router_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
    up = subprocess.Popen(
        [CARESYNC, "up", "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert up.stdout is not None
        assert "router ready" in up.stdout.readline()
        second = run("up", "--data-dir", str(data))
        assert second.returncode == 1
        assert "in use by caresync up" in second.stderr
        rebuild = run("replay", "rebuild", "--data-dir", str(data))
        assert rebuild.returncode == 1
        assert "must be stopped" in rebuild.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=10)
        assert up.stdout is not None
        up.stdout.close()


@pytest.mark.parametrize("args", [["status", "appointment"], ["publish"]])
def test_usage_errors_exit_nonzero(tmp_path: Path, args: list[str]) -> None:
    result = run(*args, "--data-dir", str(tmp_path))
    assert result.returncode != 0
    assert result.stderr
