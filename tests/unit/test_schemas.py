from __future__ import annotations

import datetime
import decimal
import enum
import io
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any, Literal

import fastavro
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from choreo import schemas
from choreo.errors import DecodeError, SchemaError
from choreo.schemas import (
    AvroSchema,
    Codec,
    SchemaSet,
    check_compatible,
    check_directory,
    check_model,
    load_schema,
    parse_schema,
)

UTC = datetime.timezone.utc


def record(name: str, fields: list[dict[str, Any]], *, version: int = 1,
           namespace: str = "checkout", **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": namespace, "version": version,
            "fields": fields, **extra}


def write(root: Path, relative: str, schema: dict[str, Any] | str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(schema if isinstance(schema, str) else json.dumps(schema))
    return path


ORDER_V1 = record("OrderPlaced", [
    {"name": "order_id", "type": "string"},
    {"name": "amount_cents", "type": "long"},
])

EVERYTHING = record("Everything", [
    {"name": "n", "type": "null"},
    {"name": "b", "type": "boolean"},
    {"name": "i", "type": "int"},
    {"name": "l", "type": "long"},
    {"name": "f", "type": "float"},
    {"name": "d", "type": "double"},
    {"name": "raw", "type": "bytes"},
    {"name": "s", "type": "string"},
    {"name": "maybe", "type": ["null", "string"], "default": None},
    {"name": "tags", "type": {"type": "array", "items": "string"}},
    {"name": "counts", "type": {"type": "map", "values": "long"}},
    {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID"]}},
    {"name": "currency", "type": {"type": "enum", "name": "Currency", "symbols": ["EUR", "USD"]}},
    {"name": "address", "type": {"type": "record", "name": "Address", "fields": [
        {"name": "city", "type": "string"},
        {"name": "zip", "type": ["null", "string"], "default": None}]}},
    {"name": "billing", "type": ["null", "Address"], "default": None},
    {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
    {"name": "at_ms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "at_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
    {"name": "day", "type": {"type": "int", "logicalType": "date"}},
    {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10,
                               "scale": 2}},
    {"name": "lines", "type": {"type": "array", "items": {"type": "record", "name": "Line",
                                                          "fields": [
        {"name": "sku", "type": "string"}, {"name": "qty", "type": "int"}]}}},
])


class Status(str, enum.Enum):
    NEW = "NEW"
    PAID = "PAID"


class Address(pydantic.BaseModel):
    city: str
    zip: str | None = None


class Line(pydantic.BaseModel):
    sku: str
    qty: int


class Everything(pydantic.BaseModel):
    n: None
    b: bool
    i: int
    l: int  # noqa: E741
    f: float
    d: float
    raw: bytes
    s: str
    maybe: str | None = None
    tags: list[str]
    counts: dict[str, int]
    status: Status
    currency: Literal["EUR", "USD"]
    address: Address
    billing: Address | None = None
    id: uuid.UUID
    at_ms: datetime.datetime
    at_us: datetime.datetime
    day: datetime.date
    price: decimal.Decimal
    lines: list[Line]


VALUE: dict[str, Any] = {
    "n": None, "b": True, "i": -7, "l": 2**40, "f": 0.5, "d": 3.25, "raw": b"\x00\xff",
    "s": "h\u00e9llo", "maybe": None, "tags": ["a", "b"], "counts": {"x": 1, "y": -2},
    "status": "PAID", "currency": "EUR", "address": {"city": "Lyon", "zip": "69001"},
    "billing": {"city": "Paris", "zip": None},
    "id": uuid.UUID("5f0c7a9e-1f7e-4a4e-9c1b-2f3d4e5f6a7b"),
    "at_ms": datetime.datetime(2024, 5, 9, 10, 0, 0, 123000, tzinfo=UTC),
    "at_us": datetime.datetime(2024, 5, 9, 10, 0, 0, 123456, tzinfo=UTC),
    "day": datetime.date(2024, 5, 9), "price": decimal.Decimal("19.99"),
    "lines": [{"sku": "A-1", "qty": 2}],
}


def codec_for(*schemas_: AvroSchema, reader: AvroSchema | None = None) -> Codec:
    return Codec(reader or schemas_[0], SchemaSet(schemas_))


# --- fingerprints and loading -------------------------------------------------------------------

def test_fingerprint_matches_avro_spec_vectors() -> None:
    # share/test/data/schema-tests.txt in apache/avro publishes these as signed 64-bit ints.
    def fp(canonical: str) -> int:
        return int.from_bytes(schemas._fingerprint_le(canonical), "little")

    assert fp('"null"') == 0x63DD24E7CC258F8A == 7195948357588979594
    assert fp('"boolean"') == -6970731678124411036 % 2**64
    schema = parse_schema(record("foo", [{"name": "f1", "type": "boolean"}], namespace=""))
    assert schema.fingerprint == 7843277075252814651
    assert schema.header == b"\xc3\x01" + (7843277075252814651).to_bytes(8, "little")


def test_load_schema(tmp_path: Path) -> None:
    path = write(tmp_path, "schemas/checkout/order_placed.v1.avsc", ORDER_V1)
    schema = load_schema(path)
    assert (schema.full_name, schema.version, schema.path) == ("checkout.OrderPlaced", 1, str(path))
    assert [f["name"] for f in schema.fields] == ["order_id", "amount_cents"]
    assert '"version"' not in schema.canonical
    assert load_schema(write(tmp_path, "order-placed.v1.avsc", ORDER_V1)).version == 1


@pytest.mark.parametrize(("file_name", "content", "needle"), [
    ("order_placed.v1.avsc", "{not json", "invalid JSON"),
    ("order_placed.v1.avsc", json.dumps({"type": "enum", "name": "X", "symbols": ["A"]}),
     "must be an Avro record"),
    ("order_placed.v1.avsc", json.dumps({**ORDER_V1, "version": None}), '"version"'),
    ("order_placed.v1.avsc", json.dumps({**ORDER_V1, "version": "1"}), '"version"'),
    ("order_placed.v2.avsc", json.dumps(ORDER_V1), "does not match the file name"),
    ("order_paid.v1.avsc", json.dumps(ORDER_V1), "record name 'OrderPlaced'"),
    ("order_placed.avsc", json.dumps(ORDER_V1), "<name>.v<N>.avsc"),
    ("order_placed.v1.avsc", json.dumps(record("OrderPlaced", [{"name": "x", "type": "nope"}])),
     "invalid Avro schema"),
])
def test_load_schema_errors_name_the_file(tmp_path: Path, file_name: str, content: str,
                                          needle: str) -> None:
    path = write(tmp_path, file_name, content)
    with pytest.raises(SchemaError) as info:
        load_schema(path)
    assert str(path) in str(info.value) and needle in str(info.value)
    assert info.value.path == str(path)


def test_schema_set(tmp_path: Path) -> None:
    write(tmp_path, "checkout/order_placed.v1.avsc", ORDER_V1)
    write(tmp_path, "checkout/order_placed.v2.avsc", {**ORDER_V1, "version": 2, "fields": [
        {"name": "order_id", "type": "string"}]})
    known = SchemaSet.from_directory(tmp_path)
    assert len(known) == 2
    v1 = known.by_name("checkout.OrderPlaced", 1)
    assert v1 is not None and known.by_fingerprint(v1.fingerprint) is v1
    assert known.by_name("checkout.OrderPlaced") is not None
    assert known.by_name("checkout.OrderPlaced").version == 2  # type: ignore[union-attr]
    assert known.by_name("nope") is None and known.by_fingerprint(1) is None
    assert {s.version for s in known} == {1, 2}
    # an older revision without a file is still decodable by fingerprint
    old = parse_schema(record("OrderPlaced", [{"name": "order_id", "type": "string"},
                                              {"name": "x", "type": "int"}]))
    known.add(old)
    assert known.by_fingerprint(old.fingerprint) is old and len(known) == 3


def test_schema_set_duplicate_names_both_files(tmp_path: Path) -> None:
    a = write(tmp_path, "a/order_placed.v1.avsc", ORDER_V1)
    b = write(tmp_path, "b/order_placed.v1.avsc", {**ORDER_V1, "doc": "copy"})
    with pytest.raises(SchemaError) as info:
        SchemaSet.from_directory(tmp_path)
    assert str(a) in str(info.value) and str(b) in str(info.value)


# --- codec --------------------------------------------------------------------------------------

def test_round_trip_every_supported_type() -> None:
    schema = parse_schema(EVERYTHING)
    codec = codec_for(schema)
    data = codec.encode(VALUE)
    assert data[:10] == schema.header
    assert codec.decode(data) == VALUE
    check_model(Everything, schema)
    model = Everything.model_validate(codec.decode(data))
    assert codec.decode(codec.encode(model.model_dump())) == VALUE


def test_wire_format_is_header_plus_plain_avro_body() -> None:
    schema = parse_schema(EVERYTHING)
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema.parsed, VALUE)
    data = codec_for(schema).encode(VALUE)
    assert data == b"\xc3\x01" + schema.fingerprint.to_bytes(8, "little") + out.getvalue()
    assert fastavro.schemaless_reader(io.BytesIO(data[10:]), schema.parsed, None) == VALUE


def test_encode_errors_name_the_field() -> None:
    codec = codec_for(parse_schema(ORDER_V1))
    with pytest.raises(SchemaError) as info:
        codec.encode({"order_id": "o1", "amount_cents": "12"})
    assert info.value.field == "amount_cents" and "long" in str(info.value)
    with pytest.raises(SchemaError) as info:
        codec.encode({"order_id": "o1"})
    assert info.value.field == "amount_cents"
    with pytest.raises(SchemaError):
        codec.encode({"order_id": "o1", "amount_cents": 2**70})


ORDER_V1_CURRENCY = record("OrderPlaced", [*ORDER_V1["fields"],
                                           {"name": "currency", "type": "string",
                                            "default": "EUR"}])
ORDER_V1_NO_AMOUNT = record("OrderPlaced", [{"name": "order_id", "type": "string"}])


def test_old_writer_new_reader_and_back() -> None:
    old, new = parse_schema(ORDER_V1), parse_schema(ORDER_V1_CURRENCY)
    slim = parse_schema(ORDER_V1_NO_AMOUNT)
    written_old = codec_for(old).encode({"order_id": "o1", "amount_cents": 5})
    written_new = codec_for(new).encode({"order_id": "o2", "amount_cents": 6, "currency": "USD"})
    new_reader = codec_for(old, new, slim, reader=new)
    old_reader = codec_for(old, new, slim, reader=old)
    slim_reader = codec_for(old, new, slim, reader=slim)
    for _ in range(2):  # the second pass goes through the cached writer/reader pair
        assert new_reader.decode(written_old) == {"order_id": "o1", "amount_cents": 5,
                                                  "currency": "EUR"}
        assert old_reader.decode(written_new) == {"order_id": "o2", "amount_cents": 6}
        assert slim_reader.decode(written_old) == {"order_id": "o1"}


def test_decode_through_lookup_and_alias() -> None:
    old = parse_schema(record("Order", [{"name": "order_id", "type": "string"}]))
    reader = parse_schema({**ORDER_V1_NO_AMOUNT, "aliases": ["Order"]})
    data = codec_for(old).encode({"order_id": "o1"})
    seen: list[int] = []

    def lookup(fp: int) -> AvroSchema | None:
        seen.append(fp)
        return old if fp == old.fingerprint else None

    codec = Codec(reader, SchemaSet([reader]), lookup)
    assert codec.decode(data) == {"order_id": "o1"}
    assert codec.decode(data) == {"order_id": "o1"}
    assert seen == [old.fingerprint]  # resolved once, then cached


def reason(codec: Codec, data: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        codec.decode(data)
    return info.value.reason


def test_decode_error_reasons() -> None:
    order = parse_schema(ORDER_V1)
    other = parse_schema(record("OrderPaid", [{"name": "order_id", "type": "string"}]))
    required = parse_schema(record("OrderPlaced", [*ORDER_V1["fields"],
                                                   {"name": "must", "type": "string"}]))
    unknown = parse_schema(record("OrderPlaced", [{"name": "z", "type": "int"}]))
    codec = codec_for(order, other, required, reader=order)
    good = codec.encode({"order_id": "o1", "amount_cents": 5})
    assert reason(codec, b"") == "not-avro"
    assert reason(codec, b"\xc3\x01\x00") == "not-avro"
    assert reason(codec, b"{" + good[1:]) == "not-avro"
    assert reason(codec, good[:-1]) == "not-avro"
    assert reason(codec, good + b"\x00") == "not-avro"
    assert reason(codec, good[:10] + b"\x05\xff\xfe\xfd") == "not-avro"
    assert reason(codec, unknown.header + good[10:]) == "unknown-schema"
    assert reason(codec, codec_for(other).encode({"order_id": "o1"})) == "wrong-type"
    # valid data the reader cannot resolve: it needs a field the writer never had
    assert reason(codec_for(order, required, reader=required), good) == "incompatible"


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=64), with_header=st.booleans())
def test_decode_never_raises_anything_but_decode_error(body: bytes, with_header: bool) -> None:
    schema = parse_schema(EVERYTHING)
    codec = codec_for(schema)
    data = schema.header + body if with_header else body
    try:
        assert isinstance(codec.decode(data), dict)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1,
                      max_size=4), cut=st.integers(min_value=0))
