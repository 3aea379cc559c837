"""Creates and updates the streams (and the snapshot bucket) the router needs, idempotently.

Run at every start: a missing stream is created, one whose managed settings differ from the
configuration is updated, and a setting JetStream cannot change in place (storage type) is
reported as an error that names the stream and the setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import nats.js.errors
import structlog
from nats.js import JetStreamContext, api

from caresync.codecs import Subjects
from caresync.config import StreamsConfig
from caresync.router.errors import ProvisioningError
from caresync.router.snapshots import provision_bucket

log = structlog.get_logger("caresync.provision")


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """The shape caresync wants one stream to have."""

    name: str
    subjects: tuple[str, ...]
    description: str


def stream_specs(subjects: Subjects) -> list[StreamSpec]:
    """Every stream: one input stream per partition, local records, output, raw source
    messages, dead letters, reference data."""
    specs = [
        StreamSpec(
            subjects.input_stream(p),
            tuple(subjects.input_stream_subjects(p)),
            f"caresync inputs and internal fan-out, partition {p}",
        )
        for p in range(subjects.partitions)
    ]
    specs.append(
        StreamSpec(
            subjects.local_stream,
            (f"{subjects.prefix}.loc.>",),
            "caresync records of internal commands applied with their cause, every partition",
        )
    )
    specs.append(
        StreamSpec(
            subjects.output_stream,
            (f"{subjects.prefix}.out.>",),
            "caresync effects for downstream systems",
        )
    )
    specs.append(
        StreamSpec(
            subjects.raw_stream,
            (f"{subjects.prefix}.raw.>",),
            "caresync raw source messages (HL7 v2, FHIR) for the ingest stage",
        )
    )
    specs.append(
        StreamSpec(
            subjects.dead_letter_stream,
            (f"{subjects.prefix}.dlq.>",),
            "caresync dead letters: raw rejected inputs with reasons",
        )
    )
    specs.append(
        StreamSpec(
            subjects.refdata_stream,
            (subjects.refdata_subject,),
            "caresync reference data: one set per load, its sequence is its version",
        )
    )
    return specs


def _config(spec: StreamSpec, cfg: StreamsConfig) -> api.StreamConfig:
    return api.StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE if cfg.storage == "file" else api.StorageType.MEMORY,
        num_replicas=cfg.replicas,
        duplicate_window=cfg.duplicate_window_s,
        max_age=cfg.max_age_s,
    )


def _differences(have: api.StreamConfig, want: api.StreamConfig) -> list[str]:
    diffs = []
    if sorted(have.subjects or []) != sorted(want.subjects or []):
        diffs.append(f"subjects {have.subjects} -> {want.subjects}")
    if (have.num_replicas or 1) != want.num_replicas:
        diffs.append(f"replicas {have.num_replicas} -> {want.num_replicas}")
    if abs((have.duplicate_window or 0) - (want.duplicate_window or 0)) > 1e-6:
        diffs.append(f"duplicate_window {have.duplicate_window} -> {want.duplicate_window}")
    if abs((have.max_age or 0) - (want.max_age or 0)) > 1e-6:
        diffs.append(f"max_age {have.max_age} -> {want.max_age}")
    return diffs


async def provision(js: JetStreamContext, subjects: Subjects, cfg: StreamsConfig) -> list[str]:
    """Make every stream match the configuration; returns what was done, one line each."""
    done: list[str] = []
    for spec in stream_specs(subjects):
        want = _config(spec, cfg)
        try:
            info = await js.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(config=want)
            except nats.js.errors.APIError as exc:
                raise ProvisioningError(f"cannot create stream {spec.name}: {exc}") from exc
            done.append(f"created stream {spec.name}")
            continue
        have = info.config
        if have.storage != want.storage:
            raise ProvisioningError(
                f"stream {spec.name} uses {have.storage} storage but streams.storage is "
                f"{cfg.storage!r}; JetStream cannot change that in place (delete the stream or "
                "change the setting)"
            )
        diffs = _differences(have, want)
        if diffs:
            try:
                await js.update_stream(config=want)
            except nats.js.errors.APIError as exc:
                raise ProvisioningError(
                    f"cannot update stream {spec.name} ({'; '.join(diffs)}): {exc}"
                ) from exc
            done.append(f"updated stream {spec.name}: {'; '.join(diffs)}")
    try:
        bucket = await provision_bucket(js, subjects, cfg)
    except ProvisioningError as exc:
        # Snapshots only speed up a rebuild: the router runs without them (and says so).
        log.warning("snapshots_unavailable", error=str(exc))
        bucket = ""
    if bucket:
        done.append(bucket)
    for line in done:
        log.info("provisioned", change=line)
    return done
