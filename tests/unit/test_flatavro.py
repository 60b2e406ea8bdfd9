"""The straight-line code for flat records writes and reads exactly what fastavro does."""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from hypothesis import given, settings, strategies as st

from choreo.errors import DecodeError, SchemaError
from choreo.flatavro import compile_record
from choreo.schemas import Codec, SchemaSet, parse_schema as parse_event_schema

HEADER = b"\xc3\x01" + bytes(range(8))
PRIMITIVES = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"]
LONG = st.integers(-(1 << 63), (1 << 63) - 1)
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "boolean": st.booleans(),
    "int": st.integers(-(1 << 31), (1 << 31) - 1),
    "long": st.one_of(st.integers(-300, 300), LONG),
    "float": st.floats(width=32),
    "double": st.one_of(st.floats(), st.integers(-(1 << 53), 1 << 53)),
    "bytes": st.binary(max_size=300),
    "string": st.text(max_size=200),
}
FIELD_TYPES = st.one_of(
    st.sampled_from(PRIMITIVES),
    st.sampled_from(PRIMITIVES[1:]).flatmap(lambda t: st.sampled_from([["null", t], [t, "null"]])),
)


@st.composite
def records(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    types = draw(st.lists(FIELD_TYPES, min_size=1, max_size=8))
    schema = {"type": "record", "name": "t.R", "fields": [{"name": f"f{i}", "type": t} for i, t in enumerate(types)]}
    record = {}
    for i, t in enumerate(types):
        if isinstance(t, list):
            other = t[1 - t.index("null")]
            record[f"f{i}"] = draw(st.one_of(st.none(), VALUES[other]))
        else:
            record[f"f{i}"] = draw(VALUES[t])
    return parse_schema(schema), record


def fastavro_body(parsed: dict[str, Any], record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, parsed, record)
    return out.getvalue()


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return list(a) == list(b) and all(
        (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)) or x == y
        for x, y in zip(a.values(), b.values()))


@settings(max_examples=400, deadline=None, derandomize=True)
@given(case=records())
def test_it_writes_and_reads_the_bytes_fastavro_does(case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    parsed, record = case
    compiled = compile_record(parsed, HEADER)
    assert compiled is not None
    encode, decode = compiled
    body = fastavro_body(parsed, record)
    assert encode(record) == HEADER + body
    decoded = decode(HEADER + body, len(HEADER), len(HEADER) + len(body))
    assert same(decoded, schemaless_reader(io.BytesIO(body), parsed, None))


@pytest.mark.parametrize("size", [0, 63, 64, 65, 8191, 8192, 8193, 100_000])
def test_lengths_and_longs_of_every_varint_width_match_fastavro(size: int) -> None:
    # One, two and three or more bytes: the first two widths are read and written inline.
    parsed = parse_schema({"type": "record", "name": "W", "fields": [
        {"name": "s", "type": "string"}, {"name": "b", "type": "bytes"}, {"name": "n", "type": "long"},
        {"name": "m", "type": "long"}]})
    record = {"s": "x" * size, "b": b"y" * size, "n": size, "m": -size - 1}
    compiled = compile_record(parsed, HEADER)
    assert compiled is not None
    body = fastavro_body(parsed, record)
    assert compiled[0](record) == HEADER + body
    assert compiled[1](HEADER + body, len(HEADER), len(HEADER) + len(body)) == record


@settings(max_examples=400, deadline=None, derandomize=True)
@given(case=records(), cut=st.integers(0, 400), junk=st.binary(max_size=12), at=st.integers(0, 400))
def test_a_damaged_body_is_refused_or_read_as_fastavro_reads_it(
        case: tuple[dict[str, Any], dict[str, Any]], cut: int, junk: bytes, at: int) -> None:
    parsed, record = case
    compiled = compile_record(parsed, HEADER)
    assert compiled is not None
    body = fastavro_body(parsed, record)
    at = min(at, len(body))
    damaged = body[:at] + junk + body[at:][:cut]
    try:
        mine: dict[str, Any] | None = compiled[1](damaged, 0, len(damaged))
    except Exception:
        mine = None
    try:
        fo = io.BytesIO(damaged)
        theirs: dict[str, Any] | None = schemaless_reader(fo, parsed, None)
        if fo.tell() != len(damaged):
            theirs = None  # trailing bytes: Codec refuses these too
    except Exception:
        theirs = None
    if mine is None:
        assert theirs is None, f"fastavro reads {damaged!r} as {theirs}"
    else:
        assert theirs is not None and same(mine, theirs)


@pytest.mark.parametrize("field_type", [
    {"type": "long", "logicalType": "timestamp-millis"},
    {"type": "enum", "name": "t.E", "symbols": ["A"]},
    {"type": "array", "items": "string"},
    {"type": "map", "values": "long"},
    {"type": "fixed", "name": "t.F", "size": 4},
    {"type": "record", "name": "t.Inner", "fields": [{"name": "a", "type": "string"}]},
    ["null", "string", "long"],
    ["string", "long"],
])
def test_any_other_field_leaves_the_record_to_fastavro(field_type: Any) -> None:
    schema = {"type": "record", "name": "t.R", "fields": [{"name": "a", "type": "string"}, {"name": "b", "type": field_type}]}
    assert compile_record(parse_schema(schema), HEADER) is None


def codec(fields: list[dict[str, Any]]) -> Codec:
    schema = parse_event_schema({"type": "record", "name": "t.R", "version": 1, "fields": fields})
    return Codec(schema, SchemaSet([schema]))


def test_a_missing_field_takes_its_default_and_a_wrong_value_names_its_field() -> None:
    c = codec([{"name": "a", "type": "string"}, {"name": "n", "type": "long", "default": 7}])
    assert c.decode(c.encode({"a": "x"})) == {"a": "x", "n": 7}
    with pytest.raises(SchemaError, match="'n'"):
        c.encode({"a": "x", "n": "seven"})


def test_an_int_beyond_32_bits_is_left_to_fastavro() -> None:
    c = codec([{"name": "i", "type": "int"}])
    value = 1 << 40
    body = fastavro_body(c.reader.parsed, {"i": value})
    assert c.encode({"i": value}) == c.reader.header + body


@pytest.mark.parametrize("body", [b"", b"\x05", b"\x02a\x04", b"\x02a\x00\x00", b"\x7f", b"\x01\x02"])
def test_a_bad_body_is_not_avro(body: bytes) -> None:
    c = codec([{"name": "a", "type": "string"}, {"name": "o", "type": ["null", "string"]}])
    with pytest.raises(DecodeError) as info:
        c.decode(c.reader.header + body)
    assert info.value.reason == "not-avro"


def test_a_float_that_does_not_fit_32_bits_is_written_as_fastavro_writes_it() -> None:
    c = codec([{"name": "f", "type": "float"}])
    for value in (1e300, -1e300, float("inf"), 3.4028235e38):
        try:
            expected: bytes | None = c.reader.header + fastavro_body(c.reader.parsed, {"f": value})
        except Exception:
            expected = None
        if expected is None:
            with pytest.raises(SchemaError):
                c.encode({"f": value})
        else:
            assert c.encode({"f": value}) == expected
    assert struct.unpack("<f", c.encode({"f": 1.5})[10:])[0] == 1.5


def test_a_boolean_byte_other_than_0_or_1_reads_as_fastavro_reads_it() -> None:
    c = codec([{"name": "b", "type": "boolean"}])
    for byte in (0, 1, 2, 255):
        assert c.decode(c.reader.header + bytes([byte])) == {"b": byte != 0}