def test_decode_of_a_damaged_value_raises_only_decode_error(flips: list[tuple[int, int]],
                                                            cut: int) -> None:
    schema = parse_schema(EVERYTHING)
    codec = codec_for(schema)
    data = bytearray(codec.encode(VALUE))
    for at, byte in flips:
        data[10 + at % (len(data) - 10)] = byte
    try:
        assert isinstance(codec.decode(bytes(data[: len(data) - cut % 4])), dict)
    except DecodeError:
        pass


# --- model checks -------------------------------------------------------------------------------

class OrderPlaced(pydantic.BaseModel):
    order_id: str
    amount_cents: int


def model_problem(model: type[pydantic.BaseModel], schema: AvroSchema, **kw: Any) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        check_model(model, schema, **kw)
    return info.value


def test_check_model_names_field_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "schemas/checkout/order_placed.v1.avsc", ORDER_V1)
    schema = load_schema(path)
    check_model(OrderPlaced, schema)

    class Wrong(pydantic.BaseModel):
        order_id: str
        amount_cents: str

    error = model_problem(Wrong, schema)
    assert str(error) == (f"Wrong.amount_cents: model type str does not match Avro type long "
                          f"in {path}")
    assert (error.field, error.path) == ("amount_cents", str(path))

    class Missing(pydantic.BaseModel):
        order_id: str

    error = model_problem(Missing, schema)
    assert error.field == "amount_cents" and "missing from the model" in str(error)

    class Extra(OrderPlaced):
        note: str = ""

    error = model_problem(Extra, schema)
    assert error.field == "note" and "not in the Avro schema" in str(error)
    check_model(Extra, schema, ignore={"note"})


