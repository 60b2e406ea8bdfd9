"""The reference checkout saga across five real service processes: the happy path, each failure path
with its compensations, and 1,000 mixed orders with a service SIGKILLed and restarted midway."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from typing import Any

from choreo import Settings
from choreo.stores.redis import RedisSagaStore
from services._redis import chance
from services.events import OrderPlaced
from services.invariants import checkout_report
from tests.integration.helpers import ServiceProcess, eventually, publish, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

SERVICES = ("order", "inventory", "payment", "shipping", "notification", "tracker")  # each its own process
TARGETS = {**{n: f"services.{n}:service" for n in SERVICES[:-1]}, "tracker": "services.checkout:tracker"}
# A generous saga deadline: a loaded CI machine must not time sagas out; the timeout test sets its own.
FAILURES = {"CHECKOUT_DECLINE_ABOVE_CENTS": "40000", "CHECKOUT_SHIPPING_UNAVAILABLE_RATE": "0.3",
            "CHECKOUT_SAGA_DEADLINE_S": "300"}
STOCK = {"gadget": 1_000_000, "rare": 2}


class Checkout:
    def __init__(self, settings: Settings, log_dir: Path, env: dict[str, str]) -> None:
        self.settings, self.log_dir, self.env = settings, log_dir, env
        self.procs: dict[str, ServiceProcess] = {}
        self.redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        self.prefix = settings.redis_prefix

    def start(self, name: str, generation: int = 1) -> None:
        self.procs[name] = ServiceProcess(TARGETS[name], self.settings,
                                          self.log_dir / f"{name}-{generation}.log", **self.env)

    async def wait_ended(self, count: int, timeout: float) -> None:
        async def ended() -> bool:
            return int(await self.redis.hlen(f"{self.prefix}notification:sent")) >= count
        await wait_until(ended, timeout, f"{count} sagas to end")

    async def sagas(self, ids: list[str], timeout: float = 30) -> dict[str, dict[str, Any]]:
        """The tracker's state of each saga, once every one of them has ended."""
        store = RedisSagaStore(self.settings.redis_url, prefix=self.prefix)
        try:
            async def ended() -> bool:
                states = [await store.get(i) for i in ids]
                return all(s is not None and s["ended_at"] is not None for s in states)
            try:
                await wait_until(ended, timeout, "the tracker to end every saga")
            except AssertionError:
                states = {i: await store.get(i) for i in ids}
                raise AssertionError({i: (s["status"], [e["type"] for e in s["events"]]) if s else None
                                      for i, s in states.items()}) from None
            return {i: await store.get(i) for i in ids}
        finally:
            await store.close()

    async def hash(self, name: str) -> dict[str, str]:
        return {str(k): str(v) for k, v in (await self.redis.hgetall(self.prefix + name)).items()}


@pytest.fixture
def checkout_env() -> dict[str, str]:
    return dict(FAILURES)


@pytest.fixture
async def checkout(settings: Settings, tmp_path: Path, checkout_env: dict[str, str]) -> AsyncIterator[Checkout]:
    system = Checkout(settings, tmp_path, checkout_env)
    for name in SERVICES:
        if name not in checkout_env.get("TEST_NOT_STARTED", "").split(","):
            system.start(name)
    try:
        yield system
    finally:
        codes = {name: proc.terminate() for name, proc in system.procs.items() if proc.proc.poll() is None}
        await system.redis.aclose()
        assert all(code == 0 for code in codes.values()), codes


def _order(order_id: str, sku: str = "gadget", amount: int = 1_000, quantity: int = 1) -> OrderPlaced:
    return OrderPlaced(order_id=order_id, customer_id=f"c-{order_id}", sku=sku, quantity=quantity, amount_cents=amount)


def _ids(prefix: str, ships: bool, count: int = 1) -> list[str]:
    """Order ids that the deterministic 30% shipping failure lets through (or not)."""
    found = [f"{prefix}-{i}" for i in range(1000) if (chance(f"{prefix}-{i}", "shipping") >= 0.3) == ships]
    return found[:count]


