"""Downstream connectors on the real nats-server: delivery in order, retries with back-off,
permanent failures, one system down while the others flow, and HTTP against a real server.

The downstream systems here are fakes written in the test (a NATS responder, a stdlib HTTP
server) answering per the contract in connectors/downstream.py.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import nats
import orjson
import pytest
from anyio.abc import TaskGroup, TaskStatus
from harness import count_on, make_config, stream_messages, wait_for
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

import caresync.connectors
from caresync.codecs import Envelope, Subjects, decode_envelope, encode_envelope, make_envelope
from caresync.config import Config
from caresync.config.schema import ConnectorConfig
from caresync.connectors import (
    ConnectorSetupError,
    Delivery,
    DownstreamAck,
    DownstreamReply,
    HttpDownstream,
    PermanentError,
    TransientError,
    ack_id,
    run_connectors,
)
from caresync.router.provision import provision
from caresync.router.service import RouterService, open_store, subjects_for
from caresync.store import PartitionedStore, Store

pytestmark = pytest.mark.anyio

FAST: dict[str, Any] = {"timeout_s": 1.0, "backoff_initial_ms": 20.0, "backoff_max_ms": 80.0}


@dataclass
class FakeSystem:
    """A downstream system on NATS: ``script`` replies first, then created/duplicate by key."""

    system: str
    script: list[dict[str, Any]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    calls: list[tuple[str, str, bytes]] = field(default_factory=list)
    """(operation, Idempotency-Key, body) of every call received."""

    def answer(self, msg: Msg) -> bytes:
        operation = msg.subject.rsplit(".", 1)[1]
        key = (msg.headers or {}).get("Idempotency-Key", "")
        self.calls.append((operation, key, msg.data))
        if self.script:
            return orjson.dumps(self.script.pop(0))
        outcome = "duplicate" if key in self.seen else "created"
        self.seen.add(key)
        return orjson.dumps(
            {"outcome": outcome, "system": self.system, "operation": operation,
             "reference": f"REF-{key}", "attempts": 1}
        )  # fmt: skip

    async def serve(self, url: str, prefix: str, *, task_status: TaskStatus[None]) -> None:
        nc = await nats.connect(url)
        try:
            sub = await nc.subscribe(f"{prefix}.{self.system}.*")
            await nc.flush()  # the server knows the interest before anyone is told it is up
            task_status.started()
            async for msg in sub.messages:
                await msg.respond(self.answer(msg))
        finally:
            with anyio.CancelScope(shield=True):
                await nc.close()


@dataclass
class Env:
    """One test's connectors: config, subjects, a client, the store and the task group."""

    cfg: Config
    subjects: Subjects
    nc: NatsClient
    js: JetStreamContext
    stores: PartitionedStore
    tg: TaskGroup
    url: str

    @property
    def store(self) -> Store:
        """The main file, where the connectors record their calls."""
        return self.stores.main

    @property
    def sim_prefix(self) -> str:
        return f"{self.cfg.streams.subject_prefix}sim"

    async def start(self, fake: FakeSystem) -> anyio.CancelScope:
        scope = anyio.CancelScope()

        async def run(*, task_status: TaskStatus[None]) -> None:
            with scope:
                await fake.serve(self.url, self.sim_prefix, task_status=task_status)

        await self.tg.start(run)
        return scope

    async def put(self, system: str, key: str, entity: str, owner: str = "") -> bytes:
        """Publish an effect as the router does; returns its bytes."""
        operation = {"erp": "purchase_order", "billing": "charge", "supply": "reserve"}[system]
        env = make_envelope(
            id=key,
            kind=f"{system}.{operation}",
            entity=entity,
            payload={"quantity": 3},
            source=f"caresync/{owner or system}",
            correlation_id=f"corr-{key}",
            causation_id=key.split(":")[0],
        )
        data = encode_envelope(env)
        await self.js.publish(self.subjects.downstream(system, entity), data)
        return data

    async def acks(self) -> list[tuple[str, Envelope, DownstreamAck]]:
        """Every acknowledgement published so far: (subject, envelope, payload), in order."""
        prefix = self.cfg.streams.subject_prefix
        raw = await stream_messages(self.js, self.subjects.input_stream(0), f"{prefix}.int.>")
        out = []
        for m in raw:
            env, _ = decode_envelope(m.data or b"")
            ack = msgspec.msgpack.decode(env.payload_bytes, type=DownstreamAck)
            out.append((str(m.subject), env, ack))
        return out

    async def wait_acks(self, n: int, what: str = "") -> list[tuple[str, Envelope, DownstreamAck]]:
        prefix = self.cfg.streams.subject_prefix
        stream = self.subjects.input_stream(0)

        async def enough() -> bool:
            return await count_on(self.js, stream, f"{prefix}.int.>") >= n

        await wait_for(enough, what=what or f"{n} acknowledgements")
        return await self.acks()