def test_check_model_nested_and_special_types() -> None:
    schema = parse_schema(EVERYTHING)

    class BadAddress(pydantic.BaseModel):
        city: int
        zip: str | None = None

    class Nested(Everything):
        address: BadAddress  # type: ignore[assignment]

    error = model_problem(Nested, schema)
    assert error.field == "address.city"
    assert str(error).startswith("Nested.address.city: model type int does not match Avro "
                                 "type string")

    class BadLine(pydantic.BaseModel):
        sku: str
        qty: float

    class InList(Everything):
        lines: list[BadLine]  # type: ignore[assignment]

    assert model_problem(InList, schema).field == "lines[].qty"

    class Cases(Everything):
        status: Literal["NEW"]  # type: ignore[assignment]
        i: int | None  # type: ignore[assignment]
        at_ms: int  # type: ignore[assignment]
        day: datetime.datetime
        counts: dict[str, str]  # type: ignore[assignment]

    error = model_problem(Cases, schema)
    fields = [line.split(":")[0] for line in str(error).splitlines()]
    assert fields == ["Cases.i", "Cases.counts{}", "Cases.status", "Cases.at_ms", "Cases.day"]

    class Relaxed(Everything):
        maybe: str  # required over a nullable Avro field is fine
        id: str  # type: ignore[assignment]  # a uuid may be a plain str

    check_model(Relaxed, schema)