@pytest.mark.timeout(120)
async def test_each_path_ends_with_its_completed_steps_compensated(checkout: Checkout) -> None:
    await checkout.redis.hset(f"{checkout.prefix}inventory:stock", mapping=STOCK)
    happy, no_carrier = _ids("happy", True)[0], _ids("nocarrier", False)[0]
    declined, out_of_stock = _ids("declined", True)[0], _ids("oos", True)[0]
    orders = [
        _order(happy, quantity=3),
        _order(declined, amount=45_000, quantity=2),
        _order(no_carrier, quantity=4),
        _order(out_of_stock, sku="rare", quantity=5),
    ]
    await publish(checkout.settings, orders)
    saga_ids = {o.order_id: o.order_id for o in orders}  # the order id is the saga id
    await checkout.wait_ended(len(orders), 90)

    sent, status = await checkout.hash("notification:sent"), await checkout.hash("order:status")
    ledger, refunds = await checkout.hash("payment:ledger"), await checkout.hash("payment:refunds")
    held, stock = await checkout.hash("inventory:reservations"), await checkout.hash("inventory:stock")
    shipments = await checkout.hash("shipping:shipments")

    assert sent == {happy: "shipped", declined: "cancelled", no_carrier: "cancelled", out_of_stock: "cancelled"}
    assert status == {happy: "confirmed", declined: "cancelled", no_carrier: "cancelled", out_of_stock: "cancelled"}
    # Happy: charged once, stock held, shipped.
    assert ledger[happy].endswith(":1000") and happy in shipments and held[happy] == "gadget:3"
    # Declined: never charged; its reservation was released.
    assert declined not in ledger and declined not in held
    # No carrier: charged, then refunded, then released -- in reverse order of the steps.
    assert no_carrier in ledger and refunds[no_carrier] == "1000" and no_carrier not in held
    assert no_carrier not in shipments
    # Out of stock: nothing to undo; nothing charged, stock untouched.
    assert out_of_stock not in ledger and stock["rare"] == "2"
    assert stock["gadget"] == str(1_000_000 - 3), "only the shipped order keeps its stock"
    report = await checkout_report(checkout.redis, checkout.prefix, orders, STOCK)
    assert report.ok, report.lines()

    # The tracker saw the same story, step by step. Events of a saga reach it on several topics, in
    # any order, so its record converges: check until it has.
    async def story() -> None:
        by_saga = await checkout.sagas(list(saga_ids.values()))
        sagas = {order_id: by_saga[saga_id] for order_id, saga_id in saga_ids.items()}
        steps = {i: {k: v["status"] for k, v in s["steps"].items()} for i, s in sagas.items()}
        assert sagas[happy]["status"] == "completed"
        assert steps[happy]["notification.notify_shipped"] == "completed"
        assert steps[happy]["payment.refund"] == "skipped"
        assert sagas[declined]["status"] == "compensated"
        assert steps[declined]["payment.charge"] == "failed"
        assert steps[declined]["inventory.reserve_stock"] == "compensated"
        assert steps[declined]["shipping.schedule"] == "skipped"
        assert sagas[no_carrier]["status"] == "compensated"
        assert steps[no_carrier]["shipping.schedule"] == "failed"
        assert steps[no_carrier]["payment.charge"] == "compensated"
        assert steps[no_carrier]["inventory.reserve_stock"] == "compensated"
        events = sagas[no_carrier]["events"]
        refund_at = next(e["at"] for e in events if e["type"] == "checkout.PaymentRefunded")
        release_at = next(e["at"] for e in events if e["type"] == "checkout.InventoryReleased")
        assert refund_at <= release_at, "compensations run in reverse order of the steps"
        assert sagas[out_of_stock]["status"] == "compensated"
        assert steps[out_of_stock]["inventory.reserve_stock"] == "failed"
        assert all(not s["late"] for s in sagas.values())

    await eventually(story, 30)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("checkout_env", [{**FAILURES, "CHECKOUT_SAGA_DEADLINE_S": "4",
                                           "TEST_NOT_STARTED": "shipping,tracker"}])
