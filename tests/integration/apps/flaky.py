"""A relay service whose handler fails on purpose, for the real-process failure tests.

Run as ``python -m choreo.cli run tests.integration.apps.flaky:service``. It relays each
``OrderPlaced`` as one ``InventoryReserved`` (counted downstream by ``tests.integration.helpers.Sink``).
Its behaviour comes from environment variables:

``FLAKY_MODE``
    ``ok`` (default): never fails. ``fail-first``: the first ``FLAKY_FAILURES`` attempts at each
    targeted order raise ``FlakyError``; the attempts are counted in Redis, so the count carries over
    a restart of the process.
``FLAKY_FAILURES``
    How many attempts fail per targeted order (default 2).
``FLAKY_FAIL_IDS``
    Comma-separated order ids to target (default: every order).
``FLAKY_RETRY_DELAY_S``
    If set, the handler's retry policy waits exactly this long between attempts (no jitter), so a test
    can act while an event is between two attempts. Otherwise the service's default policy applies.
``FLAKY_SINK_REDIS``
    The Redis for the bookkeeping below (default ``CHOREO_REDIS``): a test that stops the service's
    Redis keeps its books in another one.

Bookkeeping, under ``<CHOREO_REDIS_PREFIX>flaky:`` in ``FLAKY_SINK_REDIS``:

* ``attempts`` (hash, order id -> attempts so far) and ``log:<order id>`` (list of
  ``"<attempt> <pid> <epoch seconds>"``), for targeted orders only;
* ``runs`` (hash, order id -> successful runs), incremented after the flaky part with no guard of its
  own: choreo runs a handler at least once, so a count of 2 is legal after a crash or a Redis outage,
  but the event emitted by both runs has the same id, so the downstream effect happens once.
"""

from __future__ import annotations

import os
import time

import redis.asyncio as aioredis

from choreo import Context, RetryPolicy, Service, Settings
from services.events import InventoryReserved, OrderPlaced

settings = Settings.from_env()
MODE = os.environ.get("FLAKY_MODE", "ok")
if MODE not in ("ok", "fail-first"):
    raise SystemExit(f"FLAKY_MODE must be 'ok' or 'fail-first', got {MODE!r}")
FAILURES = int(os.environ.get("FLAKY_FAILURES", "2"))
FAIL_IDS = frozenset(i for i in os.environ.get("FLAKY_FAIL_IDS", "").split(",") if i)
_delay = os.environ.get("FLAKY_RETRY_DELAY_S")
RETRY = (
    RetryPolicy(max_attempts=FAILURES + 3, initial_delay_s=float(_delay), max_delay_s=float(_delay),
                multiplier=1.0, random=lambda: 1.0)
    if _delay else None
)
PREFIX = f"{settings.redis_prefix}flaky:"

_books = aioredis.Redis.from_url(os.environ.get("FLAKY_SINK_REDIS", settings.redis_url), decode_responses=True)

service = Service("flaky", settings=settings)


class FlakyError(Exception):
    """The simulated failure of a dependency."""


@service.on(OrderPlaced, emits=[InventoryReserved], retry=RETRY)
async def relay(event: OrderPlaced, ctx: Context) -> None:
    order = event.order_id
    if MODE == "fail-first" and (not FAIL_IDS or order in FAIL_IDS):
        attempt = int(await _books.hincrby(PREFIX + "attempts", order, 1))
        await _books.rpush(f"{PREFIX}log:{order}", f"{attempt} {os.getpid()} {time.time():.3f}")
        if attempt <= FAILURES:
            raise FlakyError(f"order {order}: simulated failure {attempt} of {FAILURES}")
    await _books.hincrby(PREFIX + "runs", order, 1)
    ctx.emit(InventoryReserved(order_id=order, sku=event.sku, quantity=event.quantity,
                               customer_id=event.customer_id, amount_cents=event.amount_cents))


@service.on_stop
async def _close_books() -> None:
    await _books.aclose()