@asynccontextmanager
async def connectors(
    url: str, prefix: str, data_dir: Path, **systems: dict[str, Any]
) -> AsyncIterator[Env]:
    """Streams provisioned, a store, and the connectors of ``systems`` (others disabled)."""
    base = {"subject_prefix": f"{prefix}sim", **FAST}
    downstream: dict[str, object] = {
        name: msgspec.convert(
            {**base, "enabled": name in systems, **systems.get(name, {})}, ConnectorConfig
        )
        for name in ("billing", "erp", "supply")
    }
    cfg = make_config(prefix, downstream=downstream)
    subjects = subjects_for(cfg)
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await provision(js, subjects, cfg.streams)
        async with await open_store(cfg, data_dir) as stores, anyio.create_task_group() as tg:
            await tg.start(run_connectors, nc, cfg, subjects, stores.main)
            yield Env(cfg, subjects, nc, js, stores, tg, url)
            tg.cancel_scope.cancel()
    finally:
        await nc.close()


async def test_an_effect_is_delivered_once_and_acknowledged_to_its_owner(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    fake = FakeSystem("erp")
    async with connectors(nats_url, unique_prefix, tmp_path, erp={}) as env:
        await env.start(fake)
        body = await env.put("erp", "po-1:erp", "F1")
        [(subject, ack_env, ack)] = await env.wait_acks(1)

        async def acked() -> bool:
            info = await env.js.consumer_info(env.subjects.output_stream, "connector-erp")
            return bool(info.num_ack_pending == 0 and info.ack_floor.stream_seq == 1)

        await wait_for(acked, what="the effect to be acked on its stream")
        calls = await env.store.calls("po-1:erp")
    assert fake.calls == [("purchase_order", "po-1:erp", body)]
    assert subject == f"{unique_prefix}.int.erp.F1"
    assert (ack_env.id, ack_env.kind, ack_env.entity) == (
        "ack:po-1:erp",
        "erp.downstream_ack",
        "F1",
    )
    assert (ack_env.causation_id, ack_env.correlation_id) == ("po-1:erp", "corr-po-1:erp")
    assert ack == DownstreamAck(
        effect_key="po-1:erp",
        system="erp",
        operation="purchase_order",
        outcome="created",
        reference="REF-po-1:erp",
        attempts=1,
    )
    assert [(c.attempt, c.outcome, c.reference) for c in calls] == [(1, "created", "REF-po-1:erp")]


async def test_a_key_the_system_already_has_is_acknowledged_as_duplicate(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    fake = FakeSystem("billing", seen={"c1:charge"})
    async with connectors(nats_url, unique_prefix, tmp_path, billing={}) as env:
        await env.start(fake)
        await env.put("billing", "c1:charge", "A1", owner="billing")
        [(subject, _, ack)] = await env.wait_acks(1)
        counts = await env.store.call_counts()
    assert subject == f"{unique_prefix}.int.billing.A1"
    assert (ack.outcome, ack.attempts) == ("duplicate", 1)
    assert counts == {"billing": {"duplicate": 1}}


async def test_transient_errors_are_retried_with_back_off_and_acknowledged_once(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    busy = {"error": "busy", "transient": True}
    fake = FakeSystem("erp", script=[busy, busy])
    async with connectors(nats_url, unique_prefix, tmp_path, erp={}) as env:
        await env.start(fake)
        await env.put("erp", "po-2:erp", "F1")
        await env.wait_acks(1)
        await env.put("erp", "po-3:erp", "F1")  # the next one flows after the retries
        acks = await env.wait_acks(2)
        calls = await env.store.calls("po-2:erp")
    assert [a.effect_key for _, _, a in acks] == ["po-2:erp", "po-3:erp"]
    assert (acks[0][2].outcome, acks[0][2].attempts) == ("created", 3)
    assert [c.outcome for c in calls] == ["transient", "transient", "created"]
    assert [c.attempt for c in calls] == [1, 2, 3]
    assert "busy" in calls[0].error
    # back-off: at least the initial delay, then at least twice that
    assert calls[1].at - calls[0].at >= 0.020
    assert calls[2].at - calls[1].at >= 0.040
    assert [key for _, key, _ in fake.calls] == ["po-2:erp"] * 3 + ["po-3:erp"]


async def test_a_permanent_error_fails_the_effect_and_the_next_one_flows(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    fake = FakeSystem("supply", script=[{"error": "unknown item X", "transient": False}])
    async with connectors(nats_url, unique_prefix, tmp_path, supply={}) as env:
        await env.start(fake)
        await env.put("supply", "r1:supply", "MAIN")
        await env.put("supply", "r2:supply", "MAIN")
        acks = await env.wait_acks(2)
        failed = await env.store.calls("r1:supply")
    assert [(a.effect_key, a.outcome) for _, _, a in acks] == [
        ("r1:supply", "failed"),
        ("r2:supply", "created"),
    ]
    assert "unknown item X" in acks[0][2].error
    assert [(c.outcome, c.attempt) for c in failed] == [("failed", 1)]
    assert len(fake.calls) == 2


async def test_max_attempts_exhausted_fails_the_effect(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    async with connectors(nats_url, unique_prefix, tmp_path, erp={"max_attempts": 3}) as env:
        await env.put("erp", "po-4:erp", "F2")  # nobody answers: no responders, every time
        [(_, _, ack)] = await env.wait_acks(1)
        calls = await env.store.calls("po-4:erp")
    assert (ack.outcome, ack.attempts) == ("failed", 3)
    assert "gave up after 3 attempts" in ack.error
    assert "no responders" in ack.error
    assert [c.outcome for c in calls] == ["transient", "transient", "failed"]


async def test_one_system_down_does_not_delay_another_and_catches_up_in_order(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    billing, erp = FakeSystem("billing"), FakeSystem("erp")
    async with connectors(nats_url, unique_prefix, tmp_path, billing={}, erp={}) as env:
        await env.start(erp)  # billing is down: no responders
        for i in range(3):
            await env.put("billing", f"c{i}:charge", f"A{i}")
            await env.put("erp", f"po{i}:erp", "F1")
        acks = await env.wait_acks(3, "erp acknowledgements while billing is down")
        assert {a.system for _, _, a in acks} == {"erp"}

        async def billing_retried() -> bool:
            return len(await env.store.calls("c0:charge")) >= 2

        await wait_for(billing_retried, what="billing to be retried")
        await env.start(billing)
        acks = await env.wait_acks(6, "billing to catch up")
        first = await env.store.calls("c0:charge")
    billing_acks = [a for _, _, a in acks if a.system == "billing"]
    assert [(a.effect_key, a.outcome) for a in billing_acks] == [
        (f"c{i}:charge", "created") for i in range(3)
    ]
    assert [key for _, key, _ in billing.calls] == [f"c{i}:charge" for i in range(3)]
    assert [key for _, key, _ in erp.calls] == [f"po{i}:erp" for i in range(3)]
    assert {c.outcome for c in first[:-1]} == {"transient"}
    assert first[-1].outcome == "created"
    assert billing_acks[0].attempts == len(first)


async def test_a_message_that_is_not_an_effect_is_dead_lettered_and_the_next_flows(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    fake = FakeSystem("erp")
    async with connectors(nats_url, unique_prefix, tmp_path, erp={}) as env:
        await env.start(fake)
        await env.js.publish(env.subjects.downstream("erp", "F9"), b"{not json")
        await env.put("erp", "po-5:erp", "F9")
        [(_, _, ack)] = await env.wait_acks(1)
        dlq = env.subjects.dead_letter_stream
        letters = await stream_messages(env.js, dlq, f"{unique_prefix}.dlq.>")
    assert ack.effect_key == "po-5:erp"
    assert [m.data for m in letters] == [b"{not json"]
    assert (letters[0].headers or {})["Caresync-Reason-Code"] == "undecodable"


# -- HTTP --------------------------------------------------------------------------------------


@dataclass
class HttpLog:
    """What the fake HTTP system received, and the statuses it answers with, in turn."""

    statuses: list[int]
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)


@contextmanager
def http_system(log: HttpLog) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 answering POSTs per ``log.statuses`` (then 201)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            log.requests.append((self.path, dict(self.headers.items()), body))
            status = log.statuses.pop(0) if log.statuses else 201
            key = self.headers.get("Idempotency-Key", "")
            if status < 300:
                reply: dict[str, Any] = {"outcome": "created", "reference": f"H-{key}"}
            else:
                reply = {"error": f"status {status}", "transient": status >= 500}
            data = orjson.dumps(reply)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/erp"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_http_sends_the_key_and_auth_header_and_retries_a_503(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    log = HttpLog(statuses=[503, 200, 400])
    with http_system(log) as url:
        erp = {"transport": "http", "url": url, "auth_header": "Authorization: Bearer s3cret"}
        async with connectors(nats_url, unique_prefix, tmp_path, erp=erp) as env:
            body = await env.put("erp", "po-6:erp", "F1")
            await env.put("erp", "po-7:erp", "F1")
            acks = await env.wait_acks(2)
            calls = await env.store.calls("po-6:erp")
    assert [(a.effect_key, a.outcome, a.attempts) for _, _, a in acks] == [
        ("po-6:erp", "created", 2),
        ("po-7:erp", "failed", 1),
    ]
    assert acks[0][2].reference == "H-po-6:erp"
    assert "HTTP 400" in acks[1][2].error
    assert [c.outcome for c in calls] == ["transient", "created"]
    assert "HTTP 503" in calls[0].error
    paths = [path for path, _, _ in log.requests]
    assert paths == ["/api/erp/purchase_order"] * 3
    for _, headers, _ in log.requests:
        assert headers["Authorization"] == "Bearer s3cret"
        assert headers["Content-Type"] == "application/json"
    keys = [headers["Idempotency-Key"] for _, headers, _ in log.requests]
    assert keys == ["po-6:erp", "po-6:erp", "po-7:erp"]
    assert log.requests[0][2] == body


async def test_a_restart_during_an_outage_hands_the_effect_back_and_counts_on(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    async with connectors(nats_url, unique_prefix, tmp_path, erp={}) as env:
        await env.put("erp", "po-8:erp", "F3")

        async def retried() -> bool:
            return len(await env.store.calls("po-8:erp")) >= 2

        await wait_for(retried, what="retries while ERP is down")
    # Stopped with the effect in hand: it is handed back (-NAK), not left for ack_wait (30 s).
    fake = FakeSystem("erp")
    async with connectors(nats_url, unique_prefix, tmp_path, erp={}) as env:
        await env.start(fake)
        [(_, _, ack)] = await env.wait_acks(1, "the effect after the restart (before ack_wait)")
        calls = await env.store.calls("po-8:erp")
    assert (ack.outcome, ack.attempts) == ("created", len(calls))
    assert [c.attempt for c in calls] == list(range(1, len(calls) + 1))
    assert [c.outcome for c in calls] == ["transient"] * (len(calls) - 1) + ["created"]
    assert [key for _, key, _ in fake.calls] == ["po-8:erp"]


async def test_the_router_service_runs_the_connectors_and_stops_cleanly(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    fake = FakeSystem("erp")
    erp = msgspec.convert({"subject_prefix": f"{unique_prefix}sim", **FAST}, ConnectorConfig)
    off = ConnectorConfig(enabled=False)
    cfg = make_config(unique_prefix, downstream={"billing": off, "erp": erp, "supply": off})
    service = RouterService(cfg, nats_url=nats_url, data_dir=tmp_path)
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        nc = await nats.connect(nats_url)
        try:
            async with await open_store(cfg, tmp_path) as store:  # a second connection (WAL)
                env = Env(cfg, service.subjects, nc, nc.jetstream(), store, tg, nats_url)
                scope = await env.start(fake)
                await env.put("erp", "po-9:erp", "F1")
                [(_, _, ack)] = await env.wait_acks(1)
                calls = await store.main.calls("po-9:erp")
                scope.cancel()
        finally:
            await nc.close()
        service.stop()
    assert (ack.effect_key, ack.outcome) == ("po-9:erp", "created")
    assert [c.outcome for c in calls] == ["created"]


# -- the HTTP status mapping, through httpx's transport seam --------------------------------------


def _mock(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> HttpDownstream:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers=headers)

    cfg = ConnectorConfig(transport="http", url="http://erp.test/v1")
    return HttpDownstream("erp", cfg, transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b'{"outcome": "created", "reference": 42}', Delivery("created", "42")),
        (201, b"", Delivery("created")),
        (200, b'{"outcome": "duplicate", "reference": "PO-1"}', Delivery("duplicate", "PO-1")),
        (409, b'{"outcome": "duplicate", "reference": "PO-1"}', Delivery("duplicate", "PO-1")),
    ],
)
async def test_http_success_statuses(status: int, body: bytes, expected: Delivery) -> None:
    downstream = _mock(status, body)
    try:
        assert await downstream.call("purchase_order", "k", b"{}") == expected
    finally:
        await downstream.aclose()


@pytest.mark.parametrize(
    ("status", "body", "error", "fragment"),
    [
        (409, b'{"error": "conflict"}', PermanentError, "HTTP 409 conflict"),
        (400, b"bad request", PermanentError, "HTTP 400 bad request"),
        (404, b"", PermanentError, "HTTP 404"),
        (408, b"", TransientError, "HTTP 408"),
        (429, b"", TransientError, "HTTP 429"),
        (502, b'{"error": "upstream", "transient": true}', TransientError, "HTTP 502 upstream"),
        (200, b'{"error": "refused", "transient": false}', PermanentError, "refused"),
    ],
)
async def test_http_failure_statuses(
    status: int, body: bytes, error: type[Exception], fragment: str
) -> None:
    downstream = _mock(status, body)
    try:
        with pytest.raises(error, match=fragment):
            await downstream.call("purchase_order", "k", b"{}")
    finally:
        await downstream.aclose()


async def test_http_retry_after_and_connection_errors_are_transient() -> None:
    downstream = _mock(503, headers={"Retry-After": "7"})
    with pytest.raises(TransientError) as info:
        await downstream.call("charge", "k", b"{}")
    assert info.value.retry_after_s == 7.0
    await downstream.aclose()

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    cfg = ConnectorConfig(transport="http", url="http://erp.test")
    downstream = HttpDownstream("erp", cfg, transport=httpx.MockTransport(refuse))
    with pytest.raises(TransientError, match="connection refused"):
        await downstream.call("charge", "k", b"{}")
    await downstream.aclose()


def test_http_needs_a_url() -> None:
    with pytest.raises(ConnectorSetupError, match=r"downstream\.billing\.url"):
        HttpDownstream("billing", ConnectorConfig(transport="http"))


# -- wire schemas and the public surface --------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        DownstreamAck(
            effect_key="k", system="erp", operation="purchase_order", outcome="failed",
            error="gave up", attempts=4,
        ),
        DownstreamReply(outcome="created", system="erp", reference="PO-7", attempts=2),
        DownstreamReply(error="down", transient=True),
    ],
)  # fmt: skip
def test_wire_structs_round_trip_in_json_and_msgpack(value: object) -> None:
    kind = type(value)
    assert msgspec.json.decode(msgspec.json.encode(value), type=kind) == value
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=kind) == value


def test_wire_structs_ignore_unknown_fields() -> None:
    reply = msgspec.json.decode(b'{"outcome": "created", "new_field": [1]}', type=DownstreamReply)
    assert reply.outcome == "created"


def test_ack_ids_fit_the_envelope_limit() -> None:
    assert ack_id("po-1:erp") == "ack:po-1:erp"
    long = ack_id("x" * 300)
    assert long.startswith("ack:sha256:")
    assert len(long) <= 256
    assert long == ack_id("x" * 300)


def test_public_surface_is_pinned() -> None:
    assert set(caresync.connectors.__all__) == {
        "ACK_COMMAND", "IDEMPOTENCY_HEADER", "SYSTEMS", "ConnectorError", "ConnectorSetupError",
        "ConnectorStats", "ConnectorWorker", "Delivery", "Downstream", "DownstreamAck",
        "DownstreamReply", "HttpDownstream", "NatsDownstream", "PermanentError",
        "TransientError", "ack_id", "make_downstream", "owner_kind", "run_connectors",
    }  # fmt: skip
    for name in caresync.connectors.__all__:
        assert getattr(caresync.connectors, name) is not None