async def test_a_saga_stuck_past_its_deadline_times_out_and_is_compensated(checkout: Checkout) -> None:
    await checkout.redis.hset(f"{checkout.prefix}inventory:stock", mapping=STOCK)
    # The tracker starts only once the order is confirmed: the deadline runs from OrderPlaced, and
    # group joins on a loaded machine must not eat it before the steps up to shipping have run.
    order = _order(_ids("late", True)[0], quantity=2)
    await publish(checkout.settings, [order])
    saga_id = order.order_id

    async def confirmed() -> bool:
        return (await checkout.hash("order:status")).get(order.order_id) == "confirmed"
    await wait_until(confirmed, 60, "the order to be confirmed")
    checkout.start("tracker")

    store = RedisSagaStore(checkout.settings.redis_url, prefix=checkout.prefix)
    try:
        async def timed_out() -> bool:
            state = await store.get(saga_id)
            return state is not None and state["status"] == "timed_out"
        await wait_until(timed_out, 60, "the saga to time out while shipping is down")
    finally:
        await store.close()
    # Shipping comes back: it must not ship the timed-out order, but it cancels (nothing) first.
    checkout.start("shipping")
    await checkout.wait_ended(1, 60)

    async def story() -> None:
        saga = (await checkout.sagas([saga_id]))[saga_id]
        assert saga["status"] == "timed_out" and saga["ended_at"] is not None
        assert saga["steps"]["shipping.schedule"]["status"] == "failed", (
            "the step that hung", [(e["type"], e["at"], e["causation"], e["id"]) for e in saga["events"]])
        assert saga["steps"]["payment.charge"]["status"] == "compensated"
        assert saga["steps"]["inventory.reserve_stock"]["status"] == "compensated"

    await eventually(story, 30)
    assert order.order_id not in await checkout.hash("shipping:shipments")
    assert (await checkout.hash("payment:refunds"))[order.order_id] == "1000"
    assert order.order_id not in await checkout.hash("inventory:reservations")
    assert (await checkout.hash("order:status"))[order.order_id] == "cancelled"
    assert (await checkout.hash("notification:sent"))[order.order_id] == "cancelled"


@pytest.mark.timeout(240)
async def test_a_thousand_mixed_orders_survive_a_sigkilled_service(checkout: Checkout) -> None:
    stock = {"widget": 400, "gadget": 1_000_000}
    await checkout.redis.hset(f"{checkout.prefix}inventory:stock", mapping=stock)
    rng = random.Random(11)
    orders = [
        _order(f"mix-{i:04d}", sku=rng.choice(["widget", "gadget"]), amount=rng.randrange(500, 50_000),
               quantity=rng.randint(1, 3))
        for i in range(1000)
    ]
    await publish(checkout.settings, orders)

    async def some_charged() -> bool:
        return int(await checkout.redis.hlen(f"{checkout.prefix}payment:ledger")) >= 100
    await wait_until(some_charged, 90, "100 orders to be charged")
    checkout.procs["payment"].kill()
    checkout.start("payment", generation=2)

    await checkout.wait_ended(len(orders), 180)
    report = await checkout_report(checkout.redis, checkout.prefix, orders, stock)
    assert report.ok, report.lines()
    assert report.details["shipped"] and report.details["declined"] and report.details["refunded"]
    assert report.details["out_of_stock"], "the widget stock should run out"
    sent = await checkout.hash("notification:sent")
    expected = {"shipped": "completed", "cancelled": "compensated"}

    async def agree() -> None:
        sagas = await checkout.sagas([o.order_id for o in orders], timeout=60)
        wrong = {i: s["status"] for i, s in sagas.items() if s["status"] != expected[sent[i]]}
        assert not wrong, f"tracker disagrees with the outcome for {len(wrong)} sagas: {list(wrong.items())[:5]}"

    await eventually(agree, 30)
