"""What ``JetStreamTransport.publish`` makes of each PubAck, on the real nats-server: stored,
duplicate (with the first copy's sequence), no stream, no reply in time, refused, and a closed
connection; headers travel with the Msg-Id and the caller's dict is left alone."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import api

from caresync.router.jetstream import JetStreamTransport
from caresync.router.transport import Outbound, PublishStatus
from caresync.store import OutboxRow

pytestmark = pytest.mark.anyio


@pytest.fixture
async def stream(nc: NatsClient, unique_prefix: str) -> AsyncIterator[str]:
    name = f"{unique_prefix}_PUB"
    await nc.jetstream().add_stream(
        api.StreamConfig(name=name, subjects=[f"{unique_prefix}.pub.>"], max_msg_size=4096)
    )
    try:
        yield name
    finally:
        await nc.jetstream().delete_stream(name)


async def test_stored_then_duplicate_with_the_first_sequence(
    nc: NatsClient, stream: str, unique_prefix: str
) -> None:
    transport = JetStreamTransport(nc)
    subject = f"{unique_prefix}.pub.a"
    rows = [OutboxRow(f"k{i}", subject, b"x%d" % i) for i in range(3)]
    first = await transport.publish(rows, 5.0)
    assert [r.status for r in first] == [PublishStatus.STORED] * 3
    assert [r.key for r in first] == ["k0", "k1", "k2"]
    assert {r.stream for r in first} == {stream}
    assert [r.seq for r in first] == [1, 2, 3]
    again = await transport.publish([rows[1], OutboxRow("k3", subject, b"x3")], 5.0)
    assert [(r.status, r.seq) for r in again] == [
        (PublishStatus.DUPLICATE, 2),
        (PublishStatus.STORED, 4),
    ]
    assert transport.in_flight == 0


async def test_headers_go_with_the_msg_id_and_the_callers_dict_is_untouched(
    nc: NatsClient, stream: str, unique_prefix: str
) -> None:
    transport = JetStreamTransport(nc)
    headers = {"Caresync-Reason": "line one\r\nline two"}
    [result] = await transport.publish(
        [Outbound("key-h", f"{unique_prefix}.pub.h", b"{}", headers)], 5.0
    )
    assert result.status is PublishStatus.STORED
    assert headers == {"Caresync-Reason": "line one\r\nline two"}
    stored = await nc.jetstream().get_msg(stream, result.seq)
    assert stored.headers is not None
    assert stored.headers["Nats-Msg-Id"] == "key-h"
    assert stored.headers["Caresync-Reason"] == "line one  line two"


async def test_a_subject_no_stream_stores_is_retried(nc: NatsClient, unique_prefix: str) -> None:
    transport = JetStreamTransport(nc)
    [result] = await transport.publish([Outbound("k", f"{unique_prefix}.nowhere", b"")], 5.0)
    assert result.status is PublishStatus.RETRY
    assert "no response" in result.error


async def test_no_pubAck_in_time_is_retried_and_forgotten(
    nc: NatsClient, unique_prefix: str
) -> None:
    subject = f"{unique_prefix}.silent"
    # A plain subscriber takes the message and never answers: no PubAck ever comes.
    silent = await nc.subscribe(subject)
    transport = JetStreamTransport(nc)
    results = await transport.publish([Outbound(f"k{i}", subject, b"") for i in range(2)], 0.3)
    assert [(r.status, r.error) for r in results] == [
        (PublishStatus.RETRY, "no PubAck in time")
    ] * 2
    assert transport.in_flight == 0
    await silent.unsubscribe()


async def test_a_message_the_stream_refuses_fails_for_good(
    nc: NatsClient, stream: str, unique_prefix: str
) -> None:
    transport = JetStreamTransport(nc)
    subject = f"{unique_prefix}.pub.big"
    results = await transport.publish(
        [Outbound("big", subject, b"x" * 8192), Outbound("small", subject, b"x")], 5.0
    )
    assert results[0].status is PublishStatus.FAILED
    assert "size" in results[0].error.lower()
    assert "code 400" in results[0].error
    assert results[1].status is PublishStatus.STORED


@pytest.mark.parametrize("published_before", [False, True])
async def test_a_closed_connection_is_retried_not_raised(
    nats_url: str, stream: str, unique_prefix: str, published_before: bool
) -> None:
    """Closed before the first publish (its reply inbox cannot be subscribed) or after one."""
    client = await nats.connect(nats_url)
    transport = JetStreamTransport(client)
    subject = f"{unique_prefix}.pub.c"
    if published_before:
        [first] = await transport.publish([Outbound("k0", subject, b"")], 5.0)
        assert first.status is PublishStatus.STORED
    await client.close()
    results = await transport.publish([Outbound(f"k{i}", subject, b"") for i in (1, 2)], 1.0)
    assert [r.status for r in results] == [PublishStatus.RETRY] * 2
    assert transport.in_flight == 0


async def test_an_empty_list_publishes_nothing(nc: NatsClient) -> None:
    assert await JetStreamTransport(nc).publish([], 0.1) == []


async def test_a_payload_over_the_servers_limit_or_a_bad_subject_fails_alone(
    nc: NatsClient, stream: str, unique_prefix: str
) -> None:
    transport = JetStreamTransport(nc)
    subject = f"{unique_prefix}.pub.limits"
    results = await transport.publish(
        [
            Outbound("huge", subject, b"x" * (nc.max_payload + 1)),
            Outbound("spaced", f"{unique_prefix}.pub.a b", b"x"),
            Outbound("crlf", f"{unique_prefix}.pub.a\r\nPUB x 1", b"x"),
            Outbound("fine", subject, b"x"),
        ],
        5.0,
    )
    assert [r.status for r in results] == [PublishStatus.FAILED] * 3 + [PublishStatus.STORED]
    assert transport.in_flight == 0
    info = await nc.jetstream().stream_info(stream)
    assert info.state.messages == 1


async def test_hostile_keys_and_header_names_cannot_break_the_protocol(
    nc: NatsClient, stream: str, unique_prefix: str
) -> None:
    transport = JetStreamTransport(nc)
    subject = f"{unique_prefix}.pub.hostile"
    headers = {"Bad Name": "dropped", "X-Ok": "kept\r\nInjected: yes", "": "empty"}
    results = await transport.publish(
        [Outbound("key\r\nInjected: yes", subject, b"\r\nPUB x 1\r\n", headers)], 5.0
    )
    assert [r.status for r in results] == [PublishStatus.STORED]
    stored = await nc.jetstream().get_msg(stream, results[0].seq)
    assert stored.data == b"\r\nPUB x 1\r\n"
    assert stored.headers == {"Nats-Msg-Id": "key  Injected: yes", "X-Ok": "kept  Injected: yes"}
