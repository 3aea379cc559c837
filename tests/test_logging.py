"""Log lines about a message carry its entity, command id and correlation id; JSON rendering."""

from __future__ import annotations

import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from caresync.actors import default_registry
from caresync.codecs import Subjects, encode_envelope, make_envelope
from caresync.router.logs import configure_logging
from caresync.router.memory_transport import MemoryTransport
from caresync.router.runtime import Router
from caresync.store import Store

S = Subjects()


@pytest.mark.anyio
async def test_a_rejection_is_logged_with_entity_command_and_correlation(tmp_path: Path) -> None:
    transport = MemoryTransport()
    transport.provision(S)
    # A cancellation of an appointment nobody booked yet: rejected by the appointment actor.
    env = make_envelope(
        id="cancel-1",
        kind="appointment.cancel",
        entity="A9",
        payload={"reason": "patient request"},
        occurred_at=datetime(2027, 3, 1, 8, 0, tzinfo=UTC),
        correlation_id="case-77",
    )
    transport.append(S.command("appointment", "A9"), encode_envelope(env))
    async with await Store.open(tmp_path / "s.db") as store:
        router = Router(transport=transport, store=store, registry=default_registry(), subjects=S)
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                await tg.start(router.run)
                with anyio.fail_after(5):
                    while await store.offset(S.input_stream(0)) < 1:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                router.stop()
        outcome = await store.outcome("appointment", "A9", "cancel-1")
    reason = "appointment A9 is new, not booked: cannot cancel"
    assert outcome == ("rejected", reason)
    [rejected] = [line for line in logs if line["event"] == "command_rejected"]
    assert rejected["entity"] == "appointment:A9"
    assert rejected["command_id"] == "cancel-1"
    assert rejected["correlation_id"] == "case-77"
    assert rejected["reason"] == reason


def test_json_lines_are_rendered_once_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.BytesIO()
    fake = io.TextIOWrapper(buffer)
    monkeypatch.setattr(sys, "stderr", fake)
    try:
        configure_logging("info", "json")
        structlog.get_logger("t").info("hello", entity="appointment:A1", command_id="c1")
        structlog.get_logger("t").debug("hidden")
        fake.flush()
        lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    finally:
        structlog.reset_defaults()
    assert len(lines) == 1
    assert lines[0]["event"] == "hello"
    assert lines[0]["entity"] == "appointment:A1"
    assert lines[0]["level"] == "info"
    assert "timestamp" in lines[0]
