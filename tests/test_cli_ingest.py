"""HL7 v2 and FHIR as a user feeds them: ``caresync publish --format hl7|fhir``, ``caresync
status appointment`` with the qualified or the bare filler id, ``caresync dlq list --json``,
and ``caresync mllp`` answered by a real TCP client."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import CARESYNC, run, start_up

import caresync.config

MESSAGE = (
    "MSH|^~\\&|SCHED|GENHOSP|CARESYNC|GENHOSP|{msh7}-0500||SIU^{event}^SIU_S12|{control}|P|2.5.1\r"
    "SCH||{filler}^GENHOSP|||||||120|min\r"
    "PID|1||MRN-1001^^^GENHOSP^MR||DOE^JANE\r"
    "PV1|1|O|MAIN-OR^OR-3^^MAIN-OR||||||||||||||||V-5501\r"
    "RGS|1\r"
    "AIS|1|A|27447^Total knee^CPT|20261202073000-0500|||120|min\r"
    "AIL|1|A|MAIN-OR^OR-3^^MAIN-OR\r"
    "AIP|1|A|DR-PATEL^Patel^Raj\r"
)


def siu(event: str, control: str, filler: str, msh7: str = "20261124081500") -> str:
    return MESSAGE.format(event=event, control=control, filler=filler, msh7=msh7)


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Path]:
    """A running ``caresync up`` with the demo reference data; yields its data dir."""
    data = tmp_path / "data"
    up = start_up(data, tmp_path / "up.log")
    try:
        assert up.stdout is not None
        assert "router ready" in up.stdout.readline()
        demo = Path(caresync.config.__file__).parent / "demo"
        loaded = run("refdata", "load", str(demo), "--data-dir", str(data))
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        yield data
    finally:
        up.terminate()
        up.wait(timeout=30)
        assert up.stdout is not None
        up.stdout.close()


def test_publish_hl7_and_fhir_files_then_status_and_dead_letters(
    router: Path, tmp_path: Path
) -> None:
    data = str(router)
    # One file, LF separators, three messages: a booking, its resend under a new control id,
    # and one without a filler id.
    hl7 = tmp_path / "feed.hl7"
    hl7.write_bytes(
        "\n".join(
            [
                siu("S12", "C-1", "A100").replace("\r", "\n"),
                siu("S12", "C-1-AGAIN", "A100").replace("\r", "\n"),
                siu("S12", "C-2", "").replace("\r", "\n"),
            ]
        ).encode()
    )
    published = run("publish", "--data-dir", data, "--format", "hl7", str(hl7), "--json")
    assert published.returncode == 1, published.stdout + published.stderr
    lines = [json.loads(line) for line in published.stdout.splitlines()]
    assert [(x["index"], x["verdict"], x["kind"], x["entity"]) for x in lines] == [
        (0, "accepted", "appointment.book", "GENHOSP:A100"),
        (1, "duplicate", "appointment.book", "GENHOSP:A100"),
        (2, "rejected", "appointment.book", ""),
    ]
    assert all(x["file"] == str(hl7) for x in lines)
    assert "SCH-2" in lines[2]["reason"]

    for asked in ("GENHOSP:A100", "A100"):
        status = run("status", "appointment", asked, "--data-dir", data, "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        view = json.loads(status.stdout)
        assert view["id"] == "GENHOSP:A100"
        assert view["status"] == "booked"

    fhir = tmp_path / "appointment.json"
    fhir.write_text(
        json.dumps(
            {
                "resourceType": "Appointment",
                "id": "f-1",
                "status": "booked",
                "serviceType": [{"coding": [{"code": "27447"}]}],
                "start": "2026-12-04T07:30:00-05:00",
                "end": "2026-12-04T09:30:00-05:00",
                "participant": [{"actor": {"reference": "Location/MAIN-OR"}}],
            }
        )
    )
    published = run("publish", "--data-dir", data, "--format", "fhir", str(fhir))
    assert published.returncode == 0, published.stdout + published.stderr
    assert "accepted appointment.sync Appointment/f-1" in published.stdout

    letters = run("dlq", "list", "--data-dir", data, "--json")
    assert letters.returncode == 0, letters.stderr
    found = [json.loads(line) for line in letters.stdout.splitlines()]
    assert len(found) == 1
    assert found[0]["code"] == "missing_id"
    assert found[0]["format"] == "hl7"
    assert found[0]["raw"].startswith("MSH|")
    assert "C-2" in found[0]["raw"]
    assert "SCH-2" in found[0]["reason"]


def test_mllp_command_acknowledges_over_tcp(router: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARESYNC_")}
    mllp = subprocess.Popen(
        [CARESYNC, "mllp", "--port", "0", "--data-dir", str(router)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert mllp.stdout is not None
        line = mllp.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=30) as sock:
            frames = [siu("S12", "K-1", "K1"), siu("S12", "K-2", "")]
            sock.sendall(b"".join(b"\x0b" + f.encode() + b"\x1c\r" for f in frames))
            received = b""
            while received.count(b"\x1c\r") < 2:
                chunk = sock.recv(65536)
                assert chunk, "connection closed before both ACKs"
                received += chunk
        acks = [f.strip(b"\x0b") for f in received.split(b"\x1c\r") if f.strip()]
        msa = [next(s for s in a.split(b"\r") if s.startswith(b"MSA|")) for a in acks]
        assert msa[0].startswith(b"MSA|AA|K-1")
        assert msa[1].startswith(b"MSA|AR|K-2")
        assert b"SCH-2" in acks[1]
    finally:
        mllp.terminate()
        _, _errors = mllp.communicate(timeout=10)
    assert mllp.returncode == 0
