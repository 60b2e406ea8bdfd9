"""The checkout saga end to end: sagas/s under a backlog, and saga duration p50/p99 at a low rate.

    make bench-saga           # or: .venv/bin/python -m bench.saga --orders 2000 --rate 50 --seconds 10

Five services and the saga tracker run as separate processes on the embedded stack. Throughput:
N orders are placed at once; sagas/s = N / (last saga end - first saga start), from the tracker's
records. Latency: orders are placed at a steady low rate; a saga's duration is from its OrderPlaced
to its end event (both occurred-at times). About a third of the sagas fail and compensate.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

from choreo import Publisher, Settings
from choreo.stores.redis import RedisSagaStore
from services.demo import make_orders, start_services


async def _wait_ended(store: RedisSagaStore, ids: list[str], timeout: float) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        states = [await store.get(i) for i in ids]
        if all(s is not None and s["ended_at"] is not None for s in states):
            return [s for s in states if s is not None]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {sum(1 for s in states if s and s['ended_at'])} of {len(ids)} ended")
        await asyncio.sleep(0.2)


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


async def measure(settings: Settings, orders: int, rate: float, seconds: float, log_dir: Path) -> None:
    store = RedisSagaStore(settings.redis_url, prefix=settings.redis_prefix)
    procs = start_services(settings, log_dir)
    try:
        async with Publisher("bench", settings=settings) as publisher:
            # Warm-up: one saga, so every group has joined before anything is measured.
            [warm] = make_orders(1, seed=1)
            warm = warm.model_copy(update={"order_id": "warm-up"})
            await publisher.publish(warm, correlation_id=warm.order_id)
            await _wait_ended(store, [warm.order_id], 120)

            batch = [o.model_copy(update={"order_id": f"tp-{o.order_id}"}) for o in make_orders(orders, seed=2)]
            await publisher.publish_many(batch, correlation_ids=[o.order_id for o in batch])
            states = await _wait_ended(store, [o.order_id for o in batch], 600)
            span = max(int(s["ended_at"]) for s in states) - min(int(s["started_at"]) for s in states)  # type: ignore[call-overload]
            outcomes: dict[str, int] = {}
            for s in states:
                outcomes[str(s["status"])] = outcomes.get(str(s["status"]), 0) + 1
            print(f"throughput: {orders} sagas placed at once ended in {span / 1000:.2f} s = "
                  f"{orders / (span / 1000):.0f} sagas/s  {outcomes}")

            paced = [o.model_copy(update={"order_id": f"lat-{o.order_id}"})
                     for o in make_orders(int(rate * seconds), seed=3)]
            started = time.monotonic()
            for i, order in enumerate(paced):
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
                await publisher.publish(order, correlation_id=order.order_id)
            states = await _wait_ended(store, [o.order_id for o in paced], 120)
            durations = [float(int(s["ended_at"]) - int(s["started_at"])) for s in states]  # type: ignore[call-overload]
            print(f"latency at {rate:.0f} sagas/s for {seconds:.0f} s ({len(paced)} sagas): "
                  f"p50 {_pct(durations, 50):.0f} ms, p99 {_pct(durations, 99):.0f} ms, max {max(durations):.0f} ms")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    log_dir = Path("bench/out")
    log_dir.mkdir(parents=True, exist_ok=True)
    from choreo.devstack import start_dev_stack

    with start_dev_stack() as stack:
        run = uuid.uuid4().hex[:6]
        settings = Settings(kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url,
                            topic_prefix=f"b{run}.", redis_prefix=f"b{run}:")
        asyncio.run(measure(settings, args.orders, args.rate, args.seconds, log_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
