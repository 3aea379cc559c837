"""HL7 v2 ingest rate on one core, in-process: decode plus canonical envelope encoding.

Measures how many messages a second ``decode_hl7`` turns into canonical JSON envelopes (each
command's payload encoded with msgspec, then the envelope) for (a) an SIU^S12 booking and
(b) a DFT^P03 with three FT1 lines.  No broker, no I/O: the ceiling of the ingest stage.

The SIU is the public ms__SIU-S12-01 sample when ``/work/shared`` is there, else a synthetic
message of the same shape; the DFT is always synthetic.  Both are built in this module.
"""

from __future__ import annotations

import time
from pathlib import Path

from caresync.codecs.envelope import encode_envelope, make_envelope
from caresync.codecs.hl7v2 import decode_hl7

_SAMPLE = Path(__file__).resolve().parents[2] / "shared/samples/hl7v2/ms__SIU-S12-01.hl7"

_MSH = (
    "MSH|^~\\&|{app}|GHHSFacility^2.16.840.1.122848.1.30^ISO|CARESYNC|MAIN|{ts}||{event}|"
    "{ctrl}|P|2.5.1"
)
_PID = (
    "PID|1||MRN-1001^^^HOSP^MR~123456789^^^USSSA^SS||EVERYMAN^ADAM^A^III^Dr.^MD||19880818|M|||"
    "1000 Hospital Lane^Ste. 123^Ann Arbor^MI^99999^USA^M||^PRN^PH^^^810^4502369|||S||"
    "ACC-55^^^HOSP^AN"
)
_PV1 = "PV1|1|O|MAIN-OR^OR-3^^MAIN^^^BUILDING1^FLOOR2||||||||||||||||V-5501"
_IN1 = "IN1|1|PLAN-1^Blue Advantage HMO|NORTHWIND-HMO^^^&2.16.840.1.113883.1.1&ISO^NIIP"


def siu_message() -> bytes:
    """The SIU^S12 to measure: the public ms__SIU-S12-01 sample if present, else synthetic."""
    return _SAMPLE.read_bytes() if _SAMPLE.is_file() else synthetic_siu()


def synthetic_siu() -> bytes:
    """An SIU^S12 of about 2 KB: one RGS with AIS, AIG, AIL and AIP, notes, patient, visit."""
    lines = [
        _MSH.format(app="SCHApp", ts="20261124081500-0500", event="SIU^S12^SIU_S12", ctrl="C1"),
        "SCH||A1001^HOSP||||RSN^Knee pain|ELECTIVE^Elective|Normal|120|min|"
        "^^120^20261202073000-0500^20261202093000-0500|DR-PATEL^Patel^Raj^^^Dr^MD|"
        "(608)271-9000^^PH|115 MAINSTREET^^GOODTOWN^KY^42010^USA^L||"
        "SCHED-7^Jones^Amy||||||||Booked",
        "TQ1|||||||20261202073000-0500|20261202093000-0500|R",
        "NTE|1||Patient to arrive 90 minutes before the procedure; nothing by mouth after midnight",
        _PID,
        _PV1,
        "PV2|||M17.11^Unilateral primary osteoarthritis, right knee^I10",
        "DG1|1||M17.11^Unilateral primary osteoarthritis, right knee^I10||20261101|A",
        _IN1,
        "RGS|1|A",
        "AIS|1|A|27447^Arthroplasty, knee, condyle and plateau^CPT|20261202073000-0500|||120|"
        "min^Minutes^ISO||Booked",
        "NTE|1||Implant tray and tourniquet required",
        "AIG|1|A|TRAY-77^Knee implant tray^L|EQ^Equipment^L||||20261202073000-0500|||120|min",
        "AIL|1|A|OR^OR-3^^MAIN^^^BUILDING1^FLOOR2|OR^Operating room^HL70305||"
        "20261202073000-0500|||120|min^Minutes^ISO||Booked",
        "AIP|1|A|DR-PATEL^Patel^Raj^^^Dr^MD|SUR^Surgeon^L||20261202073000-0500|||120|"
        "min^Minutes^ISO||Booked",
        "AIP|1|A|DR-ANES^Okafor^Ngozi^^^Dr^MD|ANE^Anesthesiologist^L||20261202073000-0500|||"
        "120|min^Minutes^ISO||Booked",
    ]
    return "\r".join(lines).encode()


def dft_message() -> bytes:
    """A DFT^P03 of about 1.5 KB with three FT1 lines (MO amounts, one unit-priced)."""
    lines = [
        _MSH.format(app="BILLING", ts="20261202120000-0500", event="DFT^P03^DFT_P03", ctrl="D1"),
        "EVN|P03|20261202120000-0500",
        _PID,
        _PV1,
        "FT1|1|TX-1||20261202|20261202|CG|27447^Arthroplasty, knee^CPT|||1|4200.00&USD|"
        "4200.00&USD|ORTHO^Orthopedics^L||||||M17.11^Osteoarthritis knee^I10|DR-PATEL^Patel|||"
        "A1001^HOSP|DR-PATEL^Patel|27447^Arthroplasty, knee^CPT",
        "FT1|2|TX-2||20261202|20261202|CG|CDM-item11^Knee implant^L|||1|2899.50&USD||"
        "ORTHO^Orthopedics^L||||||M17.11^Osteoarthritis knee^I10|DR-PATEL^Patel|||A1001^HOSP",
        "FT1|3|TX-3||20261202|20261202|CG|CDM-item12^Suture kit^L|||4||12.25&USD|"
        "ORTHO^Orthopedics^L||||||M17.11^Osteoarthritis knee^I10|DR-PATEL^Patel|||A1001^HOSP",
        "PR1|1||27447^Arthroplasty, knee^CPT||20261202073000-0500",
        _IN1,
    ]
    return "\r".join(lines).encode()


def _envelopes(message: bytes) -> int:
    size = 0
    for cmd in decode_hl7(message):
        env = make_envelope(
            id=cmd.id,
            kind=cmd.kind,
            entity=cmd.entity,
            payload=cmd.payload,
            occurred_at=cmd.occurred_at,
            source=cmd.source,
        )
        size += len(encode_envelope(env))
    return size


def _rate(message: bytes, seconds: float) -> float:
    _envelopes(message)  # fail fast (and warm up) before timing
    count, started = 0, time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(100):
            _envelopes(message)
        count += 100
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - started)


def run_ingest(seconds: float = 2.0) -> dict[str, float]:
    """Messages a second decoded and encoded as envelopes, SIU and DFT, ``seconds`` each."""
    siu, dft = siu_message(), dft_message()
    return {
        "siu_per_s": _rate(siu, seconds),
        "dft_per_s": _rate(dft, seconds),
        "siu_bytes": float(len(siu)),
        "dft_bytes": float(len(dft)),
        "siu_envelope_bytes": float(_envelopes(siu)),
        "dft_envelope_bytes": float(_envelopes(dft)),
    }
