"""The checkout system's invariants, read from the services' state in Redis (demo and tests)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from services.events import OrderPlaced


@dataclass
class CheckoutReport:
    outcomes: Counter[str] = field(default_factory=Counter)  # shipped / cancelled / (missing)
    checks: dict[str, bool] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    def lines(self) -> list[str]:
        return [f"  [{'ok' if ok else 'FAILED'}] {name}" for name, ok in self.checks.items()]


async def checkout_report(
    r: aioredis.Redis, prefix: str, orders: Sequence[OrderPlaced], initial_stock: dict[str, int]
) -> CheckoutReport:
    """What happened to ``orders`` (state under the Redis key ``prefix``) and whether every invariant holds."""

    async def h(name: str) -> dict[str, str]:
        return {str(k): str(v) for k, v in (await r.hgetall(prefix + name)).items()}

    sent, status = await h("notification:sent"), await h("order:status")
    stock, held = await h("inventory:stock"), await h("inventory:reservations")
    ledger, refunds, shipments = await h("payment:ledger"), await h("payment:refunds"), await h("shipping:shipments")
    declines = await h("payment:declines")
    report = CheckoutReport()
    by_id = {o.order_id: o for o in orders}
    for order in orders:
        report.outcomes[sent.get(order.order_id, "(no outcome yet)")] += 1
    shipped = [o for o in orders if sent.get(o.order_id) == "shipped"]
    cancelled = [o for o in orders if sent.get(o.order_id) == "cancelled"]
    taken = Counter[str]()
    for order_id, entry in held.items():
        sku, _, qty = entry.partition(":")
        taken[sku] += int(qty)
    report.checks = {
        "every saga ended (shipped or cancelled)": len(shipped) + len(cancelled) == len(orders),
        "stock never negative": all(int(v) >= 0 for v in stock.values()),
        "stock taken == units held by shipped orders": all(
            initial_stock.get(sku, 0) - int(stock.get(sku, initial_stock.get(sku, 0))) == taken[sku]
            for sku in set(initial_stock) | set(taken)
        ) and set(held) == {o.order_id for o in shipped},
        "no order charged twice, every charge for a real order": set(ledger) <= set(by_id),
        "nothing shipped unpaid or refunded": all(o in ledger and o not in refunds for o in shipments),
        "every cancelled order released and refunded": all(
            o.order_id not in held and (o.order_id not in ledger or o.order_id in refunds) for o in cancelled
        ),
        "order status matches the outcome": all(
            status.get(o.order_id) == "confirmed" for o in shipped
        ) and all(status.get(o.order_id) == "cancelled" for o in cancelled),
    }
    report.details = {
        "shipped": len(shipped), "cancelled": len(cancelled), "charged": len(ledger), "refunded": len(refunds),
        "declined": len(declines), "out_of_stock": sum(1 for o in cancelled if o.order_id not in declines
                                                        and o.order_id not in ledger),
        "stock": stock,
    }
    return report
