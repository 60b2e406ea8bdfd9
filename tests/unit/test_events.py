"""Binding Event classes to Avro schemas: checks at class definition, topics, trust, immutability."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import pydantic
import pytest
from pydantic import ConfigDict, Field, field_validator, model_validator

from choreo import ConfigurationError, Event, SchemaError
from choreo.events import default_topic
from choreo.schemas import parse_schema


def snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def avsc(root: Path, name: str, fields: list[dict[str, Any]], *, namespace: str | None = "checkout",
         version: int = 1) -> Path:
    """Write ``<snake name>.v<version>.avsc`` under ``root`` and return its path."""
    schema: dict[str, Any] = {"type": "record", "name": name, "version": version, "fields": fields}
    if namespace:
        schema["namespace"] = namespace
    path = root / f"{snake(name)}.v{version}.avsc"
    path.write_text(json.dumps(schema))
    return path


ORDER_FIELDS = [{"name": "order_id", "type": "string"}, {"name": "quantity", "type": "int"}]


@pytest.fixture
def order_avsc(tmp_path: Path) -> Path:
    return avsc(tmp_path, "OrderPlaced", ORDER_FIELDS)


# --- binding -------------------------------------------------------------------------------------


def test_a_matching_model_binds_to_its_schema(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int

    assert OrderPlaced.avro_schema().full_name == "checkout.OrderPlaced"
    assert OrderPlaced.event_type() == "checkout.OrderPlaced"
    assert OrderPlaced.avro_schema().path == str(order_avsc)


def test_schema_may_be_given_as_a_string_path(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=str(order_avsc)):
        order_id: str
        quantity: int

    assert OrderPlaced.event_type() == "checkout.OrderPlaced"


def test_a_field_of_the_wrong_type_fails_at_class_definition_naming_the_field(order_avsc: Path) -> None:
    with pytest.raises(SchemaError) as info:

        class OrderPlaced(Event, schema=order_avsc):
            order_id: str
            quantity: str

    assert info.value.field == "quantity"
    assert "quantity" in str(info.value)
    assert str(order_avsc) in str(info.value)


def test_a_schema_field_missing_from_the_model_fails_naming_the_field(order_avsc: Path) -> None:
    with pytest.raises(SchemaError) as info:

        class OrderPlaced(Event, schema=order_avsc):
            order_id: str

    assert info.value.field == "quantity"


def test_a_model_field_missing_from_the_schema_fails_naming_the_field(order_avsc: Path) -> None:
    with pytest.raises(SchemaError) as info:

        class OrderPlaced(Event, schema=order_avsc):
            order_id: str
            quantity: int
            coupon: str

    assert info.value.field == "coupon"


def test_a_nullable_model_field_over_a_required_avro_field_fails(order_avsc: Path) -> None:
    with pytest.raises(SchemaError, match="quantity"):

        class OrderPlaced(Event, schema=order_avsc):
            order_id: str
            quantity: int | None


def test_a_missing_schema_file_fails_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "order_placed.v1.avsc"
    with pytest.raises(SchemaError, match=re.escape(str(missing))):

        class OrderPlaced(Event, schema=missing):
            order_id: str


def test_an_event_without_a_schema_is_an_abstract_base(order_avsc: Path) -> None:
    class Base(Event):
        pass

    with pytest.raises(ConfigurationError, match="not bound to a schema"):
        Base.avro_schema()
    with pytest.raises(ConfigurationError):
        Base.topic()

    class OrderPlaced(Base, schema=order_avsc):
        order_id: str
        quantity: int

    assert OrderPlaced.topic() == "checkout.order-placed.v1"


def test_a_subclass_of_a_bound_event_keeps_its_schema(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int

    class SpecialOrderPlaced(OrderPlaced):
        pass

    assert SpecialOrderPlaced.avro_schema() is OrderPlaced.avro_schema()


def test_a_parsed_schema_object_binds_like_a_path(order_avsc: Path) -> None:
    schema = parse_schema(order_avsc.read_text())

    class OrderPlaced(Event, schema=schema):
        order_id: str
        quantity: int

    assert OrderPlaced.avro_schema() is schema


# --- topics --------------------------------------------------------------------------------------


def test_default_topic_is_namespace_kebab_name_and_major_version(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int

    assert OrderPlaced.topic() == "checkout.order-placed.v1"


@pytest.mark.parametrize(
    ("name", "topic"),
    [
        ("HTTPRequestSent", "checkout.http-request-sent.v1"),
        ("SentHTTP", "checkout.sent-http.v1"),
        ("Paid", "checkout.paid.v1"),
        ("Order2Shipped", "checkout.order2-shipped.v1"),
    ],
)
def test_default_topic_kebab_cases_acronyms_and_digits(tmp_path: Path, name: str, topic: str) -> None:
    assert default_topic(parse_schema(json.dumps(
        {"type": "record", "name": name, "namespace": "checkout", "version": 1, "fields": []}
    ))) == topic


def test_default_topic_carries_the_major_version(tmp_path: Path) -> None:
    path = avsc(tmp_path, "OrderPlaced", ORDER_FIELDS, version=3)

    class OrderPlaced(Event, schema=path):
        order_id: str
        quantity: int

    assert OrderPlaced.topic() == "checkout.order-placed.v3"


def test_default_topic_without_a_namespace_is_just_the_name(tmp_path: Path) -> None:
    path = avsc(tmp_path, "OrderPlaced", ORDER_FIELDS, namespace=None)

    class OrderPlaced(Event, schema=path):
        order_id: str
        quantity: int

    assert OrderPlaced.topic() == "order-placed.v1"


def test_topic_keyword_overrides_the_convention(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc, topic="legacy_orders"):
        order_id: str
        quantity: int

    assert OrderPlaced.topic() == "legacy_orders"


@pytest.mark.parametrize("topic", ["has space", "slash/topic", "x" * 250, ".", "..", "ümlaut"])
def test_an_invalid_topic_name_fails_at_class_definition(order_avsc: Path, topic: str) -> None:
    with pytest.raises(ConfigurationError, match="OrderPlaced"):

        class OrderPlaced(Event, schema=order_avsc, topic=topic):
            order_id: str
            quantity: int


def test_the_longest_valid_topic_name_is_accepted(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc, topic="x" * 249):
        order_id: str
        quantity: int

    assert len(OrderPlaced.topic()) == 249


# --- trust on the consuming side -----------------------------------------------------------------


def test_a_model_with_only_plain_fields_is_trusted(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int

    assert OrderPlaced.__choreo_trusted__ is True


def test_optional_plain_fields_are_still_trusted(tmp_path: Path) -> None:
    path = avsc(tmp_path, "OrderPlaced", [
        {"name": "order_id", "type": "string"},
        {"name": "note", "type": ["null", "string"], "default": None},
    ])

    class OrderPlaced(Event, schema=path):
        order_id: str
        note: str | None = None

    assert OrderPlaced.__choreo_trusted__ is True


def test_a_field_validator_makes_a_model_untrusted(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int

        @field_validator("order_id")
        @classmethod
        def _upper(cls, value: str) -> str:
            return value.upper()

    assert OrderPlaced.__choreo_trusted__ is False


def test_a_model_validator_makes_a_model_untrusted(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int

        @model_validator(mode="after")
        def _check(self) -> OrderPlaced:
            return self

    assert OrderPlaced.__choreo_trusted__ is False


def test_a_field_constraint_makes_a_model_untrusted(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int = Field(gt=0)

    assert OrderPlaced.__choreo_trusted__ is False


def test_an_annotated_constraint_makes_a_model_untrusted(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: Annotated[str, Field(min_length=1)]
        quantity: int

    assert OrderPlaced.__choreo_trusted__ is False


def test_a_nested_model_makes_a_model_untrusted(tmp_path: Path) -> None:
    path = avsc(tmp_path, "OrderPlaced", [
        {"name": "order_id", "type": "string"},
        {"name": "line", "type": {"type": "record", "name": "Line", "fields": [
            {"name": "sku", "type": "string"}]}},
    ])

    class Line(pydantic.BaseModel):
        sku: str

    class OrderPlaced(Event, schema=path):
        order_id: str
        line: Line

    assert OrderPlaced.__choreo_trusted__ is False


def test_a_list_field_makes_a_model_untrusted(tmp_path: Path) -> None:
    path = avsc(tmp_path, "OrderPlaced", [{"name": "skus", "type": {"type": "array", "items": "string"}}])

    class OrderPlaced(Event, schema=path):
        skus: list[str]

    assert OrderPlaced.__choreo_trusted__ is False


def test_a_config_level_string_constraint_makes_a_model_untrusted(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        model_config = ConfigDict(str_max_length=3)
        order_id: str
        quantity: int

    assert OrderPlaced.__choreo_trusted__ is False
    with pytest.raises(pydantic.ValidationError):
        OrderPlaced.from_avro({"order_id": "too long", "quantity": 1})


def test_from_avro_validates_an_untrusted_model(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int = Field(gt=0)

    with pytest.raises(pydantic.ValidationError, match="quantity"):
        OrderPlaced.from_avro({"order_id": "o-1", "quantity": 0})
    assert OrderPlaced.from_avro({"order_id": "o-1", "quantity": 2}).quantity == 2


def test_from_avro_runs_validators_of_an_untrusted_model(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int

        @field_validator("order_id")
        @classmethod
        def _upper(cls, value: str) -> str:
            return value.upper()

    assert OrderPlaced.from_avro({"order_id": "o-1", "quantity": 1}).order_id == "O-1"


def test_from_avro_of_a_trusted_model_equals_the_validated_event(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int

    decoded = OrderPlaced.from_avro({"order_id": "o-1", "quantity": 2})
    assert decoded == OrderPlaced(order_id="o-1", quantity=2)
    assert decoded.model_fields_set == {"order_id", "quantity"}


# --- instances -----------------------------------------------------------------------------------


def test_events_are_frozen(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int

    event = OrderPlaced(order_id="o-1", quantity=1)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        event.quantity = 2  # assigning to a frozen model is the point
    assert hash(event) == hash(OrderPlaced(order_id="o-1", quantity=1))


def test_events_decoded_without_validation_are_frozen_too(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int

    event = OrderPlaced.from_avro({"order_id": "o-1", "quantity": 1})
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        event.quantity = 2  # assigning to a frozen model is the point


def test_events_reject_unknown_fields(order_avsc: Path) -> None:
    class OrderPlaced(Event, schema=order_avsc):
        order_id: str
        quantity: int

    with pytest.raises(pydantic.ValidationError, match="coupon"):
        OrderPlaced(order_id="o-1", quantity=1, coupon="x")  # type: ignore[call-arg]  # unknown on purpose
