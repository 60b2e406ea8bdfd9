"""Events (typed pydantic models bound to Avro schemas) and the envelope that carries their metadata.

An event class names its schema file when it is defined::

    class OrderPlaced(Event, schema=SCHEMAS / "checkout/order_placed.v1.avsc"):
        order_id: str
        amount_cents: int

The model is checked against the schema right there, so a model that disagrees with its schema fails
at import, naming the field. The topic defaults to ``<namespace>.<kebab-case name>.v<version>``
(``checkout.order-placed.v1``); pass ``topic="..."`` to override it.

Metadata never lives in the model: it travels in Kafka headers (see ``Header``) and is read into an
``Envelope``.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import Any, ClassVar, Union

from pydantic import BaseModel, ConfigDict

from choreo.errors import ConfigurationError
from choreo.schemas import AvroSchema, load_schema, check_model


class Header:
    """Kafka header names choreo writes and reads. All values are UTF-8 strings."""

    EVENT_ID = "choreo-event-id"
    EVENT_TYPE = "choreo-event-type"
    SCHEMA = "choreo-schema"  # writer fingerprint, 16 hex digits (also inside the value)
    CORRELATION_ID = "choreo-correlation-id"
    CAUSATION_ID = "choreo-causation-id"
    OCCURRED_AT = "choreo-occurred-at"  # ISO 8601, UTC, milliseconds
    PRODUCER = "choreo-producer"
    ATTEMPT = "choreo-attempt"

    REQUIRED = (EVENT_ID, EVENT_TYPE, SCHEMA, CORRELATION_ID, OCCURRED_AT, PRODUCER)


#: model_config keys that make pydantic check or change values, so a decoded value must be validated.
_VALIDATING_CONFIG = ("str_strip_whitespace", "str_to_lower", "str_to_upper", "str_min_length",
                      "str_max_length")

_PLAIN_TYPES: frozenset[Any] = frozenset({int, str, float, bool, bytes, type(None)})


def _is_plain(annotation: Any) -> bool:
    """True for annotations whose Avro-decoded value needs no conversion or validation by pydantic."""
    if annotation in _PLAIN_TYPES:
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return all(_is_plain(arg) for arg in typing.get_args(annotation))
    return False


def _kebab(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", name).lower()


def default_topic(schema: AvroSchema) -> str:
    """The topic convention: ``<namespace>.<kebab-case name>.v<major version>``."""
    namespace, _, name = schema.full_name.rpartition(".")
    base = f"{namespace}.{_kebab(name)}" if namespace else _kebab(name)
    return f"{base}.v{schema.version}"


class Event(BaseModel):
    """Base class of every domain event.

    Subclasses pass ``schema=<path to .avsc>`` (and optionally ``topic=...``) as class keywords.
    Instances are immutable. Validation happens when user code builds an event; on the consuming side
    values already validated by Avro are trusted when the model has only plain fields (no validators,
    no constraints), which keeps decoding cheap, and are fully validated otherwise.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    __choreo_schema__: ClassVar[AvroSchema]
    __choreo_topic__: ClassVar[str]
    __choreo_trusted__: ClassVar[bool]
    __choreo_from_avro__: ClassVar[Callable[[dict[str, Any]], Event]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The class keywords are consumed by __pydantic_init_subclass__, which runs once the fields exist.
        super().__init_subclass__()

    @classmethod
    def __pydantic_init_subclass__(
        cls, *, schema: str | Path | AvroSchema | None = None, topic: str | None = None, **kwargs: Any
    ) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if schema is None:
            if not hasattr(cls, "__choreo_schema__"):
                return  # an abstract intermediate base; concrete events must name a schema
            bound = cls.__choreo_schema__
        else:
            bound = schema if isinstance(schema, AvroSchema) else load_schema(schema)
        check_model(cls, bound)
        cls.__choreo_schema__ = bound
        cls.__choreo_topic__ = topic or default_topic(bound)
        _check_topic_name(cls.__choreo_topic__, cls.__name__)
        cls.__choreo_trusted__ = not cls.__private_attributes__ and cls.__pydantic_post_init__ is None and not any(
            cls.model_config.get(k) for k in _VALIDATING_CONFIG) and not (
            cls.__pydantic_decorators__.field_validators) and not (
            cls.__pydantic_decorators__.model_validators
        ) and all(
            _is_plain(f.annotation) and not f.metadata for f in cls.model_fields.values()
        )
        cls.__choreo_from_avro__ = _trusted_builder(cls) if cls.__choreo_trusted__ else cls.model_validate

    @classmethod
    def event_type(cls) -> str:
        """The Avro full name, e.g. ``checkout.OrderPlaced``; written to the event-type header."""
        return cls.avro_schema().full_name

    @classmethod
    def avro_schema(cls) -> AvroSchema:
        try:
            return cls.__choreo_schema__
        except AttributeError:
            raise ConfigurationError(
                f"{cls.__qualname__} is not bound to a schema: declare it as "
                f"class {cls.__name__}(Event, schema=<path to .avsc>)"
            ) from None

    @classmethod
    def topic(cls) -> str:
        cls.avro_schema()
        return cls.__choreo_topic__

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> Event:
        """Build an event from an Avro-decoded record (pydantic.ValidationError if it fails the model)."""
        return cls.__choreo_from_avro__(record)


def _trusted_builder(cls: type[Event]) -> Callable[[dict[str, Any]], Event]:
    """What model_construct does, minus defaults handling: Avro resolution already filled every field
    of the reader schema, which check_model proved equal to the model's fields. Through BaseModel's
    slot descriptors, bound once: this runs for every event a service decodes."""
    new, set_dict = object.__new__, object.__setattr__
    slots = vars(BaseModel)
    set_fields = slots["__pydantic_fields_set__"].__set__
    set_extra = slots["__pydantic_extra__"].__set__
    set_private = slots["__pydantic_private__"].__set__

    def build(record: dict[str, Any]) -> Event:
        event = new(cls)
        set_dict(event, "__dict__", record)
        set_fields(event, set(record))
        set_extra(event, None)
        set_private(event, None)
        return event

    return build


_TOPIC_RE = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")


def _check_topic_name(topic: str, owner: str) -> None:
    if not _TOPIC_RE.match(topic) or topic in (".", ".."):
        raise ConfigurationError(
            f"{owner}: topic name {topic!r} is not valid for Kafka (letters, digits, '.', '_', '-', at most 249)"
        )


@dataclass(slots=True)
class Envelope:
    """Metadata of one event as it travels: read from, and written to, Kafka headers."""

    event_id: str
    event_type: str
    correlation_id: str
    causation_id: str | None
    occurred_at: str
    producer: str
    fingerprint: int
    attempt: int = 1
    key: bytes | None = None
    topic: str = ""
    partition: int = -1
    offset: int = -1
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)

    def occurred_at_datetime(self) -> datetime:
        return datetime.fromisoformat(self.occurred_at)


def utc_now_iso() -> str:
    """The occurred-at format: ISO 8601 in UTC with milliseconds, e.g. ``2026-11-25T13:01:02.345+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
