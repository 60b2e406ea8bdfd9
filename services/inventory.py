"""Inventory: reserves stock for placed orders. Stock never goes negative.

``choreo run services.inventory:service``. Stock levels live in Redis under ``<prefix>inventory:stock``
(a hash of sku -> units); a SKU with no entry has ``DEFAULT_STOCK`` units.
"""

from __future__ import annotations

from choreo import Context, Service
from services._redis import ServiceState
from services.events import InventoryRejected, InventoryReserved, OrderPlaced

DEFAULT_STOCK = 1_000_000

service = Service("inventory")
state = ServiceState(service)

# Reserve atomically, once per idempotency key: a handler re-run after a crash finds the key and
# returns the first outcome instead of taking the stock twice.
_RESERVE = """
local prior = redis.call('GET', KEYS[2])
if prior then return prior end
local stock = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or ARGV[3])
local qty = tonumber(ARGV[2])
local outcome = 'rejected'
if stock >= qty then
  redis.call('HSET', KEYS[1], ARGV[1], stock - qty)
  outcome = 'reserved'
end
redis.call('SET', KEYS[2], outcome, 'PX', ARGV[4])
return outcome
"""


@service.on(OrderPlaced, emits=[InventoryReserved, InventoryRejected])
async def reserve_stock(event: OrderPlaced, ctx: Context) -> None:
    outcome = await state.redis.eval(
        _RESERVE, 2, f"{state.prefix}stock", f"{state.prefix}effect:{ctx.idempotency_key}",
        event.sku, event.quantity, DEFAULT_STOCK, service.settings.done_ttl_ms,
    )
    if outcome == "reserved":
        ctx.emit(InventoryReserved(order_id=event.order_id, sku=event.sku, quantity=event.quantity))
    else:
        ctx.emit(InventoryRejected(order_id=event.order_id, sku=event.sku, reason="out of stock"))
