"""Events to Kafka records and back: headers, keys, deterministic ids and every DecodeError reason."""

from __future__ import annotations

import io
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import to_parsing_canonical_form
from pydantic import Field

from choreo import DecodeError, Event, Header, SchemaError
from choreo.transport import OutgoingRecord, Record
from choreo.wire import Wire, derive_event_id, new_event_id

ORDER_SCHEMA: dict[str, Any] = {
    "type": "record", "name": "OrderPlaced", "namespace": "checkout", "version": 1,
    "fields": [{"name": "order_id", "type": "string"}, {"name": "quantity", "type": "int"}],
}
REFUND_SCHEMA: dict[str, Any] = {
    "type": "record", "name": "RefundIssued", "namespace": "checkout", "version": 1,
    "fields": [{"name": "order_id", "type": "string"}, {"name": "quantity", "type": "int"}],
}


@pytest.fixture
def order_avsc(tmp_path: Path) -> Path:
    path = tmp_path / "order_placed.v1.avsc"
    path.write_text(json.dumps(ORDER_SCHEMA))
    return path


@pytest.fixture
def order_placed(order_avsc: Path) -> type[Event]:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int

    return OrderPlaced


@pytest.fixture
def refund_issued(tmp_path: Path) -> type[Event]:
    path = tmp_path / "refund_issued.v1.avsc"
    path.write_text(json.dumps(REFUND_SCHEMA))

    class RefundIssued(Event, schema=path):
        order_id: str
        quantity: int

    return RefundIssued


@pytest.fixture
def wire(order_placed: type[Event]) -> Wire:
    return Wire("checkout-web", [order_placed])


def received(out: OutgoingRecord, *, partition: int = 2, offset: int = 7) -> Record:
    """``out`` as a consumer would read it back."""
    return Record(out.topic, partition, offset, out.key, out.value, list(out.headers))


def encode(wire: Wire, event: Event, **kwargs: Any) -> OutgoingRecord:
    args: dict[str, Any] = {"event_id": "evt-1", "correlation_id": "saga-1", "causation_id": None}
    args.update(kwargs)
    return wire.encode(event, **args)


def replace_header(record: Record, name: str, value: bytes | None) -> Record:
    record.headers = [(n, value if n == name else v) for n, v in record.headers]
    return record


# --- round trip ----------------------------------------------------------------------------------


def test_round_trip_gives_back_the_event_and_its_envelope(wire: Wire, order_placed: type[Event]) -> None:
    event = order_placed(order_id="o-1", quantity=3)
    out = encode(wire, event, causation_id="evt-0", occurred_at="2026-01-02T03:04:05.678+00:00")

    envelope, decoded = wire.decode(received(out), order_placed)

    assert decoded == event
    assert type(decoded) is order_placed
    assert envelope.event_id == "evt-1"
    assert envelope.event_type == "checkout.OrderPlaced"
    assert envelope.correlation_id == "saga-1"
    assert envelope.causation_id == "evt-0"
    assert envelope.occurred_at == "2026-01-02T03:04:05.678+00:00"
    assert envelope.producer == "checkout-web"
    assert envelope.fingerprint == order_placed.avro_schema().fingerprint
    assert envelope.attempt == 1
    assert (envelope.topic, envelope.partition, envelope.offset) == (out.topic, 2, 7)
    assert envelope.key == b"saga-1"


def test_encode_writes_every_required_header(wire: Wire, order_placed: type[Event]) -> None:
    out = encode(wire, order_placed(order_id="o-1", quantity=3))
    names = [name for name, _ in out.headers]
    assert set(Header.REQUIRED) <= set(names)
    assert len(names) == len(set(names))
    assert all(isinstance(value, bytes) and value for _, value in out.headers)


def test_encode_writes_the_causation_id_only_when_there_is_one(wire: Wire, order_placed: type[Event]) -> None:
    event = order_placed(order_id="o-1", quantity=3)
    without = dict(encode(wire, event, causation_id=None).headers)
    with_cause = dict(encode(wire, event, causation_id="evt-0").headers)
    assert Header.CAUSATION_ID not in without
    assert with_cause[Header.CAUSATION_ID] == b"evt-0"
    assert wire.decode(received(encode(wire, event)), order_placed)[0].causation_id is None


def test_schema_header_is_the_writer_fingerprint_in_hex(wire: Wire, order_placed: type[Event]) -> None:
    out = encode(wire, order_placed(order_id="o-1", quantity=3))
    fingerprint = order_placed.avro_schema().fingerprint
    assert dict(out.headers)[Header.SCHEMA] == f"{fingerprint:016x}".encode()
    assert int.from_bytes(out.value[2:10], "little") == fingerprint


