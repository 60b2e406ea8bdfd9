"""Records that are not valid choreo events: each gets one clear error naming topic, partition,
offset and reason, and goes to the dead-letter topic with that reason and its original bytes; the
records after it on its partition are processed in order, nothing is skipped."""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path

import pytest
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from pydantic import Field

from choreo import Context, DLQHeader, Event, Header, Service, Settings
from choreo.deadletter import last_header
from choreo.wire import Wire
from services.events import SCHEMAS as CHECKOUT, OrderPlaced
from tests.integration.helpers import orders

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


class StrictOrder(Event, schema=CHECKOUT / "order_placed.v1.avsc"):
    """The same wire type as OrderPlaced, with a rule Avro cannot express."""

    order_id: str
    customer_id: str
    sku: str
    quantity: int = Field(gt=0)
    amount_cents: int


def _good_headers(wire_record_headers: list[tuple[str, bytes | None]]) -> list[tuple[str, bytes | None]]:
    return list(wire_record_headers)


@pytest.mark.timeout(90)
async def test_each_kind_of_bad_record_is_dead_lettered_with_its_reason(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    topic = settings.topic_prefix + OrderPlaced.topic()
    wire = Wire("test", topic_prefix=settings.topic_prefix)
    good = wire.encode(orders(1)[0], event_id="e-good", correlation_id="c1", causation_id=None)
    fp = struct.pack("<Q", 0x1234_5678_9ABC_DEF0)
    negative = wire.encode(
        OrderPlaced(order_id="o-neg", customer_id="c", sku="s", quantity=-5, amount_cents=1),
        event_id="e-neg", correlation_id="c2", causation_id=None,
    )
    bad = {
        0: (b"this is not avro", good.headers, "not-avro"),
        1: (b"\xc3\x01" + fp + b"\x02", good.headers, "unknown-schema"),
        2: (good.value, [h for h in good.headers if h[0] != Header.EVENT_ID], "missing-header"),
        3: (negative.value, negative.headers, "invalid"),
    }
    seen: list[str] = []
    service = Service("strict", settings=settings.model_copy(update={"topic_partitions": 5}))

    @service.on(StrictOrder)
    async def handle(event: StrictOrder, ctx: Context) -> None:
        seen.append(event.order_id)

    await service.start()
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 5})
    for partition, (value, headers, _) in bad.items():
        producer.produce(topic, value, b"k", partition=partition, headers=headers)
        # A good record (its own event) after the bad one is processed in order: nothing is skipped.
        after = wire.encode(orders(1)[0], event_id=f"e-after-{partition}", correlation_id="c1", causation_id=None)
        producer.produce(topic, after.value, b"k", partition=partition, headers=after.headers)
    producer.produce(topic, good.value, b"k", partition=4, headers=good.headers)
    assert producer.flush(10) == 0

    caplog.set_level(logging.ERROR, logger="choreo")
    try:
        for _ in range(300):
            await service.poll_once()
            if len(service.stats.dead_lettered) == 4 and len(seen) == 5:
                break
    finally:
        await service.close()

    # The good record behind each bad one ran too, and the healthy partition's.
    assert seen == [good_order_id()] * 5
    dlq = topic + ".dlq"
    assert sorted(service.stats.dead_lettered) == sorted((topic, p, 0, reason) for p, (_, _, reason) in bad.items())
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{settings.topic_prefix}check",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    consumer.assign([TopicPartition(dlq, p, 0) for p in range(5)])
    dead: dict[int, Any] = {}
    for _ in range(100):
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            headers = msg.headers() or []
            dead[int(last_header(headers, DLQHeader.PARTITION) or -1)] = (msg.value(), headers)
        if len(dead) == 4:
            break
    consumer.close()
    for partition, (value, headers, reason) in bad.items():
        got_value, got_headers = dead[partition]
        assert got_value == value, "the original bytes are kept"
        assert last_header(got_headers, DLQHeader.REASON) == reason
        assert last_header(got_headers, DLQHeader.TOPIC) == topic
        assert last_header(got_headers, DLQHeader.OFFSET) == "0"
        messages = [r.getMessage() for r in caplog.records if f"{topic} [{partition}] offset 0" in r.getMessage()]
        assert len(messages) == 1, messages
        assert reason in messages[0] and ".dlq" in messages[0]


def good_order_id() -> str:
    return orders(1)[0].order_id
