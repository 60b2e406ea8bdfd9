"""Shipping: books a shipment for confirmed orders. ``choreo run services.shipping:service``.

State in Redis (``<prefix>shipping:shipments``: order id -> shipment id). Invariant: nothing ships
unpaid. A deterministic ``CHECKOUT_SHIPPING_UNAVAILABLE_RATE`` share of orders cannot be booked.
"""

from __future__ import annotations

from choreo import Context, Service
from services._redis import ServiceState, chance
from services.events import OrderConfirmed, ShipmentScheduled, ShippingUnavailable

service = Service("shipping")
state = ServiceState(service)

_BOOK = """
local existing = redis.call('HGET', KEYS[2], ARGV[2])
if existing then return existing end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return ARGV[3]
"""


@service.on(OrderConfirmed, emits=[ShipmentScheduled, ShippingUnavailable])
async def schedule(event: OrderConfirmed, ctx: Context) -> None:
    if chance(event.order_id, "shipping") < state.config.shipping_unavailable_rate:
        ctx.emit(ShippingUnavailable(order_id=event.order_id, reason="no carrier available",
                                     customer_id=event.customer_id))
        return
    shipment_id = await state.once(ctx, _BOOK, [state.key("shipments")],
                                   [event.order_id, f"ship-{event.order_id}"])
    ctx.emit(ShipmentScheduled(order_id=event.order_id, shipment_id=shipment_id, customer_id=event.customer_id))
