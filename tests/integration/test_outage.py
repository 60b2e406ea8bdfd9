"""Redis goes away mid-run: no handler runs without its idempotency guard, the service keeps
retrying, and it resumes by itself when Redis is back; nothing is lost."""

from __future__ import annotations

import asyncio
import logging

import pytest

from choreo import Context, Publisher, Service, Settings
from choreo.devstack import start_dev_stack
from services.events import OrderPlaced
from tests.integration.helpers import orders

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.mark.timeout(120)
async def test_a_redis_outage_pauses_handlers_and_the_service_recovers(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    stack = start_dev_stack()  # its own Redis, so stopping it disturbs no other test
    try:
        local = settings.model_copy(update={"redis_url": stack.redis_url, "batch_size": 10, "max_backoff_ms": 500})
        service = Service("outage", settings=local)
        seen: list[str] = []

        @service.on(OrderPlaced)
        async def handle(event: OrderPlaced, ctx: Context) -> None:
            seen.append(event.order_id)

        events = orders(60)
        await service.start()
        async with Publisher("web", settings=local) as publisher:
            await publisher.publish_many(events[:20])
            for _ in range(300):
                await service.poll_once()
                if len(set(seen)) >= 20:
                    break
            stack.stop_redis()
            await publisher.publish_many(events[20:])
            before = len(seen)
            with caplog.at_level(logging.ERROR, logger="choreo"):
                for _ in range(20):  # about 2 s of trying while Redis is down
                    await service.poll_once()
            assert len(seen) == before, "no handler ran without its idempotency guard"
            assert any("Redis" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
            await asyncio.to_thread(stack.start_redis)
            for _ in range(600):
                await service.poll_once()
                if {e.order_id for e in events} <= set(seen):
                    break
        await service.close()
        assert {e.order_id for e in events} <= set(seen), "every event ran once Redis was back"
    finally:
        stack.stop()


@pytest.mark.kafka
@pytest.mark.timeout(180)
async def test_a_stalled_broker_loses_nothing_in_flight(settings: Settings) -> None:
    """The broker stops answering (SIGSTOP) while events are produced and consumed, then comes back:
    the events produced during the stall are delivered, and every event is handled."""
    import os
    import signal

    stack = start_dev_stack()  # its own broker, so stalling it disturbs no other test
    try:
        local = settings.model_copy(update={"kafka_bootstrap": stack.kafka_bootstrap, "batch_size": 20})
        service = Service("stall", settings=local)
        seen: set[str] = set()

        @service.on(OrderPlaced)
        async def handle(event: OrderPlaced, ctx: Context) -> None:
            seen.add(event.order_id)

        events = orders(100)
        await service.start()
        async with Publisher("web", settings=local) as publisher:
            await publisher.publish_many(events[:50])
            for _ in range(300):
                await service.poll_once()
                if len(seen) >= 50:
                    break
            pid = stack.broker_pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                # Publishing during the stall: the ack comes once the broker is back.
                pending = asyncio.ensure_future(publisher.publish_many(events[50:]))
                for _ in range(80):  # about 8 s: longer than the 6 s session timeout
                    await service.poll_once()
            finally:
                os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(pending, 60)
            for _ in range(1500):
                await service.poll_once()
                if len(seen) == 100:
                    break
        await service.close()
        assert seen == {e.order_id for e in events}
    finally:
        stack.stop()


@pytest.mark.kafka
@pytest.mark.timeout(180)
async def test_a_broker_that_lost_its_state_gets_a_fresh_producer(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """An idempotent producer whose broker restarted empty (Tansu keeps everything in memory) never
    delivers again; its timed-out send fails, the transport replaces the producer, and the next send
    is delivered."""
    from choreo.errors import PublishError
    from choreo.transport.kafka import KafkaTransport

    stack = start_dev_stack()  # its own broker: a restart empties it
    try:
        local = settings.model_copy(update={"kafka_bootstrap": stack.kafka_bootstrap,
                                            "kafka_config": {"message.timeout.ms": 4_000}})
        async with Publisher("web", settings=local) as publisher:
            first, second, third = orders(3)
            await publisher.publish(first)
            await asyncio.to_thread(stack.restart_broker)
            caplog.set_level(logging.WARNING, logger="choreo.kafka")
            failures = 0
            for event in (second, third):
                for _ in range(5):
                    try:
                        await publisher.publish(event)
                        break
                    except PublishError:
                        failures += 1
                else:
                    raise AssertionError(f"{event.order_id} was never delivered after the restart")
        reader = KafkaTransport(local)
        await reader.connect()
        try:
            got = await reader.read_all(local.topic_prefix + OrderPlaced.topic())
        finally:
            await reader.close()
        assert 1 <= failures <= 2, "the stuck producer failed, and a fresh one delivers at once"
        assert any("replacing the Kafka producer" in r.getMessage() for r in caplog.records)
        assert len(got) >= 2  # the restart emptied the topic: the two events published after it
    finally:
        stack.stop()
