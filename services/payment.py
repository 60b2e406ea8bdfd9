"""Payment: charges reserved orders and refunds them when shipping fails.

``choreo run services.payment:service``. State in Redis (``<prefix>payment:``): ``ledger`` (order id ->
"payment id:amount" for every capture), ``refunds`` (order id -> amount) and ``declines`` (order id ->
reason). Invariant: no order is
charged twice, and every refund matches a capture. Declines: amounts above
``CHECKOUT_DECLINE_ABOVE_CENTS``, and a deterministic ``CHECKOUT_DECLINE_RATE`` share of orders.
"""

from __future__ import annotations

from choreo import Context, Service
from services._redis import ServiceState, chance
from services.events import (
    InventoryReserved, PaymentCaptured, PaymentDeclined, PaymentRefunded, ShipmentCancelled, ShippingUnavailable,
)

service = Service("payment", skip_ended_sagas=True)
state = ServiceState(service)

_CHARGE = """
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 'duplicate' end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. ':' .. ARGV[4])
return 'captured'
"""

_REFUND = """
local entry = redis.call('HGET', KEYS[2], ARGV[2])
if not entry then return '' end
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 0 then
  redis.call('HSET', KEYS[3], ARGV[2], string.sub(entry, string.find(entry, ':') + 1))
end
return entry
"""


@service.on(InventoryReserved, emits=[PaymentCaptured, PaymentDeclined])
async def charge(event: InventoryReserved, ctx: Context) -> None:
    config = state.config
    reason = ("amount over limit" if event.amount_cents > config.decline_above_cents
              else "card declined" if chance(event.order_id, "decline") < config.decline_rate else None)
    if reason is not None:
        await state.redis.hset(state.key("declines"), event.order_id, reason)  # idempotent as it is
        ctx.emit(PaymentDeclined(order_id=event.order_id, reason=reason, customer_id=event.customer_id))
        return
    # The payment id is the idempotency key: an external payment API would deduplicate on it too.
    payment_id = f"pay-{ctx.idempotency_key.rsplit(':', 1)[-1]}"
    await state.once(ctx, _CHARGE, [state.key("ledger")], [event.order_id, payment_id, event.amount_cents])
    ctx.emit(PaymentCaptured(order_id=event.order_id, payment_id=payment_id, amount_cents=event.amount_cents,
                             customer_id=event.customer_id))


async def _refund(order_id: str, customer_id: str, ctx: Context) -> None:
    # Refunds what was captured, if anything; the chain of compensations goes on either way.
    entry = await state.once(ctx, _REFUND, [state.key("ledger"), state.key("refunds")], [order_id])
    payment_id, _, amount = entry.partition(":")
    ctx.emit(PaymentRefunded(order_id=order_id, payment_id=payment_id, amount_cents=int(amount or 0),
                             customer_id=customer_id))


@service.compensate(ShippingUnavailable, undoes=charge, emits=[PaymentRefunded])
async def refund(event: ShippingUnavailable, ctx: Context) -> None:
    await _refund(event.order_id, event.customer_id, ctx)


@service.compensate(ShipmentCancelled, undoes=charge, emits=[PaymentRefunded])
async def refund_after_cancellation(event: ShipmentCancelled, ctx: Context) -> None:
    """A timed-out saga unwinds in reverse: shipment cancelled, then refund, release, cancel the order."""
    await _refund(event.order_id, event.customer_id, ctx)
