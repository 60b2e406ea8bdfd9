"""Turning events into Kafka records and back: Avro single-object values plus choreo headers.

One ``Wire`` serves one process. It caches a codec and the constant header parts per event type,
so encoding an event costs one Avro write plus a few byte-string joins.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pydantic

from choreo.errors import DecodeError
from choreo.events import Envelope, Event, Header, utc_now_iso
from choreo.schemas import AvroSchema, Codec, SchemaSet
from choreo.transport import OutgoingRecord, Record

_H_ID = Header.EVENT_ID
_H_TYPE = Header.EVENT_TYPE
_H_SCHEMA = Header.SCHEMA
_H_CORR = Header.CORRELATION_ID
_H_CAUSE = Header.CAUSATION_ID
_H_AT = Header.OCCURRED_AT
_H_PROD = Header.PRODUCER
_H_ATTEMPT = Header.ATTEMPT


# The variant digit for each hex digit of the digest: its top two bits become 10 (RFC 4122).
_VARIANT = {f"{n:x}": "89ab"[n & 3] for n in range(16)}
_blake2b = hashlib.blake2b


def derive_event_id(source_id: str, handler: str, index: int) -> str:
    """A deterministic UUID (version 8) for the ``index``-th event emitted by ``handler`` for ``source_id``.

    Formatted by hand from the BLAKE2b digest: building a ``uuid.UUID`` costs more than hashing.
    """
    d = _blake2b(f"{source_id}/{handler}/{index}".encode(), digest_size=16).hexdigest()
    # Version nibble 8 (RFC 9562 custom), variant bits 10xx (RFC 4122).
    return f"{d[:8]}-{d[8:12]}-8{d[13:16]}-{_VARIANT[d[16]]}{d[17:20]}-{d[20:]}"


def new_event_id() -> str:
    return str(uuid.uuid4())


def _to_avro(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _to_avro(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_avro(v) for v in value]
    return value


class _TypeInfo:
    __slots__ = ("cls", "codec", "type_name", "type_bytes", "type_header", "schema_header", "fingerprint", "topic",
                 "to_record", "from_avro")

    def __init__(self, cls: type[Event], codec: Codec, topic_prefix: str) -> None:
        schema = cls.avro_schema()
        self.cls = cls
        self.codec = codec
        self.type_name = schema.full_name
        self.type_bytes = schema.full_name.encode()
        self.type_header = (_H_TYPE, self.type_bytes)
        self.schema_header = (_H_SCHEMA, f"{schema.fingerprint:016x}".encode())
        self.fingerprint = schema.fingerprint
        self.from_avro = cls.__choreo_from_avro__
        self.topic = topic_prefix + cls.topic()
        self.to_record: Callable[[Event], Any] = (
            (lambda e: e.__dict__) if cls.__choreo_trusted__ else (lambda e: _to_avro(e.model_dump()))
        )


class Wire:
    """Encoder and decoder for the event types one process uses.

    ``lookup`` is asked for writer schemas this process does not have locally (e.g. from a schema
    registry); without it, an unknown fingerprint is a ``DecodeError(reason="unknown-schema")``.
    """

    def __init__(
        self,
        producer: str,
        event_types: Iterable[type[Event]] = (),
        *,
        known: SchemaSet | None = None,
        lookup: Callable[[int], AvroSchema | None] | None = None,
        topic_prefix: str = "",
    ) -> None:
        self.producer = producer
        self.topic_prefix = topic_prefix
        self._producer_header = (_H_PROD, producer.encode())
        self._known = known if known is not None else SchemaSet()
        self._lookup = lookup
        self._types: dict[type[Event], _TypeInfo] = {}
        for cls in event_types:
            self.add(cls)

    def add(self, cls: type[Event]) -> _TypeInfo:
        info = self._types.get(cls)
        if info is None:
            schema = cls.avro_schema()
            if self._known.by_fingerprint(schema.fingerprint) is None:
                self._known.add(schema)
            info = _TypeInfo(cls, Codec(schema, self._known, self._lookup), self.topic_prefix)
            self._types[cls] = info
        return info

    def encode(
        self,
        event: Event,
        *,
        event_id: str,
        correlation_id: str,
        causation_id: str | None,
        key: str | None = None,
        occurred_at: str | None = None,
        topic: str | None = None,
    ) -> OutgoingRecord:
        info = self._types.get(type(event)) or self.add(type(event))
        value = info.codec.encode(info.to_record(event))
        correlation = correlation_id.encode()
        headers: list[tuple[str, bytes | None]] = [
            (_H_ID, event_id.encode()),
            info.type_header,
            info.schema_header,
            (_H_CORR, correlation),
            (_H_AT, (occurred_at or utc_now_iso()).encode()),
            self._producer_header,
        ]
        if causation_id is not None:
            headers.append((_H_CAUSE, causation_id.encode()))
        return OutgoingRecord(topic or info.topic, key.encode() if key else correlation, value, headers)

    def decode(self, record: Record, cls: type[Event]) -> tuple[Envelope, Event]:
        """The envelope and typed event of ``record``, expected to hold a ``cls`` event.

        Raises ``DecodeError`` with ``reason`` one of: missing-header, bad-header, wrong-type,
        not-avro, unknown-schema, invalid (the value fails the model's validation).
        """
        info = self._types.get(cls) or self.add(cls)
        headers: dict[str, Any] = dict(record.headers)
        try:
            event_type = headers[_H_TYPE]
            event_id = headers[_H_ID].decode()
            correlation = headers[_H_CORR].decode()
            occurred = headers[_H_AT].decode()
            producer = headers[_H_PROD].decode()
            schema = headers[_H_SCHEMA]
            # The reader's own schema, nearly always: a comparison instead of parsing hex.
            fingerprint = info.fingerprint if schema == info.schema_header[1] else int(schema, 16)
            cause = headers.get(_H_CAUSE)
            attempt = headers.get(_H_ATTEMPT)
            causation_id = cause.decode() if cause else None
            attempts = int(attempt) if attempt else 1
        except KeyError as exc:
            raise DecodeError(f"header {exc.args[0]!r} is missing", reason="missing-header") from None
        except (AttributeError, TypeError, UnicodeDecodeError, ValueError) as exc:
            raise DecodeError(f"malformed header: {exc}", reason="bad-header") from None
        if not (event_id and correlation and occurred and producer):
            empty = next(n for n, v in ((_H_ID, event_id), (_H_CORR, correlation), (_H_AT, occurred),
                                        (_H_PROD, producer)) if not v)
            raise DecodeError(f"malformed header: header {empty!r} is empty", reason="bad-header")
        if event_type != info.type_bytes:
            shown = event_type.decode(errors="replace") if isinstance(event_type, bytes) else event_type
            raise DecodeError(
                f"event type {shown!r} on topic {record.topic}, which carries {info.type_name}",
                reason="wrong-type",
            )
        env = Envelope(
            event_id, info.type_name, correlation, causation_id, occurred, producer, fingerprint, attempts,
            record.key, record.topic, record.partition, record.offset, record.headers,
        )
        if record.value is None:
            raise DecodeError("the record has no value", reason="not-avro")
        data = info.codec.decode(record.value)
        try:
            event = info.from_avro(data)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise DecodeError(
                f"value fails {cls.__name__} validation at {where}: {first['msg']}", reason="invalid"
            ) from None
        return env, event


