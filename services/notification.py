"""Notification: tells the customer how their order went. ``choreo run services.notification:service``.

Each notification is recorded once in Redis (``<prefix>notification:sent``, order id -> outcome),
using the handler's idempotency key so a re-run after a crash sends nothing twice.
"""

from __future__ import annotations

from choreo import Context, Service
from services._redis import ServiceState
from services.events import CustomerNotified, InventoryRejected, InventoryReserved

service = Service("notification")
state = ServiceState(service)


async def _notify(order_id: str, outcome: str, ctx: Context) -> None:
    # SET NX on the idempotency key is the "send the e-mail once" of this reference service.
    first = await state.redis.set(f"{state.prefix}effect:{ctx.idempotency_key}", "1", nx=True,
                                  px=service.settings.done_ttl_ms)
    if first:
        await state.redis.hset(f"{state.prefix}sent", order_id, outcome)
    ctx.emit(CustomerNotified(order_id=order_id, customer_id="", outcome=outcome))


@service.on(InventoryReserved, emits=[CustomerNotified])
async def notify_reserved(event: InventoryReserved, ctx: Context) -> None:
    await _notify(event.order_id, "reserved", ctx)


@service.on(InventoryRejected, emits=[CustomerNotified])
async def notify_rejected(event: InventoryRejected, ctx: Context) -> None:
    await _notify(event.order_id, "rejected", ctx)
