"""Metrics scraped over HTTP during real runs: a service's outcomes, durations, waits and lag on the
real broker, and the saga tracker's saga outcomes for the checkout system."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

import pytest

from choreo import Context, DeadLetterNow, Publisher, RetryLater, Service, Settings
from services.events import OrderPlaced
from tests.integration.helpers import ServiceProcess, eventually, orders, publish
from tests.integration.test_checkout import FAILURES, STOCK, TARGETS, Checkout, _ids, _order, checkout  # noqa: F401
from tests.unit.test_metrics import _value

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _scrape(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())


@pytest.mark.timeout(120)
async def test_a_running_service_reports_what_happened(settings: Settings) -> None:
    port = _free_port()
    service = Service("metered", settings=settings.model_copy(update={"metrics_port": port}))
    flaky, bad = {"order-000003", "order-000007"}, {"order-000005"}
    tries: dict[str, int] = {}

    @service.on(OrderPlaced)
    async def take(event: OrderPlaced, ctx: Context) -> None:
        tries[event.order_id] = tries.get(event.order_id, 0) + 1
        if event.order_id in flaky and tries[event.order_id] <= 2:
            raise RetryLater("not yet", delay_s=0.01)
        if event.order_id in bad:
            raise DeadLetterNow("refused")

    events = orders(40)
    await service.start()
    task = asyncio.create_task(service.run())
    try:
        async with Publisher("web", settings=settings) as publisher:
            await publisher.publish_many(events)
        labels = {"service": "metered", "handler": "take", "event_type": "checkout.OrderPlaced"}

        async def reported() -> None:  # scraped while the service runs
            text = await _scrape(port)
            assert _value(text, "choreo_events_total", outcome="ok", **labels) == 39
            assert _value(text, "choreo_events_total", outcome="dead_lettered", **labels) == 1
            assert _value(text, "choreo_events_total", outcome="retried", **labels) == 4
            assert _value(text, "choreo_events_total", outcome="failed", **labels) == 5
            assert _value(text, "choreo_handler_duration_seconds_count", outcome="ok", **labels) == 39
            assert _value(text, "choreo_dependency_wait_seconds_count", **labels) == 44  # 40 events + 4 retries
            topic = settings.topic_prefix + OrderPlaced.topic()
            assert all(_value(text, "choreo_consumer_lag", topic=topic, partition=str(p)) >= 0 for p in range(4))

        await eventually(reported, 60)
        assert not task.done()
    finally:
        service.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
def checkout_env() -> dict[str, str]:
    return {**FAILURES, "TEST_NOT_STARTED": "tracker"}  # the test starts the tracker with its metrics port


@pytest.mark.timeout(150)
async def test_the_tracker_reports_saga_outcomes(checkout: Checkout, tmp_path: Path) -> None:
    port = _free_port()
    checkout.procs["tracker"] = ServiceProcess(TARGETS["tracker"], checkout.settings, tmp_path / "tracker.log",
                                               **checkout.env, CHOREO_METRICS_PORT=str(port))
    await checkout.redis.hset(f"{checkout.prefix}inventory:stock", mapping=STOCK)
    happy, declined = _ids("happy", True)[0], _ids("declined", True)[0]
    await publish(checkout.settings, [_order(happy), _order(declined, amount=45_000)])
    await checkout.wait_ended(2, 90)

    async def reported() -> None:
        text = await _scrape(port)
        assert _value(text, "choreo_saga_duration_seconds_count", saga="checkout", outcome="completed") == 1
        assert _value(text, "choreo_saga_duration_seconds_count", saga="checkout", outcome="compensated") == 1
        assert _value(text, "choreo_sagas_running") == 0 and _value(text, "choreo_sagas_overdue") == 0

    await eventually(reported, 60)
