"""Straight-line Avro code for flat records: the common event shape, encoded and decoded without
fastavro's per-call set-up.

fastavro spends about a microsecond per call before it reads or writes a field (named-schema tables,
an options dict, a decoder object), which for a record of a few strings is most of the call. A record
whose fields are all primitives (``null``, ``boolean``, ``int``, ``long``, ``float``, ``double``,
``bytes``, ``string``, without logical types) or a union of ``null`` and one of them gets a function
generated for its schema that reads or writes exactly those fields, and nothing else: the bytes are
the ones fastavro writes (tests/unit/test_flatavro.py checks them against fastavro).

Both functions raise on anything they do not handle; ``Codec`` then takes fastavro's path, which
gives the error a user should see (a value that does not fit, a body that is not Avro). Any other
schema, or a value read with another writer schema (schema resolution), always takes fastavro's path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

#: The zigzag varint of a length below 64 is one byte: 2 * n.
_SHORT = [bytes([n << 1]) for n in range(64)]
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})

Encoder = Callable[[Mapping[str, Any]], bytes]
Decoder = Callable[[bytes, int, int], dict[str, Any]]


def _varint(n: int) -> bytes:
    """The varint of a zigzag-encoded long."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _zigzag(n: int) -> bytes:
    if not _LONG_MIN <= n <= _LONG_MAX:
        raise OverflowError(f"{n} does not fit in an Avro long")
    return _varint((n << 1) ^ (n >> 63))


def _length(n: int) -> bytes:
    if n < 64:
        return _SHORT[n]
    if n < 8192:  # two bytes: a string of a few hundred characters, common in events
        return bytes((((n << 1) & 0x7F) | 0x80, n >> 6))
    return _varint(n << 1)


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """A varint long from ``pos`` (at most ten bytes, as Avro allows); the value and the next position."""
    n = shift = 0
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than ten bytes")


def _kind(field_type: Any) -> tuple[str, int] | None:
    """``(primitive, null branch)``: the branch index of ``null`` in a two-branch union, -1 for a bare
    primitive; None for anything else."""
    if isinstance(field_type, str):
        return (field_type, -1) if field_type in _PRIMITIVES else None
    if isinstance(field_type, list) and len(field_type) == 2 and "null" in field_type:
        other = field_type[1 - field_type.index("null")]
        if isinstance(other, str) and other in _PRIMITIVES and other != "null":
            return other, field_type.index("null")
    return None


def _read(kind: str, var: str, ind: str) -> list[str]:
    """Lines that read one ``kind`` value into ``var`` at ``data[pos]``."""
    if kind == "null":
        return [f"{ind}{var} = None"]
    if kind == "boolean":
        return [f"{ind}{var} = data[pos] != 0", f"{ind}pos += 1"]
    if kind == "float":
        return [f"{ind}{var} = _f(data, pos)[0]", f"{ind}pos += 4"]
    if kind == "double":
        return [f"{ind}{var} = _d(data, pos)[0]", f"{ind}pos += 8"]
    # One and two bytes inline (values below 64 and 8192 in magnitude), longer ones by a call.
    lines = [f"{ind}b = data[pos]",
             f"{ind}if b < 0x80:",
             f"{ind}    n = (b >> 1) ^ -(b & 1)",
             f"{ind}    pos += 1",
             f"{ind}elif data[pos + 1] < 0x80:",
             f"{ind}    n = (b & 0x7F) | (data[pos + 1] << 7)",
             f"{ind}    n = (n >> 1) ^ -(n & 1)",
             f"{ind}    pos += 2",
             f"{ind}else:",
             f"{ind}    n, pos = _read_long(data, pos)"]
    if kind in ("int", "long"):
        return [*lines, f"{ind}{var} = n"]
    value = "data[pos:pos + n]" if kind == "bytes" else "data[pos:pos + n].decode()"
    return [*lines,
            f"{ind}if n < 0 or pos + n > end:",
            f"{ind}    raise ValueError('a length past the end of the value')",
            f"{ind}{var} = {value}",
            f"{ind}pos += n"]


