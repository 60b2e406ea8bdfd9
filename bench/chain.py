"""Throughput of the two-service chain (inventory -> payment).

    make bench-chain            # or: .venv/bin/python -m bench.chain --orders 20000

Preloads N ``OrderPlaced`` events, then starts ``inventory`` and ``payment`` as separate processes
(``choreo run``) and measures from the first order reserved until the last order is charged, so the
consumer-group joins are excluded. Every order crosses two services, so the chain
handles 2 x N events; both figures are printed.

``--observed`` runs the chain alternately without and with observability (tracing exported over
OTLP/HTTP to a sink in this process, and metrics served on a port), ``--rounds`` times each, and
prints both medians and their ratio:

    .venv/bin/python -m bench.chain --orders 20000 --observed --rounds 2

It runs on the embedded stack; ``--broker-from-env`` uses ``CHOREO_KAFKA``/``CHOREO_REDIS`` when set
and the dev stack for the rest (see bench/common.py). The figures are only printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis

from bench.common import broker, free_port, machine_lines, otlp_sink
from choreo import Publisher, Settings
from services.events import OrderPlaced


async def measure(settings: Settings, orders: int, log_dir: Path,
                  observed: dict[str, str] | None = None) -> dict[str, float]:
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    events = [OrderPlaced(order_id=f"o{i:07d}", customer_id=f"c{i % 1000}", sku="gadget", quantity=1,
                          amount_cents=1000 + i) for i in range(orders)]
    async with Publisher("bench", settings=settings) as publisher:
        for start in range(0, orders, 5000):
            await publisher.publish_many(events[start : start + 5000])
    env = dict(os.environ, CHOREO_KAFKA=settings.kafka_bootstrap, CHOREO_REDIS=settings.redis_url,
               CHOREO_REDIS_PREFIX=settings.redis_prefix, CHOREO_TOPIC_PREFIX=settings.topic_prefix)
    procs = [
        subprocess.Popen([sys.executable, "-m", "choreo.cli", "--log-level", "WARNING", "run", target],
                         env={**env, **(observed or {}), **({"CHOREO_METRICS_PORT": str(free_port())} if observed
                                                            else {})},
                         stdout=open(log_dir / f"{target.split(':')[0]}.log", "w"), stderr=subprocess.STDOUT)
        for target in ("services.inventory:service", "services.payment:service")
    ]
    effect_prefix = f"{settings.redis_prefix}inventory:effect:*"
    try:
        while not [k async for k in r.scan_iter(effect_prefix, count=100)]:
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        sent_key = f"{settings.redis_prefix}payment:ledger"
        deadline = time.monotonic() + 600
        while int(await r.hlen(sent_key)) < orders:
            if time.monotonic() > deadline:
                raise SystemExit("timed out")
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        await r.aclose()
    return {"orders": orders, "seconds": elapsed, "orders_per_s": orders / elapsed, "events_per_s": 2 * orders / elapsed}


def _settings(base: Settings) -> Settings:
    run = uuid.uuid4().hex[:6]
    return Settings(kafka_bootstrap=base.kafka_bootstrap, redis_url=base.redis_url, kafka_config=base.kafka_config,
                    topic_prefix=f"b{run}.", redis_prefix=f"b{run}:")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--observed", action="store_true", help="compare with tracing and metrics on")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each variant with --observed")
    parser.add_argument("--broker-from-env", action="store_true",
                        help="use CHOREO_KAFKA and CHOREO_REDIS when set, the embedded dev stack for the rest")
    args = parser.parse_args()
    log_dir = Path("bench/out")
    log_dir.mkdir(parents=True, exist_ok=True)

    with broker(args.broker_from_env) as b:
        for line in machine_lines("bench.chain", sys.argv[1:], b.description):
            print(line)
        if args.observed:
            return _compare(b.settings, args.orders, args.rounds, log_dir)
        result = asyncio.run(measure(_settings(b.settings), args.orders, log_dir))
    print(f"two-service chain, {result['orders']:.0f} orders in {result['seconds']:.2f} s: "
          f"{result['orders_per_s']:.0f} orders/s end to end = {result['events_per_s']:.0f} events/s handled "
          "(2 services, each one consume + Redis claim/done + emit per event)")
    return 0


def _compare(base: Settings, orders: int, rounds: int, log_dir: Path) -> int:
    with otlp_sink() as observed:
        sampled = {**observed, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
        variants = {"observability off": None, "tracing + metrics": observed, "same, 10% of sagas traced": sampled}
        figures: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, env in variants.items():  # interleaved: a noisy machine affects all alike
                result = asyncio.run(measure(_settings(base), orders, log_dir, env))
                figures[name].append(result["events_per_s"])
                print(f"  {name:28} {result['events_per_s']:8.0f} events/s", flush=True)
    off = statistics.median(figures["observability off"])
    print(f"two-service chain, {orders} orders, {rounds} round(s) each, median events/s handled:")
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"  {name:28} {median:8.0f}  (min {min(values):.0f}, max {max(values):.0f})  = {median / off:.2f} x off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
