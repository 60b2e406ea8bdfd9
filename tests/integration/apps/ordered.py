"""A relay whose handler fails for chosen orders with a long retry delay, for the retry-topic tests.

Run as ``python -m choreo.cli run tests.integration.apps.ordered:service``. Each ``OrderPlaced`` is
relayed as one ``InventoryReserved``. Orders named in ``ORDERED_FAIL_IDS`` (comma-separated) fail
their first two attempts with ``RetryLater(delay_s=ORDERED_DELAY_S)`` (default 2 s): longer than the
in-process limit, so they go through the retry topics while the partition moves on. Attempts are
counted in Redis (``<prefix>ordered:attempts``), so the count carries over a restart of the process.
"""

from __future__ import annotations

import os

import redis.asyncio as aioredis

from choreo import Context, RetryLater, RetryPolicy, Service, Settings
from services.events import InventoryReserved, OrderPlaced

settings = Settings.from_env()
FAIL_IDS = frozenset(i for i in os.environ.get("ORDERED_FAIL_IDS", "").split(",") if i)
DELAY_S = float(os.environ.get("ORDERED_DELAY_S", "2"))
service = Service("ordered", settings=settings, retry=RetryPolicy(max_attempts=5, in_process_max_s=0.5))
_redis = aioredis.Redis.from_url(settings.redis_url)
_attempts = f"{settings.redis_prefix}ordered:attempts"


@service.on(OrderPlaced, emits=[InventoryReserved])
async def relay(event: OrderPlaced, ctx: Context) -> None:
    if event.order_id in FAIL_IDS and await _redis.hincrby(_attempts, event.order_id, 1) <= 2:
        raise RetryLater(f"{event.order_id} is not ready", delay_s=DELAY_S)
    ctx.emit(InventoryReserved(order_id=event.order_id, sku=event.sku, quantity=event.quantity,
                               amount_cents=event.amount_cents))