def test_occurred_at_defaults_to_now_in_utc_with_milliseconds(wire: Wire, order_placed: type[Event]) -> None:
    out = encode(wire, order_placed(order_id="o-1", quantity=3))
    envelope, _ = wire.decode(received(out), order_placed)
    assert envelope.occurred_at_datetime().utcoffset() == timedelta(0)
    assert len(envelope.occurred_at.split(".")[1]) == len("345+00:00")


def test_key_defaults_to_the_correlation_id(wire: Wire, order_placed: type[Event]) -> None:
    out = encode(wire, order_placed(order_id="o-1", quantity=3), correlation_id="saga-9")
    assert out.key == b"saga-9"


def test_an_explicit_key_wins_over_the_correlation_id(wire: Wire, order_placed: type[Event]) -> None:
    out = encode(wire, order_placed(order_id="o-1", quantity=3), key="customer-4")
    assert out.key == b"customer-4"


def test_topic_is_the_event_topic_with_the_prefix(order_placed: type[Event]) -> None:
    wire = Wire("web", [order_placed], topic_prefix="staging.")
    out = encode(wire, order_placed(order_id="o-1", quantity=3))
    assert out.topic == "staging.checkout.order-placed.v1"


def test_attempt_header_is_read_into_the_envelope(wire: Wire, order_placed: type[Event]) -> None:
    record = received(encode(wire, order_placed(order_id="o-1", quantity=3)))
    record.headers.append((Header.ATTEMPT, b"3"))
    assert wire.decode(record, order_placed)[0].attempt == 3


def test_event_types_not_declared_up_front_are_added_on_first_use(
    order_placed: type[Event], refund_issued: type[Event]
) -> None:
    wire = Wire("web", [order_placed])
    out = encode(wire, refund_issued(order_id="o-1", quantity=1))
    assert wire.decode(received(out), refund_issued)[1] == refund_issued(order_id="o-1", quantity=1)


# --- any Avro library can read the value ---------------------------------------------------------

_CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO, straight from the Avro specification (independent of choreo and fastavro)."""
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    fp = _CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def test_crc64_helper_matches_the_spec_vector() -> None:
    assert _crc64_avro(b'"null"') == 0x63DD24E7CC258F8A


def test_value_is_avro_single_object_encoding_readable_by_plain_fastavro(
    wire: Wire, order_placed: type[Event], order_avsc: Path
) -> None:
    out = encode(wire, order_placed(order_id="o-1", quantity=3))
    schema = json.loads(order_avsc.read_text())

    assert out.value[:2] == b"\xc3\x01"
    canonical = to_parsing_canonical_form(schema).encode()
    assert out.value[2:10] == _crc64_avro(canonical).to_bytes(8, "little")
    body = io.BytesIO(out.value[10:])
    assert fastavro.schemaless_reader(body, fastavro.parse_schema(schema)) == {"order_id": "o-1", "quantity": 3}
    assert body.read() == b""


# --- event ids -----------------------------------------------------------------------------------


def test_derive_event_id_is_deterministic() -> None:
    assert derive_event_id("evt-1", "reserve", 0) == derive_event_id("evt-1", "reserve", 0)


@pytest.mark.parametrize(("source", "handler", "index"), [("evt-2", "reserve", 0), ("evt-1", "notify", 0),
                                                           ("evt-1", "reserve", 1)])
def test_derive_event_id_differs_when_any_input_differs(source: str, handler: str, index: int) -> None:
    assert derive_event_id(source, handler, index) != derive_event_id("evt-1", "reserve", 0)


def test_derived_event_ids_never_change_between_releases() -> None:
    # A re-run after an upgrade must emit the ids the first run emitted, or downstream services
    # would not recognise the copies: these values are part of the wire format.
    assert derive_event_id("evt-1", "reserve", 0) == "0ef091ba-ef76-830e-82fa-33629af58a54"
    assert derive_event_id("evt-1", "reserve", 1) == "f353f3ce-e0c2-8dd3-af9f-6b34a6346355"


def test_derived_event_id_is_a_version_8_rfc_uuid() -> None:
    value = derive_event_id("evt-1", "reserve", 0)
    parsed = uuid.UUID(value)
    assert str(parsed) == value
    assert parsed.version == 8
    assert parsed.variant == uuid.RFC_4122


def test_new_event_ids_are_unique_uuids() -> None:
    first, second = new_event_id(), new_event_id()
    assert first != second
    assert uuid.UUID(first).version == 4


# --- decode errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", Header.REQUIRED)
def test_a_missing_required_header_is_named(wire: Wire, order_placed: type[Event], missing: str) -> None:
    record = received(encode(wire, order_placed(order_id="o-1", quantity=3)))
    record.headers = [(n, v) for n, v in record.headers if n != missing]
    with pytest.raises(DecodeError, match=missing) as info:
        wire.decode(record, order_placed)
    assert info.value.reason == "missing-header"


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (Header.SCHEMA, b"not-hex"),
        (Header.EVENT_ID, b""),
        (Header.EVENT_ID, None),
        (Header.CORRELATION_ID, b"\xff\xfe"),
        (Header.PRODUCER, b""),
    ],
)
def test_a_malformed_header_is_bad_header(
    wire: Wire, order_placed: type[Event], header: str, value: bytes | None
) -> None:
    record = replace_header(received(encode(wire, order_placed(order_id="o-1", quantity=3))), header, value)
    with pytest.raises(DecodeError) as info:
        wire.decode(record, order_placed)
    assert info.value.reason == "bad-header"


def test_a_non_numeric_attempt_header_is_bad_header(wire: Wire, order_placed: type[Event]) -> None:
    record = received(encode(wire, order_placed(order_id="o-1", quantity=3)))
    record.headers.append((Header.ATTEMPT, b"twice"))
    with pytest.raises(DecodeError) as info:
        wire.decode(record, order_placed)
    assert info.value.reason == "bad-header"


def test_another_event_type_on_the_topic_is_wrong_type(
    wire: Wire, order_placed: type[Event], refund_issued: type[Event]
) -> None:
    record = received(encode(wire, refund_issued(order_id="o-1", quantity=3)))
    with pytest.raises(DecodeError, match="checkout.RefundIssued") as info:
        wire.decode(record, order_placed)
    assert info.value.reason == "wrong-type"


def test_a_value_of_another_type_under_a_matching_header_is_wrong_type(
    wire: Wire, order_placed: type[Event], refund_issued: type[Event]
) -> None:
    refund = encode(wire, refund_issued(order_id="o-1", quantity=3))
    record = received(encode(wire, order_placed(order_id="o-1", quantity=3)))
    record.value = refund.value
    with pytest.raises(DecodeError) as info:
        wire.decode(record, order_placed)
    assert info.value.reason == "wrong-type"


@pytest.mark.parametrize("value", [b"", b"garbage bytes", b"\xc3\x01\x00", b"{\"order_id\": \"o-1\"}"])
def test_bytes_that_are_not_single_object_avro_are_not_avro(
    wire: Wire, order_placed: type[Event], value: bytes
) -> None:
    record = received(encode(wire, order_placed(order_id="o-1", quantity=3)))
    record.value = value
    with pytest.raises(DecodeError) as info:
        wire.decode(record, order_placed)
    assert info.value.reason == "not-avro"


def test_a_truncated_avro_body_is_not_avro(wire: Wire, order_placed: type[Event]) -> None:
    record = received(encode(wire, order_placed(order_id="o-1", quantity=3)))
    assert record.value is not None
    record.value = record.value[:-1]
    with pytest.raises(DecodeError) as info:
        wire.decode(record, order_placed)
    assert info.value.reason == "not-avro"


def test_trailing_bytes_after_the_body_are_not_avro(wire: Wire, order_placed: type[Event]) -> None:
    record = received(encode(wire, order_placed(order_id="o-1", quantity=3)))
    assert record.value is not None
    record.value += b"\x00"
    with pytest.raises(DecodeError) as info:
        wire.decode(record, order_placed)
    assert info.value.reason == "not-avro"


def test_an_unknown_writer_fingerprint_is_unknown_schema(wire: Wire, order_placed: type[Event]) -> None:
    record = received(encode(wire, order_placed(order_id="o-1", quantity=3)))
    assert record.value is not None
    record.value = record.value[:2] + b"\x01" * 8 + record.value[10:]
    with pytest.raises(DecodeError) as info:
        wire.decode(record, order_placed)
    assert info.value.reason == "unknown-schema"


def test_a_record_without_a_value_is_a_decode_error(wire: Wire, order_placed: type[Event]) -> None:
    record = received(encode(wire, order_placed(order_id="o-1", quantity=3)))
    record.value = None
    with pytest.raises(DecodeError) as info:
        wire.decode(record, order_placed)
    assert info.value.reason == "not-avro"


def test_a_value_failing_the_model_constraints_is_invalid(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int = Field(gt=0)

    wire = Wire("web", [OrderPlaced])
    # Another producer, with a laxer model of the same schema, wrote quantity=0.
    bad = OrderPlaced.model_construct(order_id="o-1", quantity=0)
    record = received(encode(wire, bad))

    with pytest.raises(DecodeError, match="quantity") as info:
        wire.decode(record, OrderPlaced)
    assert info.value.reason == "invalid"


def test_decode_errors_are_schema_errors_carrying_a_reason() -> None:
    error = DecodeError("boom", reason="not-avro")
    assert isinstance(error, SchemaError)
    assert DecodeError("boom").reason == "decode"
