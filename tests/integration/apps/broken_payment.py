"""The reference payment service with a switch that breaks charging for chosen orders (for DLQ tests).

Run as ``python -m choreo.cli run tests.integration.apps.broken_payment:service`` instead of
``services.payment:service``. It is the same service (name, consumer group, handlers and their
names, hence the same idempotency keys and Redis state), except that ``charge`` first looks the order
up in the Redis set ``<prefix>test:payment-broken``: while the order is in it, ``charge`` raises
``PaymentGatewayDown``, so after its last attempt the ``InventoryReserved`` event is dead-lettered.
A test "fixes" the order by removing it from the set, then replays the dead letter.

Bookkeeping in Redis, with no guard of its own: ``<prefix>test:payment-failures`` (order id -> failed
attempts) and ``<prefix>test:payment-charged`` (order id -> successful charges).
"""

from __future__ import annotations

import dataclasses

import redis.asyncio as aioredis

from choreo import Context, RetryPolicy, Service, Settings
from services import payment
from services._redis import ServiceState
from services.events import InventoryReserved

settings = Settings.from_env()
BROKEN = f"{settings.redis_prefix}test:payment-broken"
FAILURES = f"{settings.redis_prefix}test:payment-failures"
CHARGED = f"{settings.redis_prefix}test:payment-charged"
#: Few, short attempts: the test waits for the dead letter.
RETRY = RetryPolicy(max_attempts=3, initial_delay_s=0.05, max_delay_s=0.2)

service = Service(payment.service.name, skip_ended_sagas=True, retry=RETRY)
# The reference handlers read the module-level ``state`` when they run: bind it to this service, so
# its Redis connection is opened when this service starts.
payment.state = ServiceState(service)
_books = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)


class PaymentGatewayDown(Exception):
    """The simulated failure: the payment gateway rejects every call for this order."""


async def charge(event: InventoryReserved, ctx: Context) -> None:
    if await _books.sismember(BROKEN, event.order_id):
        await _books.hincrby(FAILURES, event.order_id, 1)
        raise PaymentGatewayDown(f"the payment gateway rejects order {event.order_id}")
    await payment.charge(event, ctx)
    await _books.hincrby(CHARGED, event.order_id, 1)


for _sub in payment.service.subscriptions:
    service.add(dataclasses.replace(_sub, handler=charge) if _sub.name == "charge" else _sub)


@service.on_stop
async def _close_books() -> None:
    await _books.aclose()
