"""The FHIR codec over the public R4 sample corpus (``shared/samples/fhir``): every file has an
expected outcome, commands or a rejection with its code and reason."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from caresync.codecs.fhir import decode_fhir, resource_kind
from caresync.codecs.scheduling import BookAppointment, ChargeLine, ProcedureRef, VisitCharges
from caresync.codecs.source import SourceError

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples" / "fhir"
if not SAMPLES.is_dir():
    pytest.skip(f"no FHIR sample corpus at {SAMPLES}", allow_module_level=True)

NOT_ROUTED = "is not routed: caresync maps Appointment, ChargeItem"

Mapped = list[tuple[str, str]]
Rejected = tuple[str, str]
"""(code, a substring of the reason)."""

EXPECTED: dict[str, Mapped | Rejected] = {
    "r4__Appointment-example.json": [("appointment.sync", "Appointment/example")],
    # A phone call between two doctors: no Location participant, and caresync does not guess.
    "r4__Appointment-2docs.json": ("bad_value", "$.participant: no Location participant"),
    "r4__Appointment-examplereq.json": ("unsupported_status", "$.status: Appointment status"),
    "r4__AppointmentResponse-exampleresp.json": (
        "unsupported_resource",
        f"resourceType 'AppointmentResponse' {NOT_ROUTED}",
    ),
    "r4__ChargeItem-example.json": [("visit.post_charges", "example")],
    "r4__SupplyDelivery-simpledelivery.json": ("missing_id", "$.destination: no Location"),
    "r4__SupplyDelivery-pumpdelivery.json": ("unsupported_status", "'in-progress' is not routed"),
    "r4__SupplyRequest-simpleorder.json": ("missing_id", "$.deliverTo: no Location reference"),
    "r4__Slot-example.json": ("unsupported_resource", f"resourceType 'Slot' {NOT_ROUTED}"),
    "r4__Slot-1.json": ("unsupported_resource", f"resourceType 'Slot' {NOT_ROUTED}"),
    "r4__Slot-2.json": ("unsupported_resource", f"resourceType 'Slot' {NOT_ROUTED}"),
    "r4__Slot-3.json": ("unsupported_resource", f"resourceType 'Slot' {NOT_ROUTED}"),
    "r4__Schedule-example.json": ("unsupported_resource", f"'Schedule' {NOT_ROUTED}"),
    "r4__Schedule-exampleloc1.json": ("unsupported_resource", f"'Schedule' {NOT_ROUTED}"),
    "r4__Claim-100150.json": ("unsupported_resource", f"'Claim' {NOT_ROUTED}"),
    "r4__Claim-960150.json": ("unsupported_resource", f"'Claim' {NOT_ROUTED}"),
    "r4__ClaimResponse-R3500.json": ("unsupported_resource", f"'ClaimResponse' {NOT_ROUTED}"),
    "r4__Encounter-example.json": ("unsupported_resource", f"'Encounter' {NOT_ROUTED}"),
    "r4__Location-1.json": ("unsupported_resource", f"'Location' {NOT_ROUTED}"),
    "r4__Practitioner-example.json": ("unsupported_resource", f"'Practitioner' {NOT_ROUTED}"),
    "r4__Coverage-9876B1.json": ("unsupported_resource", f"'Coverage' {NOT_ROUTED}"),
    "r4__Account-example.json": ("unsupported_resource", f"'Account' {NOT_ROUTED}"),
    "r4__Bundle-bundle-transaction.json": (
        "unsupported_resource",
        "$.entry: no routed resource in the Bundle (resource types: 'Patient', 'Parameters')",
    ),
}


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def test_every_sample_has_an_expectation() -> None:
    on_disk = {p.name for p in SAMPLES.iterdir() if p.is_file()}
    assert on_disk == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample(name: str) -> None:
    expected = EXPECTED[name]
    raw = sample(name)
    if isinstance(expected, list):
        commands = decode_fhir(raw)
        assert [(c.kind, c.entity) for c in commands] == expected
        assert all(c.source == "fhir" and c.id.startswith("fhir:") for c in commands)
        assert resource_kind(raw) == expected[0][0]
    else:
        code, reason = expected
        with pytest.raises(SourceError) as caught:
            decode_fhir(raw)
        assert caught.value.code == code
        assert reason in caught.value.reason


def test_appointment_example_payload() -> None:
    [command] = decode_fhir(sample("r4__Appointment-example.json"))
    assert command.payload == BookAppointment(
        procedures=(ProcedureRef(code="52", provider_id="example"),),
        facility_id="1",
        start=command.payload.start,
        duration_min=120,
        providers=("example",),
        patient_id="example",
    )
    assert command.payload.start.isoformat() == "2013-12-10T09:00:00+00:00"
    assert command.occurred_at is None  # no meta.lastUpdated: the time it entered the log


def test_charge_item_example_payload() -> None:
    [command] = decode_fhir(sample("r4__ChargeItem-example.json"))
    assert command.payload == VisitCharges(
        lines=(ChargeLine(line_id="654321", code="01510", quantity=1, amount="40", currency="EUR"),)
    )


def test_sample_rejections_name_kind_and_entity_when_known() -> None:
    with pytest.raises(SourceError) as caught:
        decode_fhir(sample("r4__Appointment-2docs.json"))
    assert (caught.value.kind, caught.value.entity) == ("appointment.sync", "Appointment/2docs")
    with pytest.raises(SourceError) as caught:
        decode_fhir(sample("r4__SupplyRequest-simpleorder.json"))
    assert caught.value.kind == "item.request"
    assert resource_kind(sample("r4__SupplyRequest-simpleorder.json")) == "item.request"
    assert resource_kind(sample("r4__Slot-1.json")) == ""


def load(name: str) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(sample(name))
    return value


def test_transaction_bundle_of_samples_maps_every_routed_entry_in_order() -> None:
    bundle = load("r4__Bundle-bundle-transaction.json")
    appointment = load("r4__Appointment-example.json")
    charge = load("r4__ChargeItem-example.json")
    patient = bundle["entry"][0]
    bundle["entry"] = [
        patient,
        {"resource": appointment, "request": {"method": "PUT", "url": "Appointment/example"}},
        {"resource": charge, "request": {"method": "POST", "url": "ChargeItem"}},
        {"request": {"method": "DELETE", "url": "Patient/234"}},
    ]
    commands = decode_fhir(orjson.dumps(bundle))
    assert [(c.kind, c.entity) for c in commands] == [
        ("appointment.sync", "Appointment/example"),
        ("visit.post_charges", "example"),
    ]
    # Each entry's id is the id of the same resource sent alone; the Bundle's lastUpdated
    # stands in for the entries' own.
    alone = [decode_fhir(orjson.dumps(r))[0].id for r in (appointment, charge)]
    assert [c.id for c in commands] == alone
    assert {c.occurred_at.isoformat() for c in commands if c.occurred_at} == {
        "2014-08-18T01:43:30+00:00"
    }
    assert commands[1].payload.lines[0].amount == str(Decimal(40))
