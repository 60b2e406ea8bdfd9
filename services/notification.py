"""Notification: tells the customer how their order went. ``choreo run services.notification:service``.

Each notification is recorded once in Redis (``<prefix>notification:sent``: order id -> outcome),
guarded by the handler's idempotency key so a re-run after a crash sends nothing twice.
"""

from __future__ import annotations

from choreo import Context, Service
from services._redis import ServiceState
from services.events import CustomerNotified, OrderCancelled, ShipmentScheduled

service = Service("notification", skip_ended_sagas=True)
state = ServiceState(service)

_SEND = """
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return ARGV[3]
"""


@service.on(ShipmentScheduled, emits=[CustomerNotified], compensable=False)
async def notify_shipped(event: ShipmentScheduled, ctx: Context) -> None:
    await state.once(ctx, _SEND, [state.key("sent")], [event.order_id, "shipped"])
    ctx.emit(CustomerNotified(order_id=event.order_id, customer_id=event.customer_id, outcome="shipped"))


@service.compensate(OrderCancelled)
async def notify_cancelled(event: OrderCancelled, ctx: Context) -> None:
    await state.once(ctx, _SEND, [state.key("sent")], [event.order_id, "cancelled"])
