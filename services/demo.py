"""``make demo``: the checkout system on the embedded broker and Redis, then what happened.

Starts Tansu and Redis (or uses ``CHOREO_KAFKA``/``CHOREO_REDIS``), runs the five services of the
checkout saga as separate processes (``choreo run``), places orders with a ``Publisher``, waits until
every saga ended (shipped, or cancelled with its completed steps compensated), prints the outcomes and
checks the invariants. Some orders fail on purpose: the widget stock runs out, payments above $400 are
declined, and one order in ten finds no carrier.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from choreo import Publisher, Settings
from services.events import OrderPlaced
from services.invariants import checkout_report

SERVICES = ("order", "inventory", "payment", "shipping", "notification")
PROCESSES = {**{name: f"services.{name}:service" for name in SERVICES}, "tracker": "services.checkout:tracker"}
FAILURES = {"CHECKOUT_DECLINE_ABOVE_CENTS": "40000", "CHECKOUT_SHIPPING_UNAVAILABLE_RATE": "0.1"}


def start_services(settings: Settings, log_dir: Path, extra_env: dict[str, str] | None = None) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ, CHOREO_KAFKA=settings.kafka_bootstrap, CHOREO_REDIS=settings.redis_url,
               CHOREO_REDIS_PREFIX=settings.redis_prefix, CHOREO_TOPIC_PREFIX=settings.topic_prefix,
               PYTHONUNBUFFERED="1", **FAILURES, **(extra_env or {}))
    return [
        subprocess.Popen([sys.executable, "-m", "choreo.cli", "run", target], env=env,
                         stdout=open(log_dir / f"{name}.log", "w"), stderr=subprocess.STDOUT)
        for name, target in PROCESSES.items()
    ]


def make_orders(count: int, seed: int = 7) -> list[OrderPlaced]:
    rng = random.Random(seed)
    return [
        OrderPlaced(order_id=f"order-{i:05d}", customer_id=f"customer-{rng.randrange(50)}",
                    sku=rng.choice(["widget", "gadget", "gizmo"]), quantity=rng.randint(1, 3),
                    amount_cents=rng.randrange(500, 50_000))
        for i in range(count)
    ]


async def _run(count: int, stock: dict[str, int], settings: Settings, log_dir: Path) -> int:
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    prefix = settings.redis_prefix
    # redis-py types the mapping's keys as a union, and a dict's key type is invariant.
    mapping: Mapping[Any, Any] = stock
    await r.hset(f"{prefix}inventory:stock", mapping=mapping)
    procs = start_services(settings, log_dir)
    print(f"started services: {', '.join(SERVICES)} and the saga tracker (each its own process; logs in {log_dir})")
    try:
        orders = make_orders(count)
        async with Publisher("demo", settings=settings) as publisher:
            started = time.monotonic()
            # The order id is the saga id: every event of an order's checkout carries it.
            await publisher.publish_many(orders, correlation_ids=[o.order_id for o in orders])
        print(f"placed {count} orders")
        sent_key = f"{prefix}notification:sent"
        deadline = time.monotonic() + 180
        while (done := await r.hlen(sent_key)) < count:
            if time.monotonic() > deadline:
                print(f"timed out: {done} of {count} sagas ended")
                return 1
            for name, proc in zip(PROCESSES, procs):
                if proc.poll() is not None:
                    print(f"service {name} exited with {proc.returncode}; see {log_dir / (name + '.log')}")
                    return 1
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        report = await checkout_report(r, prefix, orders, stock)
        d = report.details
        print(f"\n{count} checkout sagas across 5 services in {elapsed:.1f} s (including consumer-group joins)")
        print(f"  shipped: {d['shipped']}   cancelled: {d['cancelled']} "
              f"(out of stock: {d['out_of_stock']}, payment declined: {d['declined']}, "
              f"no carrier: {d['refunded']})")
        print(f"  payments captured: {d['charged']}, of which refunded after a failed shipment: {d['refunded']}")
        print(f"  stock left: {d['stock']}")
        sagas = await _tracked(settings, count)
        print(f"  saga tracker: {dict(sorted(sagas.items()))}")
        print("invariants:")
        print("\n".join(report.lines()))
        return 0 if report.ok else 1
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        await r.aclose()


async def _tracked(settings: Settings, count: int) -> dict[str, int]:
    """Saga statuses as the tracker recorded them, once it has caught up with every saga."""
    from choreo.stores.redis import RedisSagaStore

    store = RedisSagaStore(settings.redis_url, prefix=settings.redis_prefix)
    try:
        deadline = time.monotonic() + 30
        while True:
            sagas = await store.list(limit=count)
            counts: dict[str, int] = {}
            for saga in sagas:
                counts[saga["status"]] = counts.get(saga["status"], 0) + 1
            if sum(counts.get(s, 0) for s in ("completed", "compensated", "timed_out")) >= count:
                return counts
            if time.monotonic() > deadline:
                return counts
            await asyncio.sleep(0.2)
    finally:
        await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--orders", type=int, default=300)
    args = parser.parse_args()
    stock = {"widget": 60, "gadget": 100_000, "gizmo": 100_000}
    log_dir = Path(os.environ.get("CHOREO_DEMO_LOGS", "/tmp/choreo-demo"))
    log_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:6]
    if os.environ.get("CHOREO_KAFKA") and os.environ.get("CHOREO_REDIS"):
        settings = Settings.from_env(topic_prefix=f"demo{run_id}.", redis_prefix=f"demo{run_id}:")
        return asyncio.run(_run(args.orders, stock, settings, log_dir))
    from choreo.devstack import start_dev_stack

    print("starting the embedded broker (Tansu) and Redis ...")
    with start_dev_stack(log_dir=log_dir) as stack:
        print(f"  Kafka: {stack.kafka_bootstrap}   Redis: {stack.redis_url}")
        settings = Settings(kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url)
        code = asyncio.run(_run(args.orders, stock, settings, log_dir))
    print("stopped the broker and Redis")
    return code


if __name__ == "__main__":
    sys.exit(main())
