"""A relay service that SIGKILLs itself at a chosen point of the delivery pipeline (for crash tests).

``CRASH_AT`` is one of: in-handler, before-produce, after-produce, before-done, before-commit.
The crash happens in the ``CRASH_BATCH``-th batch that reaches that point. Run as
``python -m choreo.cli run tests.integration.apps.crashy:service``.

The handler counts its runs in Redis without any guard (``runs`` hash), so a test can see that the
crash really made an event run twice, and emits one ``InventoryReserved`` per ``OrderPlaced``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis

from choreo import Context, Service, Settings
from choreo.idempotency import ClaimResult
from choreo.stores.redis import RedisIdempotencyStore
from choreo.transport import OutgoingRecord, TopicPartition
from choreo.transport.kafka import KafkaTransport
from services.events import InventoryReserved, OrderPlaced

CRASH_AT = os.environ.get("CRASH_AT", "")
CRASH_BATCH = int(os.environ.get("CRASH_BATCH", "3"))
_seen: dict[str, int] = {}


def _maybe_crash(point: str) -> None:
    if point != CRASH_AT:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] >= CRASH_BATCH:
        os.kill(os.getpid(), signal.SIGKILL)


class CrashingTransport(KafkaTransport):
    def send(self, records: Sequence[OutgoingRecord]):  # type: ignore[no-untyped-def]
        if records:
            _maybe_crash("before-produce")
        future = super().send(records)
        if records:
            _maybe_crash("after-produce")  # produced into librdkafka's queue, acks not yet seen
        return future

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if offsets:
            _maybe_crash("before-commit")
        super().commit(offsets)


class CountingStore(RedisIdempotencyStore):
    async def claim(self, keys: Sequence[str], owner: str, lease_ms: int) -> list[ClaimResult]:
        results = await super().claim(keys, owner, lease_ms)
        skipped = sum(1 for r in results if r is ClaimResult.DONE)
        if skipped:
            await self.redis.hincrby(f"{settings.redis_prefix}crashy:stats", "skipped", skipped)
        return results

    async def finish(self, done: Sequence[str], released: Sequence[str], owner: str, ttl_ms: int) -> None:
        if done:
            _maybe_crash("before-done")
        await super().finish(done, released, owner, ttl_ms)


settings = Settings.from_env()
service = Service(
    "crashy",
    settings=settings,
    transport=CrashingTransport(settings, client_id="crashy"),
    idempotency=CountingStore(settings.redis_url),
)
_redis = aioredis.Redis.from_url(settings.redis_url)


@service.on(OrderPlaced, emits=[InventoryReserved])
async def relay(event: OrderPlaced, ctx: Context) -> None:
    await _redis.hincrby(f"{settings.redis_prefix}crashy:runs", event.order_id, 1)
    _maybe_crash("in-handler")
    ctx.emit(InventoryReserved(order_id=event.order_id, sku=event.sku, quantity=event.quantity))
