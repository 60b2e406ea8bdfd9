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


# "Send the e-mail once": the guard and the effect in one atomic step, so a crash between them
# cannot leave the guard set and the notification unsent.
_SEND_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  return 1
end
return 0
"""


async def _notify(order_id: str, outcome: str, ctx: Context) -> None:
    await state.redis.eval(
        _SEND_ONCE, 2, f"{state.prefix}effect:{ctx.idempotency_key}", f"{state.prefix}sent",
        service.settings.done_ttl_ms, order_id, outcome,
    )
    ctx.emit(CustomerNotified(order_id=order_id, customer_id="", outcome=outcome))


@service.on(InventoryReserved, emits=[CustomerNotified])
async def notify_reserved(event: InventoryReserved, ctx: Context) -> None:
    await _notify(event.order_id, "reserved", ctx)


@service.on(InventoryRejected, emits=[CustomerNotified])
async def notify_rejected(event: InventoryRejected, ctx: Context) -> None:
    await _notify(event.order_id, "rejected", ctx)
