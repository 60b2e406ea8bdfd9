"""Publishing from outside handlers: async and blocking, acknowledged, idempotent with a fixed id."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from choreo import BlockingPublisher, PublishError, Publisher, Settings, TransportError
from services.events import OrderPlaced
from tests.integration.helpers import ROOT, Sink, orders

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


@pytest.mark.timeout(60)
async def test_blocking_publisher_returns_after_the_ack(settings: Settings) -> None:
    def publish() -> list[str]:
        with BlockingPublisher("script", settings=settings) as publisher:
            return [publisher.publish(e) for e in orders(3)]

    ids = await asyncio.to_thread(publish)
    async with Sink(settings, OrderPlaced) as sink:
        await sink.wait_for(3, 30)
        assert await sink.redis.smembers(sink.ids_key) == set(ids)


@pytest.mark.timeout(60)
async def test_publishing_the_same_event_id_twice_has_one_effect(settings: Settings) -> None:
    event = orders(1)[0]
    async with Publisher("web", settings=settings) as publisher:
        await publisher.publish(event, event_id="fixed-id")
        await publisher.publish(event, event_id="fixed-id")  # e.g. a retried HTTP request
        await publisher.publish(orders(2, prefix="other")[1])  # a marker that comes after both
    async with Sink(settings, OrderPlaced) as sink:
        effects = await sink.wait_for(2, 30)
        await asyncio.sleep(0.5)
        assert effects[event.order_id] == 1
        assert sink.service.stats.skipped_duplicates + sink.service.stats.processed >= 3


@pytest.mark.timeout(60)
async def test_publish_to_an_unreachable_broker_fails_clearly(settings: Settings) -> None:
    publisher = Publisher("web", settings=settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1"}))
    with pytest.raises(TransportError, match="127.0.0.1:1"):
        await publisher.start()
    await publisher.close()
    assert issubclass(PublishError, TransportError)


@pytest.mark.timeout(60)
def test_choreo_dev_prints_addresses_and_stops_on_ctrl_c() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "choreo.cli", "dev", "--kafka-port", "0", "--redis-port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("CHOREO_")})
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while not any(line.startswith("CHOREO_REDIS=") for line in lines):
        assert time.monotonic() < deadline, lines
        line = proc.stdout.readline()
        assert line, f"choreo dev exited early: {lines}"
        lines.append(line.strip())
    assert any(line.startswith("CHOREO_KAFKA=127.0.0.1:") for line in lines)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "stopped" in out


@pytest.mark.timeout(60)
async def test_a_send_is_acknowledged_without_waiting_for_linger(settings: Settings) -> None:
    # A service waits for its batch's acks before marking events done: the transport flushes each send
    # at once, so even a linger of a minute does not hold it (the waits below would fail long before).
    lingering = settings.model_copy(update={"linger_ms": 60_000, "kafka_config": {**settings.kafka_config,
                                                                     "message.timeout.ms": 120_000}})
    async with Publisher("lingering", settings=lingering) as publisher:
        ids = await asyncio.wait_for(publisher.publish_many(orders(20, prefix="linger")), 20)
        await asyncio.wait_for(publisher.publish(orders(1, prefix="linger-one")[0]), 20)
    async with Sink(settings, OrderPlaced) as sink:
        await sink.wait_for(21, 30)
        assert set(ids) <= await sink.redis.smembers(sink.ids_key)
