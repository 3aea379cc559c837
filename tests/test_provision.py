"""Stream provisioning on the real nats-server: idempotent, updates on config change, and a
change JetStream cannot make in place is an error that names the stream and the setting."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from harness import make_config
from nats.js import JetStreamContext

from caresync.router.errors import ProvisioningError
from caresync.router.provision import provision
from caresync.router.service import subjects_for
from caresync.router.snapshots import bucket_name, provision_bucket

pytestmark = pytest.mark.anyio


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def test_provisioning_is_idempotent_and_follows_config_changes(
    js: JetStreamContext, unique_prefix: str
) -> None:
    cfg = make_config(unique_prefix)
    subjects = subjects_for(cfg)
    created = await provision(js, subjects, cfg.streams)
    assert sorted(created) == sorted(
        [
            *(
                f"created stream {name}"
                for name in (
                    subjects.input_stream(0),
                    subjects.local_stream,
                    subjects.output_stream,
                    subjects.raw_stream,
                    subjects.dead_letter_stream,
                    subjects.refdata_stream,
                )
            ),
            f"created object store {bucket_name(subjects)}",
        ]
    )
    assert await provision(js, subjects, cfg.streams) == []

    changed = make_config(unique_prefix, streams={"duplicate_window_s": 30.0, "max_age_s": 86400.0})
    updates = await provision(js, subjects, changed.streams)
    assert len(updates) == 6
    assert all("duplicate_window" in line and "max_age" in line for line in updates)
    info = await js.stream_info(subjects.input_stream(0))
    assert info.config.duplicate_window == pytest.approx(30.0)
    assert info.config.subjects == [f"{unique_prefix}.in.>", f"{unique_prefix}.int.>"]
    assert await provision(js, subjects, changed.streams) == []


async def test_a_storage_change_is_refused_naming_the_stream(
    js: JetStreamContext, unique_prefix: str
) -> None:
    cfg = make_config(unique_prefix)
    await provision(js, subjects_for(cfg), cfg.streams)
    memory = make_config(unique_prefix, streams={"storage": "memory"})
    with pytest.raises(ProvisioningError) as info:
        await provision(js, subjects_for(memory), memory.streams)
    assert f"{unique_prefix.upper()}_IN" in str(info.value)
    assert "streams.storage" in str(info.value)


async def test_a_snapshot_bucket_that_cannot_be_made_does_not_stop_the_router_starting(
    js: JetStreamContext, unique_prefix: str
) -> None:
    cfg = make_config(unique_prefix)
    subjects = subjects_for(cfg)
    # Another stream already takes the bucket's subjects: the object store cannot be made.
    await js.add_stream(name=f"{unique_prefix}_SQUAT", subjects=[f"$O.{bucket_name(subjects)}.>"])
    created = await provision(js, subjects, cfg.streams)
    assert len(created) == 6
    assert all(line.startswith("created stream ") for line in created)
    with pytest.raises(
        ProvisioningError, match=f"cannot create object store {bucket_name(subjects)}"
    ):
        await provision_bucket(js, subjects, cfg.streams)
