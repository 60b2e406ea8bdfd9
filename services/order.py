"""Order: confirms paid orders and closes failed ones. ``choreo run services.order:service``.

Orders are placed from outside handlers (a web endpoint, ``choreo publish``, the demo) as
``OrderPlaced`` events. State in Redis (``<prefix>order:status``: order id -> confirmed | cancelled).
Confirming is the saga's pivot inside this service and needs no compensation of its own: the failure
path ends here, setting the status to cancelled after every other step was undone.
"""

from __future__ import annotations

from choreo import Context, Service
from services._redis import ServiceState
from services.events import InventoryRejected, InventoryReleased, OrderCancelled, OrderConfirmed, PaymentCaptured

service = Service("order", skip_ended_sagas=True)
state = ServiceState(service)

_SET_STATUS = """
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return ARGV[3]
"""


@service.on(PaymentCaptured, emits=[OrderConfirmed], compensable=False)
async def confirm(event: PaymentCaptured, ctx: Context) -> None:
    await state.once(ctx, _SET_STATUS, [state.key("status")], [event.order_id, "confirmed"])
    ctx.emit(OrderConfirmed(order_id=event.order_id, customer_id=event.customer_id, amount_cents=event.amount_cents))


@service.compensate(InventoryReleased, emits=[OrderCancelled])
async def cancel_after_release(event: InventoryReleased, ctx: Context) -> None:
    await state.once(ctx, _SET_STATUS, [state.key("status")], [event.order_id, "cancelled"])
    ctx.emit(OrderCancelled(order_id=event.order_id, reason="a later step failed", customer_id=event.customer_id))


@service.compensate(InventoryRejected, emits=[OrderCancelled])
async def cancel_rejected(event: InventoryRejected, ctx: Context) -> None:
    await state.once(ctx, _SET_STATUS, [state.key("status")], [event.order_id, "cancelled"])
    ctx.emit(OrderCancelled(order_id=event.order_id, reason=event.reason, customer_id=event.customer_id))
