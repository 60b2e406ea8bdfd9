"""Retry topics with real processes, a real broker and Redis: while an event of a key waits in a
retry topic, the key's later events are parked behind it and every other key goes on; a SIGKILL
of the service while events are in retry loses nothing, duplicates nothing and keeps key order."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from choreo import Context, Publisher, Service, Settings
from choreo.retry import RetryState
from choreo.transport.kafka import KafkaTransport
from services.events import InventoryReserved, OrderPlaced
from tests.integration.helpers import ServiceProcess, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

KEYS, PER_KEY = 12, 25
# Two keys fail early and one late; each fails twice before it succeeds.
FAILING = {"k00-003", "k05-003", "k07-010"}


@pytest.mark.timeout(240)
async def test_key_order_holds_while_events_wait_in_retry_topics_through_a_sigkill(
    settings: Settings, tmp_path: Path
) -> None:
    events = [
        OrderPlaced(order_id=f"k{k:02d}-{seq:03d}", customer_id=f"k{k:02d}", sku="widget", quantity=1,
                    amount_cents=seq)
        for seq in range(PER_KEY) for k in range(KEYS)
    ]
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    counts, arrivals = f"{settings.redis_prefix}sink:counts", f"{settings.redis_prefix}sink:arrivals:"
    sink = Service("sink", settings=settings)

    @sink.on(InventoryReserved)
    async def count(event: InventoryReserved, ctx: Context) -> None:
        # No guard of its own: an effect choreo let happen twice shows up as a count of 2.
        await r.hincrby(counts, event.order_id, 1)
        await r.rpush(arrivals + event.order_id[:3], event.amount_cents)

    env = {"ORDERED_FAIL_IDS": ",".join(sorted(FAILING)), "ORDERED_DELAY_S": "2"}
    first = ServiceProcess("tests.integration.apps.ordered:service", settings, tmp_path / "ordered-1.log", **env)
    second: ServiceProcess | None = None
    await sink.start()

    sink_task = asyncio.create_task(sink.run())
    try:
        # Saga id = key: the broker keeps each key's events on one partition, in order.
        async with Publisher("web", settings=settings) as publisher:
            for start in range(0, len(events), 100):
                chunk = events[start:start + 100]
                await publisher.publish_many(chunk, correlation_ids=[e.customer_id for e in chunk])

        async def retrying() -> bool:
            attempts = await r.hgetall(f"{settings.redis_prefix}ordered:attempts")
            return any(int(v) >= 1 for v in attempts.values()) and int(await r.hlen(counts)) >= 50

        await wait_until(retrying, 120, "events in retry while others went on")
        first.kill()
        assert first.proc.returncode == -signal.SIGKILL
        assert int(await r.hlen(counts)) < len(events), "the kill must happen before the end"
        second = ServiceProcess("tests.integration.apps.ordered:service", settings, tmp_path / "ordered-2.log",
                                **env)

        async def all_arrived() -> bool:
            if sink_task.done():
                sink_task.result()
            return int(await r.hlen(counts)) >= len(events)

        await wait_until(all_arrived, 150, "every order at the sink")
        found = {k: int(v) for k, v in (await r.hgetall(counts)).items()}
        lost = {e.order_id for e in events} - set(found)
        duplicated = {k: v for k, v in found.items() if v > 1}
        assert (len(lost), len(duplicated)) == (0, 0), (lost, duplicated)
        for k in range(KEYS):
            seen = [int(s) for s in await r.lrange(f"{arrivals}k{k:02d}", 0, -1)]
            assert seen == list(range(PER_KEY)), f"key k{k:02d} out of order: {seen}"
        attempts = await r.hgetall(f"{settings.redis_prefix}ordered:attempts")
        assert {k: int(v) for k, v in attempts.items()} == {i: 3 for i in FAILING}

        transport = KafkaTransport(settings)
        await transport.connect()
        try:
            retried = await transport.read_all(settings.topic_prefix + OrderPlaced.topic() + ".retry.1")
        finally:
            await transport.close()
        states = [RetryState.read(rec.headers) for rec in retried]
        assert {s.origin[0] for s in states} == {settings.topic_prefix + OrderPlaced.topic()}
        assert any(s.attempts >= 1 and not s.parked for s in states), "failed events went through the topic"
        assert any(s.parked for s in states), "later events of a failing key were parked behind it"
    finally:
        first.kill() if first.proc.poll() is None else None
        if second is not None:
            assert second.terminate() == 0, second.output()[-3000:]
        sink.stop()
        await asyncio.wait_for(sink_task, 30)
        await r.aclose()
