"""Shipping: books a shipment for confirmed orders. ``choreo run services.shipping:service``.

State in Redis (``<prefix>shipping:shipments``: order id -> shipment id; ``cancelled``: shipments
cancelled because their saga timed out). Invariant: nothing ships
unpaid. A deterministic ``CHECKOUT_SHIPPING_UNAVAILABLE_RATE`` share of orders cannot be booked.
"""

from __future__ import annotations

from choreo import Context, Service
from services._redis import ServiceState, chance
from choreo.saga import SagaTimedOut
from services.events import OrderConfirmed, ShipmentCancelled, ShipmentScheduled, ShippingUnavailable

service = Service("shipping", skip_ended_sagas=True)
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


_CANCEL = """
local shipment = redis.call('HGET', KEYS[2], ARGV[2])
if not shipment then return '' end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], shipment)
return shipment
"""


@service.compensate(SagaTimedOut, undoes=schedule, emits=[ShipmentCancelled])
async def cancel_after_timeout(event: SagaTimedOut, ctx: Context) -> None:
    """First compensation of a timed-out saga (the last step undone first): cancel any shipment."""
    shipment_id = await state.once(ctx, _CANCEL, [state.key("shipments"), state.key("cancelled")], [event.saga_id])
    ctx.emit(ShipmentCancelled(order_id=event.saga_id, customer_id="", shipment_id=shipment_id))
