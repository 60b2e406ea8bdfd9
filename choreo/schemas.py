"""Avro schemas: loading ``.avsc`` files, the single-object codec, and compatibility checks.

Wire format of a value (Avro single-object encoding)::

    C3 01 | CRC-64-AVRO fingerprint of the Parsing Canonical Form, 8 bytes little-endian | body

Schema files live under one root, one file per event type and major version, e.g.
``schemas/checkout/order_placed.v1.avsc``; the record carries ``"version": 1`` matching the file
name. Compatible changes edit the file in place; an incompatible one starts ``.v2.avsc``.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import enum
import json
import re
import subprocess
import types
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
import dataclasses
from io import BytesIO
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pydantic
from fastavro import schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import parse_schema as _fastavro_parse
from fastavro.schema import to_parsing_canonical_form
from fastavro.validation import ValidationError, validate

from choreo.errors import DecodeError, SchemaError
from choreo.flatavro import Decoder, compile_record

MAGIC = b"\xc3\x01"
_HEADER_LEN = 10
_FILE_NAME = re.compile(r"^(?P<stem>[^.]+)\.v(?P<major>[0-9]+)\.avsc$")
_PROMOTIONS = {("int", "long"), ("int", "float"), ("int", "double"), ("long", "float"),
               ("long", "double"), ("float", "double"), ("string", "bytes"), ("bytes", "string")}
_PRIMITIVES: dict[str, tuple[Any, ...]] = {
    "null": (type(None),), "boolean": (bool,), "int": (int,), "long": (int,), "float": (float,),
    "double": (float,), "bytes": (bytes,), "string": (str,), "fixed": (bytes,)}
_LOGICAL: dict[str, tuple[Any, ...]] = {
    "uuid": (uuid.UUID, str), "decimal": (decimal.Decimal,), "date": (datetime.date,),
    "time-millis": (datetime.time,), "time-micros": (datetime.time,),
    "timestamp-millis": (datetime.datetime,), "timestamp-micros": (datetime.datetime,),
    "local-timestamp-millis": (datetime.datetime,), "local-timestamp-micros": (datetime.datetime,)}


@dataclasses.dataclass(frozen=True, slots=True)
class AvroSchema:
    """One event schema, parsed once; everything the codec needs is precomputed here.

    The Parsing Canonical Form drops docs, defaults, aliases and logical types, so edits to
    only those keep the fingerprint. Equality and hashing ignore ``raw`` and ``parsed``.
    """

    path: str | None
    full_name: str
    version: int
    raw: dict[str, Any] = dataclasses.field(compare=False, repr=False)
    parsed: Any = dataclasses.field(compare=False, repr=False)
    canonical: str
    fingerprint: int
    header: bytes

    @property
    def fields(self) -> list[dict[str, Any]]:
        fields: list[dict[str, Any]] = self.raw["fields"]
        return fields


def _fingerprint_le(canonical: str) -> bytes:
    # fastavro's hex string is already the little-endian byte order the wire format uses
    # (checked against the spec vector: "null" -> 0x63dd24e7cc258f8a).
    return bytes.fromhex(_fastavro_fingerprint(canonical, "CRC-64-AVRO"))


def parse_schema(text_or_dict: str | Mapping[str, Any], *, path: str | None = None) -> AvroSchema:
    """Parse an event schema: an Avro record with a top-level ``"version"`` int (>= 1).

    Raises SchemaError naming ``path`` (or ``<string>``) for bad JSON or invalid Avro.
    """
    where = path or "<string>"
    if isinstance(text_or_dict, str):
        try:
            loaded = json.loads(text_or_dict)
        except ValueError as exc:
            raise SchemaError(f"{where}: invalid JSON: {exc}", path=path) from exc
    else:
        loaded = copy.deepcopy(dict(text_or_dict))
    if not isinstance(loaded, dict) or loaded.get("type") != "record":
        raise SchemaError(f"{where}: an event schema must be an Avro record", path=path)
    version = loaded.get("version")
    if type(version) is not int or version < 1:
        raise SchemaError(f'{where}: missing or invalid top-level "version" (an int >= 1)',
                          path=path)
    try:
        parsed: Any = _fastavro_parse(copy.deepcopy(loaded))
        canonical = to_parsing_canonical_form(loaded)
    except Exception as exc:  # fastavro raises many types for bad schemas; all mean "invalid"
        raise SchemaError(f"{where}: invalid Avro schema: {exc}", path=path) from exc
    fp = _fingerprint_le(canonical)
    return AvroSchema(path=path, full_name=parsed["name"], version=version, raw=loaded,
                      parsed=parsed, canonical=canonical,
                      fingerprint=int.from_bytes(fp, "little"), header=MAGIC + fp)


def load_schema(path: str | Path) -> AvroSchema:
    """Load ``<name>.v<N>.avsc``; N must equal the ``version`` inside.

    The file stem must be the record name in snake or kebab case (``order_placed`` for
    ``OrderPlaced``). Every problem is a SchemaError naming the file.
    """
    p, where = Path(path), str(path)
    match = _FILE_NAME.match(p.name)
    if match is None:
        raise SchemaError(f"{where}: schema file names must look like <name>.v<N>.avsc", path=where)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{where}: cannot read: {exc}", path=where) from exc
    schema = parse_schema(text, path=where)
    if schema.version != int(match["major"]):
        raise SchemaError(f"{where}: version {schema.version} does not match the file name "
                          f"(.v{match['major']})", path=where)
    short = schema.full_name.rpartition(".")[2]
    if match["stem"].replace("_", "").replace("-", "").lower() != short.lower():
        raise SchemaError(f"{where}: record name {short!r} does not match the file name "
                          f"{match['stem']!r}", path=where)
    return schema


class SchemaSet:
    """All known schemas: by fingerprint (to decode any writer) and by full name and version.

    Two *files* declaring the same full name and version are an error. A schema without a path
    (e.g. an older revision fetched elsewhere) is indexed by fingerprint only when its name and
    version are already taken.
    """

    def __init__(self, schemas: Collection[AvroSchema] = ()) -> None:
        self._by_fp: dict[int, AvroSchema] = {}
        self._by_name: dict[str, dict[int, AvroSchema]] = {}
        for schema in schemas:
            self.add(schema)

    @classmethod
    def from_directory(cls, root: str | Path) -> SchemaSet:
        """Load every ``**/*.avsc`` under ``root``, in sorted path order."""
        return cls([load_schema(p) for p in sorted(Path(root).rglob("*.avsc"))])

    def add(self, schema: AvroSchema) -> None:
        versions = self._by_name.setdefault(schema.full_name, {})
        other = versions.get(schema.version)
        if other is None:
            versions[schema.version] = schema
        elif other.path and schema.path and other.path != schema.path:
            raise SchemaError(f"{schema.full_name} v{schema.version} is declared twice: in "
                              f"{other.path} and in {schema.path}", path=schema.path)
        self._by_fp.setdefault(schema.fingerprint, schema)

    def by_fingerprint(self, fp: int) -> AvroSchema | None:
        return self._by_fp.get(fp)

    def by_name(self, full_name: str, version: int | None = None) -> AvroSchema | None:
        """The schema for ``full_name`` at major ``version``, or the highest major when None."""
        versions = self._by_name.get(full_name, {})
        if version is None:
            return versions[max(versions)] if versions else None
        return versions.get(version)

    def __iter__(self) -> Iterator[AvroSchema]:
        return iter(list(self._by_fp.values()))

    def __len__(self) -> int:
        return len(self._by_fp)


# --- model <-> schema --------------------------------------------------------------------------

def _deref(avro: Any, named: Mapping[str, Any]) -> Any:
    """Follow named-type references and ``{"type": ...}`` wrappers to the definition."""
    while True:
        if isinstance(avro, str) and avro in named:
            avro = named[avro]
        elif isinstance(avro, dict) and (not isinstance(avro.get("type"), str)
                                         or avro["type"] in named):
            avro = avro["type"]
        else:
            return avro


def _kind(avro: Any) -> str:
    if isinstance(avro, list):
        return "union"
    return str(avro["type"] if isinstance(avro, dict) else avro)


def _describe(avro: Any) -> str:
    if isinstance(avro, list):
        return "union[" + ", ".join(_describe(b) for b in avro) + "]"
    if not isinstance(avro, dict):
        return str(avro)
    kind = avro["type"]
    if "logicalType" in avro:
        return f"{kind} ({avro['logicalType']})"
    if kind == "array":
        return f"array<{_describe(avro['items'])}>"
    if kind == "map":
        return f"map<{_describe(avro['values'])}>"
    return f"{kind} {avro['name']}" if "name" in avro else str(kind)


def _describe_type(ann: Any) -> str:
    if ann is type(None):
        return "None"
    return ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")


def _unwrap(ann: Any) -> Any:
    while get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    return ann


def _arms(ann: Any) -> tuple[list[Any], bool]:
    """A model annotation's union arms without None, and whether None was one of them."""
    if get_origin(ann) in (Union, types.UnionType):
        args = [_unwrap(a) for a in get_args(ann)]
        return [a for a in args if a is not type(None)], type(None) in args
    return [ann], False


class _ModelCheck:
    def __init__(self, named: Mapping[str, Any]) -> None:
        self.named = named
        self.problems: list[tuple[str, str]] = []
        self.seen: set[tuple[type, str]] = set()

    def fits(self, ann: Any, avro: Any) -> bool:
        trial = _ModelCheck(self.named)
        trial.seen = set(self.seen)
        trial.check_type(ann, avro, "")
        return not trial.problems

    def record(self, model: type[pydantic.BaseModel], avro: Mapping[str, Any], prefix: str,
               ignore: Collection[str] = ()) -> None:
        if (model, avro["name"]) in self.seen:
            return
        self.seen.add((model, avro["name"]))
        model_fields = {n: f for n, f in model.model_fields.items() if n not in ignore}
        for field in avro["fields"]:
            name, path = field["name"], prefix + field["name"]
            if name not in model_fields:
                self.problems.append((path, f"Avro field of type {_describe(field['type'])} "
                                            "is missing from the model"))
            else:
                self.check_type(model_fields[name].annotation, field["type"], path)
        avro_names = {f["name"] for f in avro["fields"]}
        for name in model_fields:
            if name not in avro_names:
                self.problems.append((prefix + name, "model field is not in the Avro schema"))

    def check_type(self, ann: Any, avro: Any, path: str) -> None:
        ann, avro = _unwrap(ann), _deref(avro, self.named)
        if ann is Any:
            return
        arms, model_nullable = _arms(ann)
        kind = _kind(avro)
        branches = [b for b in avro if b != "null"] if kind == "union" else [avro]
        avro_nullable = kind == "null" or (kind == "union" and len(branches) < len(avro))
        # A required model field over a nullable Avro field is allowed (the model is stricter);
        # a nullable model field over a non-nullable Avro field could not be encoded.
        if model_nullable and not avro_nullable:
            self._mismatch(ann, avro, path)
        elif len(arms) == 1 and len(branches) == 1:
            self._single(arms[0], branches[0], path)
        elif not (all(any(self.fits(a, b) for b in branches) for a in arms)
                  and all(any(self.fits(a, b) for a in arms) for b in branches)):
            self._mismatch(ann, avro, path)

    def _mismatch(self, ann: Any, avro: Any, path: str) -> None:
        self.problems.append(
            (path, f"model type {_describe_type(ann)} does not match Avro type {_describe(avro)}"))

    def _single(self, ann: Any, avro: Any, path: str) -> None:
        avro = _deref(avro, self.named)
        kind, origin, args = _kind(avro), get_origin(ann), get_args(ann)
        logical = avro.get("logicalType") if isinstance(avro, dict) else None
        if logical in _LOGICAL:
            ok = ann in _LOGICAL[logical]
        elif kind in _PRIMITIVES:
            ok = ann in _PRIMITIVES[kind] or (
                origin is Literal and all(type(a) in _PRIMITIVES[kind] for a in args))
        elif kind == "enum":
            symbols = set(avro["symbols"])
            if origin is Literal:
                ok = set(args) == symbols
            else:
                ok = (isinstance(ann, type) and issubclass(ann, enum.Enum)
                      and {m.value for m in ann} == symbols)
        elif kind == "array":
            ok = ann is list or origin is list
            if ok and args:
                self.check_type(args[0], avro["items"], path + "[]")
        elif kind == "map":
            ok = ann is dict or (origin is dict and _unwrap(args[0]) is str)
            if ok and args:
                self.check_type(args[1], avro["values"], path + "{}")
        elif kind == "record":
            ok = isinstance(ann, type) and issubclass(ann, pydantic.BaseModel)
            if ok:
                self.record(ann, avro, path + ".")
        else:
            ok = False
        if not ok:
            self._mismatch(ann, avro, path)


def check_model(model: type[pydantic.BaseModel], schema: AvroSchema, *,
                ignore: Collection[str] = ()) -> None:
    """Check that ``model`` and ``schema`` describe the same record, field by field.

    Names must be equal both ways (``ignore`` skips top-level model fields, e.g. envelope
    fields); types must correspond, nested models recursively. Defaults are not compared.
    Raises one SchemaError listing every problem, one per line, each naming the model, the
    field and the schema file; ``.field`` holds the first offending field path.
    """
    check = _ModelCheck(schema.parsed["__named_schemas"])
    check.record(model, schema.parsed, "", ignore)
    if check.problems:
        where = schema.path or schema.full_name
        lines = [f"{model.__name__}.{path}: {msg} in {where}" for path, msg in check.problems]
        raise SchemaError("\n".join(lines), path=schema.path, field=check.problems[0][0])


# --- codec -------------------------------------------------------------------------------------

def _aliases(named: Mapping[str, Any]) -> set[str]:
    """A named type's full name plus its aliases, qualified with its namespace."""
    space = named["name"].rpartition(".")[0]
    return {named["name"]} | {a if "." in a or not space else f"{space}.{a}"
                              for a in named.get("aliases", ())}


class Codec:
    """Encodes and decodes one event type's values in single-object encoding.

    Values written with any known revision of the type decode into the reader schema's shape
    (Avro schema resolution); resolved writer/reader pairs are cached. Not thread-safe.
    ``lookup`` (e.g. a registry client) is asked for fingerprints ``known`` lacks; its own
    exceptions propagate, since a registry outage is not a poison message.
    """

    __slots__ = ("reader", "_known", "_lookup", "_header", "_parsed", "_names", "_pairs", "_flat_encode")

    def __init__(self, reader: AvroSchema, known: SchemaSet,
                 lookup: Callable[[int], AvroSchema | None] | None = None) -> None:
        self.reader = reader
        self._known, self._lookup = known, lookup
        self._header, self._parsed = reader.header, reader.parsed
        self._names = _aliases(reader.parsed)
        flat_encode, flat_decode = compile_record(reader.parsed, reader.header) or (None, None)
        self._flat_encode = flat_encode
        # (writer, reader, straight-line decoder): reader None is the same schema, so fastavro skips
        # resolution; the decoder, for a flat record written with this very schema, skips fastavro.
        self._pairs: dict[bytes, tuple[Any, Any, Decoder | None]] = {
            reader.header[2:]: (reader.parsed, None, flat_decode)}

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Header plus Avro body. Keys the schema does not know are ignored; a missing field
        takes its schema default. A value that does not fit raises SchemaError naming the field.
        """
        if self._flat_encode is not None:
            try:
                return self._flat_encode(record)
            except Exception:  # a missing field, a value of another type: fastavro's path decides
                pass
        out = BytesIO()
        out.write(self._header)
        try:
            schemaless_writer(out, self._parsed, record)
        except Exception as exc:
            raise self._encode_error(record, exc) from exc
        return out.getvalue()

    def _encode_error(self, record: Mapping[str, Any], exc: Exception) -> SchemaError:
        name = self.reader.full_name
        try:
            validate(record, self._parsed, raise_errors=True)
        except ValidationError as invalid:
            err = invalid.errors[0]
            field = err.field[len(name) + 1:] if err.field.startswith(name + ".") else err.field
            return SchemaError(f"cannot encode {name}: field {field!r} expects "
                               f"{_describe(err.schema)}, got {type(err.datum).__name__}",
                               path=self.reader.path, field=field or None)
        except Exception:  # validation itself choked on the value; report the writer's error
            pass
        return SchemaError(f"cannot encode {name}: {exc}", path=self.reader.path)

    def decode(self, data: bytes) -> dict[str, Any]:
        """Decode one value. Never raises anything but DecodeError for bad input; ``reason`` is
        ``not-avro`` (bad marker, truncated, garbage or trailing bytes), ``unknown-schema``,
        ``wrong-type`` (a writer of another record, not an alias) or ``incompatible`` (the
        data cannot be resolved into the reader schema).
        """
        if len(data) < _HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError("not an Avro single-object encoded value", reason="not-avro")
        fp = data[2:_HEADER_LEN]
        pair = self._pairs.get(fp) or self._resolve(fp)
        flat = pair[2]
        if flat is not None:
            try:
                return flat(data, _HEADER_LEN, len(data))
            except Exception as exc:  # truncated, a bad length or union branch, not UTF-8, trailing bytes
                raise DecodeError(f"invalid Avro body: {type(exc).__name__}: {exc}", reason="not-avro") from exc
        fo = BytesIO(data)  # shares the buffer; slicing off the header would copy the body
        fo.seek(_HEADER_LEN)
        try:
            value = schemaless_reader(fo, pair[0], pair[1])
        except SchemaResolutionError as exc:
            raise DecodeError(f"cannot resolve into {self.reader.full_name}: {exc}",
                              reason="incompatible") from exc
        except Exception as exc:  # fastavro fails on garbage with many types (EOF, Index, ...)
            raise DecodeError(f"invalid Avro body: {type(exc).__name__}: {exc}",
                              reason="not-avro") from exc
        if fo.tell() != len(data) or not isinstance(value, dict):
            raise DecodeError("invalid Avro body: trailing bytes", reason="not-avro")
        return value

    def _resolve(self, fp_bytes: bytes) -> tuple[Any, Any, Decoder | None]:
        fp = int.from_bytes(fp_bytes, "little")
        writer = self._known.by_fingerprint(fp)
        if writer is None and self._lookup is not None:
            writer = self._lookup(fp)
        if writer is None:
            raise DecodeError(f"unknown writer schema fingerprint {fp:#018x}",
                              reason="unknown-schema")
        if writer.full_name not in self._names:
            raise DecodeError(f"value of {writer.full_name} where {self.reader.full_name} "
                              "was expected", reason="wrong-type")
        pair = (writer.parsed, self._parsed, None)
        self._pairs[fp_bytes] = pair
        return pair


# --- compatibility -----------------------------------------------------------------------------

class _Compat:
    def __init__(self, reader: AvroSchema, writer: AvroSchema) -> None:
        self.rnamed = reader.parsed["__named_schemas"]
        self.wnamed = writer.parsed["__named_schemas"]
        self.problems: list[str] = []
        self.seen: set[tuple[str, str]] = set()

    def fits(self, r: Any, w: Any) -> bool:
        trial = _Compat.__new__(_Compat)
        trial.rnamed, trial.wnamed, trial.seen, trial.problems = (
            self.rnamed, self.wnamed, set(self.seen), [])
        trial.check(r, w, "")
        return not trial.problems

    def check(self, r: Any, w: Any, path: str) -> None:
        r, w = _deref(r, self.rnamed), _deref(w, self.wnamed)
        rk, wk = _kind(r), _kind(w)
        where = f"field '{path}'" if path else "the record"
        if wk == "union":  # every branch the writer may have used must be readable
            for branch in w:
                self.check(r, branch, path)
            return
        if rk == "union":
            if not any(self.fits(b, w) for b in r):
                same = [b for b in r if _kind(_deref(b, self.rnamed)) == wk]
                if same:  # report why the closest branch does not fit
                    self.check(same[0], w, path)
                else:
                    self.problems.append(f"{where}: writer type {_describe(w)} is not in "
                                         f"reader union {_describe(r)}")
            return
        if rk != wk and (wk, rk) not in _PROMOTIONS:
            self.problems.append(f"{where}: type changed from {_describe(w)} to {_describe(r)}")
            return
        if rk in ("record", "enum", "fixed") and w["name"] not in _aliases(r):
            self.problems.append(f"{where}: name changed from {w['name']} to {r['name']} "
                                 "without an alias")
            return
        if rk == "record":
            self._record(r, w, path)
        elif rk == "enum":
            lost = [s for s in w["symbols"] if s not in r["symbols"]]
            if lost and "default" not in r:
                self.problems.append(f"{where}: enum symbols {lost} removed without an enum "
                                     "default")
        elif rk == "fixed" and r["size"] != w["size"]:
            self.problems.append(f"{where}: fixed size changed from {w['size']} to {r['size']}")
        elif rk == "array":
            self.check(r["items"], w["items"], path + "[]")
        elif rk == "map":
            self.check(r["values"], w["values"], path + "{}")
        self._logical(r, w, where)

    def _record(self, r: Mapping[str, Any], w: Mapping[str, Any], path: str) -> None:
        if (r["name"], w["name"]) in self.seen:
            return
        self.seen.add((r["name"], w["name"]))
        written = {f["name"]: f for f in w["fields"]}
        for field in r["fields"]:
            child = f"{path}.{field['name']}" if path else field["name"]
            names = [field["name"], *field.get("aliases", ())]
            source = next((written[n] for n in names if n in written), None)
            if source is not None:
                self.check(field["type"], source["type"], child)
            elif "default" not in field:
                self.problems.append(f"field '{child}': added without a default")

    def _logical(self, r: Any, w: Any, where: str) -> None:
        rl = r.get("logicalType") if isinstance(r, dict) else None
        wl = w.get("logicalType") if isinstance(w, dict) else None
        if rl and wl and rl != wl:
            self.problems.append(f"{where}: logical type changed from {wl} to {rl}")
        elif rl == wl == "decimal" and (r.get("scale", 0) != w.get("scale", 0)
                                        or r["precision"] < w["precision"]):
            self.problems.append(f"{where}: decimal scale changed or precision reduced")


def check_compatible(reader: AvroSchema, writer: AvroSchema) -> list[str]:
    """Problems that stop ``reader`` from reading data written with ``writer`` (backward
    compatibility, Avro schema resolution rules); empty means compatible.

    Stricter than the spec in one way: a changed logical type (or decimal scale) on the same
    underlying type is reported, since the bytes would still read but mean something else.
    """
    check = _Compat(reader, writer)
    check.check(reader.parsed, writer.parsed, "")
    return check.problems


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def check_directory(root: str | Path, *, git_ref: str = "HEAD",
                    repo: Path | None = None) -> list[str]:
    """What ``choreo schema check`` reports: every schema under ``root`` must load, no name
    and version may be declared twice, and each file that exists at ``git_ref`` must still read
    data written with that committed revision. New files (not at ``git_ref``, or no git at all)
    and new majors need nothing. Returns problems, each naming its file; empty means ok.
    """
    problems: list[str] = []
    known = SchemaSet()
    loaded: list[tuple[Path, AvroSchema]] = []
    for file in sorted(Path(root).rglob("*.avsc")):
        try:
            schema = load_schema(file)
            known.add(schema)
        except SchemaError as exc:
            problems.append(str(exc))
            continue
        loaded.append((file, schema))
    if repo is None:
        top = _git(Path(root), "rev-parse", "--show-toplevel")
        if top is None:
            return problems  # no git, or not a repository: every file is new
        repo = Path(top.strip())
    repo = repo.resolve()
    for file, schema in loaded:
        try:
            relative = file.resolve().relative_to(repo).as_posix()
        except ValueError:
            continue
        text = _git(repo, "show", f"{git_ref}:{relative}")
        if text is None:
            continue  # not in git at that ref: a new file
        try:
            committed = parse_schema(text, path=f"{git_ref}:{relative}")
        except SchemaError:
            continue  # the committed revision was already broken; nothing to stay compatible with
        problems += [f"{file}: {p} (reading data written at {git_ref})"
                     for p in check_compatible(schema, committed)]
    return problems
