"""Shared fixtures: anyio backend, one session-wide embedded nats-server, a client of it,
unique names."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient

from caresync.router.embedded import EmbeddedNats


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Run every anyio test (and async fixture) on asyncio."""
    return "asyncio"


@pytest.fixture(scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """One real nats-server with JetStream for the whole session; isolate tests by prefix."""
    async with EmbeddedNats(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    """Client URL of the session nats-server."""
    return nats_server.url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    """A client of the session nats-server, closed after the test."""
    client = await nats.connect(nats_url)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def unique_prefix() -> str:
    """A fresh token usable as a subject token and in stream names ([A-Za-z0-9_])."""
    return "t" + secrets.token_hex(5)
