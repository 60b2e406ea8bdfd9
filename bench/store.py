"""What choreo's Redis calls cost per batch, beside the pipelined ``SET NX`` of ``raw-limit``.

    python -m bench.store [--keys 500] [--batches 200] [--rounds 3] [--broker-from-env]

Each batch is ``--keys`` fresh idempotency keys shaped like a service's (``<prefix>idem:{saga}:...``).
Per round, in rotating order, each call runs ``--batches`` times:

* ``pipeline-set``: what ``bench/step_raw.py`` (``raw-limit``) does, one pipeline of ``SET key 1 NX PX``
  on redis-py's blocking client, as raw-limit uses it.
* ``claim``: ``RedisIdempotencyStore.claim`` (one script call).
* ``gate``: ``RedisParkingLot.gate`` for the batch, none of its keys parked (the common case).
* ``finish``: ``RedisIdempotencyStore.finish``, every key done, after the batch was claimed (not
  timed), as a service finishes a batch: one marker key for the whole batch.

Figures per batch, medians over rounds: wall ms (one call at a time, so a round trip each), this
process's CPU ms (redis-py and choreo's argument packing), and Redis's own ms from
``INFO commandstats`` (reset before each run; a script's time, which includes the commands it
calls, or the pipeline's ``SET``\s), which runs on the other core. Nothing is written to
``bench/results.json``: this bench explains the step's Redis share, it is not one of the issue's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import redis

from bench.common import broker, machine_lines
from choreo.stores.redis import RedisIdempotencyStore, RedisParkingLot

CALLS = ("pipeline-set", "claim", "gate", "finish")
LEASE_MS = 30_000
TTL_MS = 600_000


async def _run(call: str, store: RedisIdempotencyStore, lot: RedisParkingLot, blocking: redis.Redis,
               batches: list[list[str]]) -> tuple[float, float, float]:
    """(wall ms, client CPU ms, Redis ms) per batch."""
    owner = f"bench-{uuid.uuid4().hex[:8]}"
    one: Callable[[list[str]], Awaitable[object]]
    if call == "pipeline-set":
        async def one(keys: list[str]) -> object:
            pipe = blocking.pipeline(transaction=False)
            for key in keys:
                pipe.set(key, b"1", nx=True, px=LEASE_MS)
            return pipe.execute()
    elif call == "claim":
        async def one(keys: list[str]) -> object:
            return await store.claim(keys, owner, LEASE_MS)
    elif call == "gate":
        async def one(keys: list[str]) -> object:
            return await lot.gate([(f"{key}:park", f"id-{index}", True) for index, key in enumerate(keys)], TTL_MS)
    else:
        # Each batch claimed (not timed) by an owner of its own: a service has one or two batches
        # open at a time, and finishing looks through its owner's open batches.
        owners = {id(keys): f"{owner}-{index}" for index, keys in enumerate(batches)}

        async def one(keys: list[str]) -> object:
            await store.finish(keys, [], owners.get(id(keys), owner), TTL_MS)
            return None
    await one(["bench:warm-up"])  # loads the script, so the run counts no SCRIPT LOAD
    if call == "finish":
        for keys in batches:
            await store.claim(keys, owners[id(keys)], LEASE_MS)
    await store.redis.config_resetstat()
    cpu, wall = time.thread_time(), time.perf_counter()
    for keys in batches:
        await one(keys)
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    stats = await store.redis.info("commandstats")
    server_us = stats.get("cmdstat_set" if call == "pipeline-set" else "cmdstat_evalsha", {}).get("usec", 0)
    n = len(batches)
    return wall / n * 1000, cpu / n * 1000, server_us / n / 1000


async def _main(args: argparse.Namespace, redis_url: str, prefix: str) -> dict[str, list[tuple[float, float, float]]]:
    store = RedisIdempotencyStore(redis_url)
    lot = RedisParkingLot(store.redis, redis_url)
    blocking = redis.Redis.from_url(redis_url)
    figures: dict[str, list[tuple[float, float, float]]] = {call: [] for call in CALLS}
    try:
        for round_ in range(args.rounds):
            order = CALLS[round_ % len(CALLS):] + CALLS[:round_ % len(CALLS)]
            for call in order:
                tag = uuid.uuid4().hex[:8]  # fresh keys for every run: claims and SET NX find none set
                batches = [[f"{prefix}idem:{{saga-{tag}-{b}-{i}}}:step:step:{uuid.UUID(int=b << 32 | i)}"
                            for i in range(args.keys)] for b in range(args.batches)]
                figures[call].append(await _run(call, store, lot, blocking, batches))
                wall, cpu, server = figures[call][-1]
                print(f"  round {round_ + 1}, {call:12s}: wall {wall:.2f} ms, client CPU {cpu:.2f} ms, "
                      f"Redis {server:.2f} ms per batch of {args.keys}")
    finally:
        await store.close()
        blocking.close()
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=500, help="keys per batch (choreo's batch_size)")
    parser.add_argument("--batches", type=int, default=200, help="batches per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each call once per round")
    parser.add_argument("--broker-from-env", action="store_true", help="use CHOREO_REDIS when set")
    args = parser.parse_args(argv)
    if args.keys < 1 or args.batches < 1 or args.rounds < 1:
        parser.error("--keys, --batches and --rounds must be at least 1")
    with broker(args.broker_from_env) as b:
        for line in machine_lines("bench.store", sys.argv[1:] if argv is None else argv, b.description):
            print(line)
        figures = asyncio.run(_main(args, b.settings.redis_url, b.settings.redis_prefix))
    base = statistics.median(f[0] for f in figures["pipeline-set"])
    print(f"\nRedis calls per batch of {args.keys} keys, median of {args.rounds} rounds of {args.batches} batches")
    print(f"{'call':14s}{'wall ms':>10s}{'x pipeline':>12s}{'client CPU ms':>15s}{'Redis ms':>10s}")
    print("-" * 61)
    for call in CALLS:
        wall, cpu, server = (statistics.median(f[i] for f in figures[call]) for i in range(3))
        print(f"{call:14s}{wall:10.2f}{wall / base:12.2f}{cpu:15.2f}{server:10.2f}")


if __name__ == "__main__":
    main()
