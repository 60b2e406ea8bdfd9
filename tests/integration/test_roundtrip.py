"""Every event type round-trips through the broker; schemas evolve compatibly in both directions,
the reader finding the writer's schema on the schema topic by fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from choreo import Context, Event, Publisher, Service, Settings
from services import events as checkout

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

ALL_TYPES = [t for t in vars(checkout).values() if isinstance(t, type) and issubclass(t, Event) and t is not Event]
SAMPLES: list[Event] = [
    checkout.OrderPlaced(order_id="o1", customer_id="c1", sku="widget", quantity=2, amount_cents=1999),
    checkout.InventoryReserved(order_id="o1", sku="widget", quantity=2, customer_id="c1", amount_cents=1999),
    checkout.InventoryRejected(order_id="o2", sku="gadget", reason="out of stock: ünïcödé ✓", customer_id="c2"),
    checkout.InventoryReleased(order_id="o1", sku="widget", quantity=2, customer_id="c1"),
    checkout.PaymentCaptured(order_id="o1", payment_id="p1", amount_cents=1999, customer_id="c1"),
    checkout.PaymentDeclined(order_id="o3", reason="card declined", customer_id="c3"),
    checkout.PaymentRefunded(order_id="o1", payment_id="p1", amount_cents=1999, customer_id="c1"),
    checkout.OrderConfirmed(order_id="o1", customer_id="c1", amount_cents=1999),
    checkout.ShipmentScheduled(order_id="o1", shipment_id="s1", customer_id="c1"),
    checkout.ShipmentCancelled(order_id="o1", customer_id="c1", shipment_id="s1"),
    checkout.ShippingUnavailable(order_id="o4", reason="no carrier", customer_id="c4"),
    checkout.OrderCancelled(order_id="o4", reason="no carrier", customer_id="c4"),
    checkout.CustomerNotified(order_id="o1", customer_id="c1", outcome="shipped"),
]


async def _consume(service: Service, expected: int, polls: int = 400) -> None:
    await service.start()
    try:
        for _ in range(polls):
            await service.poll_once()
            if service.stats.processed >= expected:
                return
        raise AssertionError(f"processed {service.stats.processed} of {expected}")
    finally:
        await service.close()


@pytest.mark.timeout(60)
async def test_every_event_type_round_trips(settings: Settings) -> None:
    assert {type(s) for s in SAMPLES} == set(ALL_TYPES)
    received: list[tuple[Event, str, str | None]] = []
    service = Service("roundtrip", settings=settings)
    for cls in ALL_TYPES:
        @service.on(cls, name=f"got_{cls.__name__}")
        async def got(event: Event, ctx: Context) -> None:
            received.append((event, ctx.envelope.event_type, ctx.envelope.producer))

    async with Publisher("web", settings=settings) as publisher:
        await publisher.publish_many(SAMPLES)
    await _consume(service, len(SAMPLES))
    assert sorted((repr(e) for e, _, _ in received)) == sorted(repr(s) for s in SAMPLES)
    for event, event_type, producer in received:
        assert event_type == type(event).event_type() and producer == "web"


def _widget_schema(directory: Path, extra_fields: list[dict[str, object]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "widget.v1.avsc"
    path.write_text(json.dumps({
        "type": "record", "name": "Widget", "namespace": "evo", "version": 1,
        "fields": [{"name": "widget_id", "type": "string"}, {"name": "qty", "type": "int"}, *extra_fields],
    }))
    return path


@pytest.mark.timeout(90)
@pytest.mark.parametrize("direction", ["old-writer-new-reader", "new-writer-old-reader"])
async def test_compatible_schema_evolution(direction: str, settings: Settings, tmp_path: Path) -> None:
    old_path = _widget_schema(tmp_path / "old", [])
    new_path = _widget_schema(tmp_path / "new", [{"name": "colour", "type": "string", "default": "red"}])

    class WidgetV1(Event, schema=old_path):
        widget_id: str
        qty: int

    class WidgetV1b(Event, schema=new_path):
        widget_id: str
        qty: int
        colour: str = "red"

    assert WidgetV1.topic() == WidgetV1b.topic()
    assert WidgetV1.avro_schema().fingerprint != WidgetV1b.avro_schema().fingerprint
    writer, reader = (WidgetV1, WidgetV1b) if direction == "old-writer-new-reader" else (WidgetV1b, WidgetV1)
    sample = writer(widget_id="w1", qty=3) if writer is WidgetV1 else writer(widget_id="w1", qty=3, colour="blue")

    received: list[Event] = []
    service = Service("evolution", settings=settings)

    @service.on(reader)
    async def got(event: Event, ctx: Context) -> None:
        received.append(event)

    # The reader process has never seen the writer's schema: it must come from the schema topic.
    async with Publisher("writer", settings=settings) as publisher:
        await publisher.publish(sample)
    await _consume(service, 1)
    assert len(received) == 1 and type(received[0]) is reader
    if reader is WidgetV1b:
        assert received[0] == WidgetV1b(widget_id="w1", qty=3, colour="red")  # the reader's default
    else:
        assert received[0] == WidgetV1(widget_id="w1", qty=3)  # the new field is dropped