def _write(kind: str, var: str, ind: str, parts: str) -> list[str]:
    """Lines that check ``var`` is exactly a ``kind`` value and append its encoding to ``parts``."""
    if kind == "null":
        return [f"{ind}if {var} is not None:", f"{ind}    raise TypeError"]
    if kind == "boolean":
        return [f"{ind}if {var} is True:", f"{ind}    {parts}(b'\\x01')",
                f"{ind}elif {var} is False:", f"{ind}    {parts}(b'\\x00')",
                f"{ind}else:", f"{ind}    raise TypeError"]
    if kind == "int":  # beyond 32 bits, fastavro decides
        return [f"{ind}if type({var}) is not int or not -0x80000000 <= {var} <= 0x7FFFFFFF:",
                f"{ind}    raise TypeError", f"{ind}{parts}(_zigzag({var}))"]
    if kind == "long":
        return [f"{ind}if type({var}) is not int:", f"{ind}    raise TypeError",
                f"{ind}{parts}(_zigzag({var}))"]
    if kind in ("float", "double"):
        packer = "_pf" if kind == "float" else "_pd"
        return [f"{ind}if type({var}) is not float and type({var}) is not int:", f"{ind}    raise TypeError",
                f"{ind}{parts}({packer}({var}))"]
    encoded = var if kind == "bytes" else f"{var}.encode()"
    return [f"{ind}if type({var}) is not {'bytes' if kind == 'bytes' else 'str'}:", f"{ind}    raise TypeError",
            f"{ind}v = {encoded}",
            f"{ind}{parts}(_length(len(v)))",
            f"{ind}{parts}(v)"]


def compile_record(parsed: Mapping[str, Any], header: bytes) -> tuple[Encoder, Decoder] | None:
    """The encoder (``header`` plus body) and decoder (body from ``pos`` to ``end``) of a flat record
    schema as fastavro parsed it, or None if any field is not a primitive or an optional primitive."""
    if not isinstance(parsed, Mapping) or parsed.get("type") != "record":
        return None
    fields = parsed.get("fields") or []
    kinds = [_kind(f.get("type")) for f in fields]
    if not fields or any(k is None for k in kinds):
        return None
    names = [f["name"] for f in fields]
    dec = ["def decode(data, pos, end):"]
    enc = ["def encode(record):", "    parts = [header]", "    add = parts.append"]
    for i, (name, kind) in enumerate(zip(names, kinds)):
        assert kind is not None
        primitive, null_index = kind
        var = f"f{i}"
        if null_index < 0:
            dec += _read(primitive, var, "    ")
            enc += [f"    {var} = record[{name!r}]", *_write(primitive, var, "    ", "add")]
            continue
        other = 1 - null_index
        dec += [*_read("long", "branch", "    "),
                f"    if branch == {null_index}:",
                f"        {var} = None",
                f"    elif branch == {other}:",
                *_read(primitive, var, "        "),
                "    else:",
                "        raise ValueError('a union branch the schema does not have')"]
        enc += [f"    {var} = record[{name!r}]",
                f"    if {var} is None:",
                f"        add({_SHORT[null_index]!r})",
                "    else:",
                f"        add({_SHORT[other]!r})",
                *_write(primitive, var, "        ", "add")]
    dec += ["    if pos != end:",
            "        raise ValueError('trailing bytes')",
            "    return {" + ", ".join(f"{name!r}: f{i}" for i, name in enumerate(names)) + "}"]
    enc += ["    return b''.join(parts)"]
    scope: dict[str, Any] = {
        "header": header, "_read_long": _read_long, "_zigzag": _zigzag, "_length": _length,
        "_f": struct.Struct("<f").unpack_from, "_d": struct.Struct("<d").unpack_from,
        "_pf": struct.Struct("<f").pack, "_pd": struct.Struct("<d").pack,
    }
    exec(compile("\n".join(dec) + "\n\n" + "\n".join(enc) + "\n", f"<avro {parsed.get('name')}>", "exec"), scope)
    return scope["encode"], scope["decode"]
