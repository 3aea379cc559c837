"""Retry policies per downstream, and ``retry-failed``: an effect that failed for good is sent
once more with the same idempotency key, with a fresh attempt budget, and the ledger recovers."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from test_connectors import FakeSystem, connectors

from caresync.actors.ledger import Ledger, acknowledged, sent
from caresync.codecs.downstream import DownstreamAck
from caresync.config.schema import ConnectorConfig
from caresync.connectors.errors import PermanentError, TransientError
from caresync.connectors.http import HttpDownstream
from caresync.router.retry_failed import retry_failed

pytestmark = pytest.mark.anyio


def _http(cfg: ConnectorConfig, respond: httpx.Response | Exception) -> HttpDownstream:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(respond, Exception):
            raise respond
        return respond

    return HttpDownstream("erp", cfg, transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("status", "error"), [(503, TransientError), (502, PermanentError), (429, PermanentError)]
)
async def test_what_counts_as_transient_is_configured_per_downstream(
    status: int, error: type[Exception]
) -> None:
    cfg = ConnectorConfig(transport="http", url="http://erp.test", transient_http_statuses=[503])
    downstream = _http(cfg, httpx.Response(status))
    try:
        with pytest.raises(error, match=f"HTTP {status}"):
            await downstream.call("purchase_order", "k", b"{}")
    finally:
        await downstream.aclose()


@pytest.mark.parametrize(("retry", "error"), [(True, TransientError), (False, PermanentError)])
async def test_a_timeout_is_retried_unless_configured_not_to(
    retry: bool, error: type[Exception]
) -> None:
    cfg = ConnectorConfig(transport="http", url="http://erp.test", retry_on_timeout=retry)
    downstream = _http(cfg, httpx.ReadTimeout("slow"))
    try:
        with pytest.raises(error, match="timed out"):
            await downstream.call("purchase_order", "k", b"{}")
    finally:
        await downstream.aclose()


def test_a_failed_effect_that_later_succeeds_leaves_the_ledger_failed_list() -> None:
    def ack(key: str, outcome: str, error: str = "") -> DownstreamAck:
        return DownstreamAck(
            effect_key=key, system="erp", operation="purchase_order", outcome=outcome, error=error
        )  # type: ignore[arg-type]

    ledger = sent(Ledger(), ("k1", "k2"))
    ledger = acknowledged(ledger, ack("k1", "failed", "HTTP 502"))
    ledger = acknowledged(ledger, ack("k2", "created"))
    assert (ledger.state, ledger.failed, ledger.last_error) == ("failed", ("k1",), "HTTP 502")
    again = acknowledged(ledger, ack("k1", "failed", "still down"))
    assert (again.failed, again.last_error) == (("k1",), "still down")
    healed = acknowledged(ledger, ack("k1", "created"))
    assert (healed.state, healed.failed, healed.last_error, healed.acked) == ("in_sync", (), "", 2)
    assert acknowledged(healed, ack("k1", "created")) == healed  # a repeat changes nothing


async def test_retry_failed_sends_the_same_key_again_with_a_fresh_budget(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    async with connectors(nats_url, unique_prefix, tmp_path, erp={"max_attempts": 2}) as env:
        await env.put("erp", "po-9:erp", "F9")  # nobody answers: no responders, twice
        [(_, _, first)] = await env.wait_acks(1)
        assert (first.outcome, first.attempts) == ("failed", 2)
        assert await retry_failed(env.nc, env.stores, env.subjects, "billing") == {
            "sent": [],
            "not_sent": [],
        }
        assert (
            "unknown downstream"
            in (await retry_failed(env.nc, env.stores, env.subjects, "x"))["error"]
        )
        fake = FakeSystem("erp")
        await env.start(fake)  # the system is back
        result = await retry_failed(env.nc, env.stores, env.subjects, "erp")
        assert [(s["key"], s["system"]) for s in result["sent"]] == [("po-9:erp", "erp")]
        assert "no responders" in result["sent"][0]["last_error"]
        acks = await env.wait_acks(2, "the acknowledgement of the retried effect")
        calls = await env.store.calls("po-9:erp")
        nothing_left = await retry_failed(env.nc, env.stores, env.subjects, "erp")
    assert acks[1][2].outcome == "created"
    assert acks[1][2].effect_key == "po-9:erp"
    assert [c.outcome for c in calls] == ["transient", "failed", "created"]
    assert [key for _, key, _ in fake.calls] == ["po-9:erp"]  # the same idempotency key, once
    assert nothing_left == {"sent": [], "not_sent": []}
