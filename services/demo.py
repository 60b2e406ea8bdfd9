"""``make demo``: the reference services on the embedded broker and Redis, then what happened.

Starts Tansu and Redis (or uses ``CHOREO_KAFKA``/``CHOREO_REDIS``), runs ``inventory`` and
``notification`` as separate processes (``choreo run``), places orders with a ``Publisher``, waits
until every order's customer was notified, prints the outcomes and checks the invariants.
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
from pathlib import Path

import redis.asyncio as aioredis

from choreo import Publisher, Settings
from services.events import OrderPlaced

SERVICES = ("services.inventory:service", "services.notification:service")


async def _run(orders: int, stock: int, settings: Settings, log_dir: Path) -> int:
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    prefix = settings.redis_prefix
    await r.hset(f"{prefix}inventory:stock", mapping={"widget": stock, "gadget": stock * 10})
    env = dict(os.environ, CHOREO_KAFKA=settings.kafka_bootstrap, CHOREO_REDIS=settings.redis_url,
               CHOREO_REDIS_PREFIX=prefix, CHOREO_TOPIC_PREFIX=settings.topic_prefix, PYTHONUNBUFFERED="1")
    procs = []
    for target in SERVICES:
        name = target.split(".")[1].split(":")[0]
        log = open(log_dir / f"{name}.log", "w")
        procs.append((name, log, subprocess.Popen(
            [sys.executable, "-m", "choreo.cli", "run", target], env=env, stdout=log, stderr=subprocess.STDOUT
        )))
    print(f"started services: {', '.join(n for n, _, _ in procs)} (logs in {log_dir})")
    try:
        rng = random.Random(7)
        events = [
            OrderPlaced(order_id=f"order-{i:05d}", customer_id=f"customer-{rng.randrange(50)}",
                        sku=rng.choice(["widget", "gadget"]), quantity=rng.randint(1, 3),
                        amount_cents=rng.randrange(500, 50_000))
            for i in range(orders)
        ]
        async with Publisher("demo", settings=settings) as publisher:
            started = time.monotonic()
            await publisher.publish_many(events)
        print(f"published {orders} OrderPlaced events")
        sent_key = f"{prefix}notification:sent"
        deadline = time.monotonic() + 120
        while (done := await r.hlen(sent_key)) < orders:
            if time.monotonic() > deadline:
                print(f"timed out: {done} of {orders} customers notified")
                return 1
            for name, _, proc in procs:
                if proc.poll() is not None:
                    print(f"service {name} exited with {proc.returncode}; see {log_dir / (name + '.log')}")
                    return 1
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        sent = await r.hgetall(sent_key)
        stock_left = await r.hgetall(f"{prefix}inventory:stock")
        reserved = [e for e in events if sent.get(e.order_id) == "reserved"]
        rejected = [e for e in events if sent.get(e.order_id) == "rejected"]
        print(f"\n{orders} orders through 2 services in {elapsed:.2f} s ({orders / elapsed:.0f} orders/s end to end)")
        print(f"  reserved: {len(reserved)}   rejected (out of stock): {len(rejected)}")
        print(f"  stock left: {stock_left}")
        checks = {
            "every order notified exactly once": len(sent) == orders and len(reserved) + len(rejected) == orders,
            "stock never negative": all(int(v) >= 0 for v in stock_left.values()),
            "stock taken == units reserved": sum(e.quantity for e in reserved if e.sku == "widget")
            == stock - int(stock_left["widget"]),
        }
        for name, ok in checks.items():
            print(f"  [{'ok' if ok else 'FAILED'}] {name}")
        return 0 if all(checks.values()) else 1
    finally:
        for _, _, proc in procs:
            proc.send_signal(signal.SIGTERM)
        for name, log, proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        await r.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--stock", type=int, default=200, help="units of 'widget' in stock")
    args = parser.parse_args()
    log_dir = Path(os.environ.get("CHOREO_DEMO_LOGS", "/tmp/choreo-demo"))
    log_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:6]
    if os.environ.get("CHOREO_KAFKA") and os.environ.get("CHOREO_REDIS"):
        settings = Settings.from_env(topic_prefix=f"demo{run_id}.", redis_prefix=f"demo{run_id}:")
        return asyncio.run(_run(args.orders, args.stock, settings, log_dir))
    from choreo.devstack import start_dev_stack

    print("starting the embedded broker (Tansu) and Redis ...")
    with start_dev_stack(log_dir=log_dir) as stack:
        print(f"  Kafka: {stack.kafka_bootstrap}   Redis: {stack.redis_url}")
        settings = Settings(kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url)
        code = asyncio.run(_run(args.orders, args.stock, settings, log_dir))
    print("stopped the broker and Redis")
    return code


if __name__ == "__main__":
    sys.exit(main())
