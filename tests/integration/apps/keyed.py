"""A service whose effects expose per-key order and duplicates, for the parallel-processing tests.

Run as ``python -m choreo.cli run tests.integration.apps.keyed:service``. It handles ``KeyedStep``
(a record key and a sequence number); tests publish each step with ``correlation_id=key``, so the
record key is the step's key. The handler waits ``random.uniform(0, KEYED_MAX_DELAY_S)`` seconds
(default 0.005) as if it did I/O, so concurrently running keys finish out of order, then records its
effect under ``<CHOREO_REDIS_PREFIX>keyed:`` with no guard of its own:

* ``seq:<key>`` (list): the key's seqs in the order their handlers ran, so a reordering shows;
* ``effects`` (hash, ``<key>:<seq>`` -> runs), so a duplicate effect shows as a count of 2;
* ``by_pid`` (hash, pid -> runs), so a test can tell which instance did the work.

The three writes are one MULTI/EXEC, so a reader never sees one without the others.

If ``KEYED_HOLD_FILE`` is set, each handler waits while that file exists (checking every 0.05 s)
before it records anything: a test can hold every handler in flight so a backlog cannot drain.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import redis.asyncio as aioredis

from choreo import Context, Event, Service
from choreo.schemas import parse_schema


class KeyedStep(Event, schema=parse_schema({
    "type": "record", "name": "KeyedStep", "namespace": "tests.keyed", "version": 1,
    "fields": [{"name": "key", "type": "string"}, {"name": "seq", "type": "int"}],
})):
    key: str
    seq: int


MAX_DELAY_S = float(os.environ.get("KEYED_MAX_DELAY_S", "0.005"))
_hold = os.environ.get("KEYED_HOLD_FILE")
HOLD_FILE = Path(_hold) if _hold else None
PID = str(os.getpid())

# Settings come from the environment when the service starts, so importing this module (the tests
# import KeyedStep from here) opens no connection.
service = Service("keyed")
_redis: aioredis.Redis | None = None


@service.on_start
async def _open() -> None:
    global _redis
    _redis = aioredis.Redis.from_url(service.settings.redis_url, decode_responses=True)


@service.on_stop
async def _close() -> None:
    if _redis is not None:
        await _redis.aclose()


@service.on(KeyedStep)
async def record(event: KeyedStep, ctx: Context) -> None:
    assert _redis is not None, "the service opens Redis when it starts"
    while HOLD_FILE is not None and HOLD_FILE.exists():
        await asyncio.sleep(0.05)
    await asyncio.sleep(random.uniform(0, MAX_DELAY_S))
    prefix = f"{service.settings.redis_prefix}keyed:"
    async with _redis.pipeline(transaction=True) as tx:
        tx.rpush(f"{prefix}seq:{event.key}", event.seq)
        tx.hincrby(f"{prefix}effects", f"{event.key}:{event.seq}", 1)
        tx.hincrby(f"{prefix}by_pid", PID, 1)
        await tx.execute()
