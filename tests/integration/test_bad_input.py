"""Records that are not valid choreo events: each gets one clear error naming topic, partition,
offset and reason, and stops its partition there (until dead-letter topics exist); nothing after it
on that partition is skipped, and the other partitions go on."""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path

import pytest
from confluent_kafka import Producer
from pydantic import Field

from choreo import Context, Event, Header, Service, Settings
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
async def test_each_kind_of_bad_record_halts_only_its_partition(
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
        # A good record after the bad one must not be processed (nothing is skipped).
        producer.produce(topic, good.value, b"k", partition=partition, headers=good.headers)
    producer.produce(topic, good.value, b"k", partition=4, headers=good.headers)
    assert producer.flush(10) == 0

    caplog.set_level(logging.ERROR, logger="choreo")
    try:
        for _ in range(300):
            await service.poll_once()
            if len(service.stats.halted) == 4 and seen:
                break
        # A few more polls: paused partitions must stay paused.
        for _ in range(10):
            await service.poll_once()
    finally:
        await service.close()

    assert seen == [good_order_id()], "only the record on the healthy partition 4 runs"
    for partition, (_, _, reason) in bad.items():
        assert service.stats.halted[(topic, partition)].startswith(f"offset 0: {reason}")
        messages = [r.getMessage() for r in caplog.records if f"{topic} [{partition}] offset 0" in r.getMessage()]
        assert len(messages) == 1, messages
        assert reason in messages[0] and "stopped" in messages[0]


def good_order_id() -> str:
    return orders(1)[0].order_id