# --- compatibility ------------------------------------------------------------------------------

def compat(reader_fields: list[dict[str, Any]], writer_fields: list[dict[str, Any]],
           **reader_extra: Any) -> list[str]:
    return check_compatible(parse_schema(record("R", reader_fields, **reader_extra)),
                            parse_schema(record("R", writer_fields)))


def f(name: str, type_: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


ADDRESS = {"type": "record", "name": "Address", "fields": [f("city", "string")]}
ADDRESS_ZIP = {"type": "record", "name": "Address", "fields": [f("city", "string"),
                                                               f("zip", "string")]}


@pytest.mark.parametrize(("reader", "writer", "problem"), [
    ([f("a", "int"), f("b", "string", default="")], [f("a", "int")], None),
    ([f("a", "int")], [f("a", "int"), f("gone", "string")], None),
    ([f("a", "int"), f("b", "string")], [f("a", "int")], "field 'b': added without a default"),
    ([f("a", "long")], [f("a", "int")], None),
    ([f("a", "double")], [f("a", "int")], None),
    ([f("a", "float")], [f("a", "long")], None),
    ([f("a", "double")], [f("a", "float")], None),
    ([f("a", "bytes")], [f("a", "string")], None),
    ([f("a", "string")], [f("a", "bytes")], None),
    ([f("a", "int")], [f("a", "long")], "field 'a': type changed from long to int"),
    ([f("a", "string")], [f("a", "long")], "field 'a': type changed from long to string"),
    ([f("a", ["null", "string"])], [f("a", "string")], None),
    ([f("a", ["null", "long"])], [f("a", "int")], None),
    ([f("a", "string")], [f("a", ["null", "string"])], "type changed from null to string"),
    ([f("a", ["null", "int"])], [f("a", ["null", "string"])], "not in reader union"),
    ([f("s", {"type": "enum", "name": "S", "symbols": ["A"]})],
     [f("s", {"type": "enum", "name": "S", "symbols": ["A", "B"]})],
     "field 's': enum symbols ['B'] removed"),
    ([f("s", {"type": "enum", "name": "S", "symbols": ["A"], "default": "A"})],
     [f("s", {"type": "enum", "name": "S", "symbols": ["A", "B"]})], None),
    ([f("s", {"type": "enum", "name": "S", "symbols": ["A", "B"]})],
     [f("s", {"type": "enum", "name": "S", "symbols": ["A"]})], None),
    ([f("shipping", {"type": "record", "name": "Shipping", "fields": [f("address", ADDRESS)]})],
     [f("shipping", {"type": "record", "name": "Shipping", "fields": []})],
     "field 'shipping.address': added without a default"),
    ([f("shipping", {"type": "record", "name": "Shipping", "fields": [f("address", ADDRESS_ZIP)]})],
     [f("shipping", {"type": "record", "name": "Shipping", "fields": [f("address", ADDRESS)]})],
     "field 'shipping.address.zip': added without a default"),
    ([f("addr", {**ADDRESS, "name": "Place"})], [f("addr", ADDRESS)],
     "name changed from checkout.Address to checkout.Place"),
    ([f("addr", {**ADDRESS, "name": "Place", "aliases": ["Address"]})], [f("addr", ADDRESS)], None),
    ([f("xs", {"type": "array", "items": "string"})], [f("xs", {"type": "array", "items": "int"})],
     "field 'xs[]': type changed from int to string"),
    ([f("m", {"type": "map", "values": "long"})], [f("m", {"type": "map", "values": "int"})], None),
    ([f("m", {"type": "map", "values": "int"})], [f("m", {"type": "map", "values": "long"})],
     "field 'm{}'"),
    ([f("a", "int", aliases=["old"])], [f("old", "int")], None),
    ([f("t", {"type": "long", "logicalType": "timestamp-micros"})],
     [f("t", {"type": "long", "logicalType": "timestamp-millis"})], "logical type changed"),
])
def test_check_compatible(reader: list[dict[str, Any]], writer: list[dict[str, Any]],
                          problem: str | None) -> None:
    problems = compat(reader, writer)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems


def test_check_compatible_record_name() -> None:
    writer = parse_schema(record("Old", [f("a", "int")]))
    assert check_compatible(parse_schema(record("New", [f("a", "int")])), writer) == [
        "the record: name changed from checkout.Old to checkout.New without an alias"]
    assert check_compatible(parse_schema(record("New", [f("a", "int")], aliases=["Old"])),
                            writer) == []


# --- check_directory ----------------------------------------------------------------------------

def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                    "-c", "commit.gpgsign=false", *args], check=True, capture_output=True)


