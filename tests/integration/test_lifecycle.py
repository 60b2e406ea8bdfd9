"""Start-up errors name what is wrong and where; SIGTERM finishes in-flight work and commits."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from choreo import (
    ConfigurationError, Context, IdempotencyError, Publisher, Service, Settings, TransportError,
)
from services.events import InventoryReserved, OrderPlaced
from tests.integration.helpers import ServiceProcess, Sink, orders, publish, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _service(settings: Settings) -> Service:
    service = Service("lifecycle", settings=settings)

    @service.on(OrderPlaced)
    async def handle(event: OrderPlaced, ctx: Context) -> None:
        return None

    return service


@pytest.mark.timeout(60)
async def test_unreachable_broker_is_one_clear_error_naming_the_address(settings: Settings) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    service = _service(settings.model_copy(update={"kafka_bootstrap": address}))
    with pytest.raises(TransportError, match=f"cannot reach Kafka at {address}"):
        await service.start()
    await service.close()


@pytest.mark.timeout(60)
async def test_unreachable_redis_is_one_clear_error_naming_the_address(settings: Settings) -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    service = _service(settings.model_copy(update={"redis_url": url}))
    with pytest.raises(IdempotencyError, match=f"cannot reach Redis at {url}"):
        await service.start()
    await service.close()


@pytest.mark.timeout(60)
async def test_missing_topic_with_creation_disabled_names_the_topic(settings: Settings) -> None:
    service = _service(settings.model_copy(update={"create_topics": False}))
    topic = settings.topic_prefix + OrderPlaced.topic()
    with pytest.raises(ConfigurationError, match=f"topics missing .*{topic}"):
        await service.start()
    await service.close()


@pytest.mark.timeout(60)
async def test_publisher_returns_after_the_broker_acknowledged(settings: Settings) -> None:
    async with Publisher("web", settings=settings) as publisher:
        event_id = await publisher.publish(orders(1)[0])
    async with Sink(settings, OrderPlaced) as sink:
        await sink.wait_for(1, 30)
        assert await sink.redis.smembers(sink.ids_key) == {event_id}


@pytest.mark.timeout(120)
async def test_sigterm_finishes_in_flight_work_and_commits(settings: Settings, tmp_path: Path) -> None:
    """After SIGTERM the service exits 0; a restart re-runs nothing (everything done was committed)."""
    await publish(settings, orders(300))
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    runs_key = f"{settings.redis_prefix}crashy:runs"
    first = ServiceProcess("tests.integration.apps.crashy:service", settings, tmp_path / "1.log",
                           CHOREO_BATCH_SIZE="20")
    try:
        async def some() -> bool:
            return int(await r.hlen(runs_key)) >= 40
        await wait_until(some, 60, "some orders to run")
        assert first.terminate() == 0, first.output()[-2000:]
        assert "service crashy stopped" in first.output()
        second = ServiceProcess("tests.integration.apps.crashy:service", settings, tmp_path / "2.log")
        async with Sink(settings, InventoryReserved) as sink:
            effects = await sink.wait_for(300, 60)
        assert second.terminate() == 0
        assert set(effects.values()) == {1}
        runs = {k: int(v) for k, v in (await r.hgetall(runs_key)).items()}
        assert len(runs) == 300 and set(runs.values()) == {1}, "a clean stop leaves nothing to re-run"
        skipped = int(await r.hget(f"{settings.redis_prefix}crashy:stats", "skipped") or 0)
        assert skipped == 0, "offsets of finished work were committed before exit"
    finally:
        await r.aclose()
