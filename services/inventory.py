"""Inventory: reserves stock for placed orders and releases it when a later step fails.

``choreo run services.inventory:service``. State in Redis (``<prefix>inventory:``): ``stock`` (sku ->
units; a SKU with no entry starts with ``CHECKOUT_DEFAULT_STOCK``) and ``reservations`` (order id ->
"sku:quantity"). Invariant: stock never goes negative, and a released order gives back exactly what
it took, once.
"""

from __future__ import annotations

from choreo import Context, Service
from services._redis import ServiceState
from services.events import (
    InventoryRejected, InventoryReleased, InventoryReserved, OrderPlaced, PaymentDeclined, PaymentRefunded,
)

service = Service("inventory", skip_ended_sagas=True)
state = ServiceState(service)

_RESERVE = """
local stock = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or ARGV[4])
local qty = tonumber(ARGV[3])
if stock < qty then return 'rejected' end
redis.call('HSET', KEYS[2], ARGV[2], stock - qty)
redis.call('HSET', KEYS[3], ARGV[5], ARGV[2] .. ':' .. qty)
return 'reserved'
"""

# Gives back what the order took, if it still holds a reservation; returns "sku:qty" or "".
_RELEASE = """
local held = redis.call('HGET', KEYS[3], ARGV[2])
if not held then return '' end
local sep = string.find(held, ':')
local sku, qty = string.sub(held, 1, sep - 1), tonumber(string.sub(held, sep + 1))
redis.call('HINCRBY', KEYS[2], sku, qty)
redis.call('HDEL', KEYS[3], ARGV[2])
return held
"""


@service.on(OrderPlaced, emits=[InventoryReserved, InventoryRejected])
async def reserve_stock(event: OrderPlaced, ctx: Context) -> None:
    outcome = await state.once(
        ctx, _RESERVE, [state.key("stock"), state.key("reservations")],
        [event.sku, event.quantity, state.config.default_stock, event.order_id],
    )
    if outcome == "reserved":
        ctx.emit(InventoryReserved(order_id=event.order_id, sku=event.sku, quantity=event.quantity,
                                   customer_id=event.customer_id, amount_cents=event.amount_cents))
    else:
        ctx.emit(InventoryRejected(order_id=event.order_id, sku=event.sku, reason="out of stock",
                                   customer_id=event.customer_id))


async def _release(order_id: str, customer_id: str, ctx: Context) -> None:
    held = await state.once(ctx, _RELEASE, [state.key("stock"), state.key("reservations")], [order_id])
    sku, _, qty = held.partition(":")
    ctx.emit(InventoryReleased(order_id=order_id, sku=sku, quantity=int(qty or 0), customer_id=customer_id))


@service.compensate(PaymentDeclined, undoes=reserve_stock, emits=[InventoryReleased])
async def release_after_decline(event: PaymentDeclined, ctx: Context) -> None:
    await _release(event.order_id, event.customer_id, ctx)


@service.compensate(PaymentRefunded, undoes=reserve_stock, emits=[InventoryReleased])
async def release_after_refund(event: PaymentRefunded, ctx: Context) -> None:
    await _release(event.order_id, event.customer_id, ctx)