def test_check_directory_against_git(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    root = tmp_path / "schemas"
    path = write(root, "checkout/order_placed.v1.avsc", ORDER_V1)
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "v1")
    assert check_directory(root) == []

    write(root, "checkout/order_placed.v1.avsc", ORDER_V1_CURRENCY)  # compatible
    write(root, "checkout/order_paid.v1.avsc", record("OrderPaid", [f("x", "int")]))  # new file
    assert check_directory(root) == []

    write(root, "checkout/order_placed.v1.avsc", record("OrderPlaced", [
        f("order_id", "string"), f("amount_cents", "string"), f("note", "string")]))
    write(root, "checkout/order_placed.v2.avsc", {**ORDER_V1_NO_AMOUNT, "version": 2})
    problems = check_directory(root, repo=tmp_path)
    assert len(problems) == 2
    assert all(p.startswith(f"{path}: ") for p in problems)
    assert "field 'amount_cents': type changed from long to string" in problems[0]
    assert "field 'note': added without a default" in problems[1]
    assert check_directory(root, git_ref="does-not-exist") == []


def test_check_directory_without_git_reports_load_errors(tmp_path: Path) -> None:
    ok = write(tmp_path, "order_placed.v1.avsc", ORDER_V1)
    bad = write(tmp_path, "order_paid.v1.avsc", "{")
    dup = write(tmp_path, "copy/order_placed.v1.avsc", ORDER_V1)
    problems = check_directory(tmp_path)
    assert len(problems) == 2
    assert str(bad) in problems[0]
    assert str(ok) in problems[1] and str(dup) in problems[1]
