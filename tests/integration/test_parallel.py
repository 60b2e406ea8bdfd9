"""Parallel processing inside a partition, with real service processes, a real broker and Redis.

Whatever the degree of concurrency (``CHOREO_CONCURRENCY`` handler calls per service, different
record keys side by side), these tests prove two things a user relies on:

* a consumer group that gains a member mid-stream and loses one (SIGTERM, with handlers in flight
  and a backlog fetched) still gives every event exactly one effect and runs each key's events in
  publish order: the work handed over in a rebalance is neither skipped nor done twice;
* a backlog of a million events does not become a million events in memory: the service's resident
  memory stays under a fixed bound while it works through the backlog in key order, and it still
  stops cleanly on SIGTERM.

The effects are written by ``tests.integration.apps.keyed`` with no guard of its own, so a
reordering or a duplicate that choreo let through shows up in Redis.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient

from choreo import Publisher, Settings
from choreo.wire import Wire, new_event_id
from tests.integration.apps.keyed import KeyedStep
from tests.integration.helpers import ServiceProcess, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

TARGET = "tests.integration.apps.keyed:service"

# Peak resident memory of the keyed service 20 s into the million-event backlog, measured on the
# 2-core machine: 129 MB with 64 handler calls in flight (~5,600 events/s), 118 MB running one event
# at a time per partition. The bound is that peak x1.5, rounded up. It catches a backlog that ends up
# in memory (a million records is a few hundred MB in librdkafka alone, far more as Python objects),
# not a tuning change: even a 2 GB prefetch budget peaked at 151 MB, as librdkafka also stops
# prefetching at queued.min.messages.
RSS_BOUND_MB = 200


class Effects:
    """Reads what the keyed app wrote under the test's Redis prefix."""

    def __init__(self, settings: Settings) -> None:
        self.redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        self.prefix = f"{settings.redis_prefix}keyed:"

    async def handled(self) -> int:
        return int(await self.redis.hlen(self.prefix + "effects"))

    async def counts(self) -> dict[str, int]:
        found = await self.redis.hgetall(self.prefix + "effects")
        return {str(k): int(v) for k, v in found.items()}

    async def by_pid(self, pid: int) -> int:
        return int(await self.redis.hget(self.prefix + "by_pid", str(pid)) or 0)

    async def total_runs(self) -> int:
        return sum(int(v) for v in (await self.redis.hgetall(self.prefix + "by_pid")).values())

    async def sequences(self, keys: Sequence[str]) -> dict[str, list[int]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.lrange(f"{self.prefix}seq:{key}", 0, -1)
            lists = await pipe.execute()
        return {key: [int(s) for s in seqs] for key, seqs in zip(keys, lists)}

    async def close(self) -> None:
        await self.redis.aclose()


def random_steps(n: int, keys: int, seed: int) -> list[KeyedStep]:
    """``n`` steps over ``keys`` keys in a random but repeatable interleaving; seqs count up per key."""
    rng = random.Random(seed)
    next_seq: dict[str, int] = {}
    steps = []
    for _ in range(n):
        key = f"k{rng.randrange(keys):03d}"
        seq = next_seq.get(key, 0)
        next_seq[key] = seq + 1
        steps.append(KeyedStep(key=key, seq=seq))
    return steps


async def publish_steps(publisher: Publisher, steps: Sequence[KeyedStep], *, per_second: float | None = None,
                        chunk: int = 500) -> None:
    """Publish in order, each step keyed by its key (its saga id), optionally paced."""
    for start in range(0, len(steps), chunk):
        part = steps[start:start + chunk]
        await publisher.publish_many(part, correlation_ids=[s.key for s in part])
        if per_second is not None:
            await asyncio.sleep(len(part) / per_second)


def vm_kb(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory figure (``VmRSS``, ``VmHWM``) in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


# -- a member joins and leaves mid-stream ------------------------------------------------------------

EVENTS, KEYS = 6_000, 200
HEAD, TAIL = 1_500, 1_000  # published before the first member starts / while the second one leaves


@pytest.mark.timeout(180)
async def test_a_member_joining_and_leaving_mid_stream_keeps_key_order_and_one_effect(
    settings: Settings, tmp_path: Path
) -> None:
    steps = random_steps(EVENTS, KEYS, seed=6)
    head, middle, tail = steps[:HEAD], steps[HEAD:EVENTS - TAIL], steps[EVENTS - TAIL:]
    expected: dict[str, list[int]] = {}
    for s in steps:
        expected.setdefault(s.key, []).append(s.seq)
    hold = tmp_path / "hold"
    env = {"CHOREO_CONCURRENCY": "32", "KEYED_MAX_DELAY_S": "0.01", "KEYED_HOLD_FILE": str(hold)}
    effects = Effects(settings)
    a: ServiceProcess | None = None
    b: ServiceProcess | None = None
    feeder: asyncio.Task[None] | None = None
    try:
        async with Publisher("test", settings=settings) as publisher:
            await publish_steps(publisher, head)
            a = ServiceProcess(TARGET, settings, tmp_path / "keyed-a.log", **env)
            first = a

            async def a_works() -> bool:
                assert first.proc.poll() is None, first.output()[-3000:]
                return await effects.handled() >= 100

            await wait_until(a_works, 60, "the first member's first effects")

            # The rest arrives as a stream, so the second member joins while events keep coming
            # however fast the first one drains the head.
            feeding = feeder = asyncio.create_task(publish_steps(publisher, middle, per_second=250, chunk=50))
            b = ServiceProcess(TARGET, settings, tmp_path / "keyed-b.log", **env)
            second = b

            async def b_works() -> bool:
                assert second.proc.poll() is None, second.output()[-3000:]
                if feeding.done():
                    feeding.result()
                return await effects.by_pid(second.proc.pid) >= 100

            await wait_until(b_works, 60, "the second member's first effects after the rebalance")
            await asyncio.wait_for(feeder, 60)

            # Hold every handler, so the tail piles up fetched and in flight in both members; the
            # second one is then told to stop while its handlers are still held, and leaves with work
            # started but unfinished, which its partitions' next owner must finish exactly once. The
            # whole hold stays well inside the 2 s claim lease, so no claim lapses under a live run.
            hold.touch()
            await publish_steps(publisher, tail, chunk=TAIL)
            await asyncio.sleep(0.7)
            pending = EVENTS - await effects.handled()
            b.proc.terminate()
            await asyncio.sleep(0.3)
            hold.unlink()
            assert pending > 0, "the second member must leave with work pending"
            assert b.wait(30) == 0, b.output()[-3000:]
            by_b = await effects.by_pid(b.proc.pid)

        async def all_handled() -> bool:
            assert first.proc.poll() is None, first.output()[-3000:]
            return await effects.handled() >= EVENTS

        await wait_until(all_handled, 90, f"all {EVENTS} events handled")
        await asyncio.sleep(1.5)  # give a stray duplicate the time to show before judging

        counts = await effects.counts()
        expected_ids = {f"{s.key}:{s.seq}" for s in steps}
        lost = expected_ids - counts.keys()
        duplicated = {k: v for k, v in counts.items() if v != 1}
        assert (sorted(lost), duplicated) == ([], {})
        assert counts.keys() == expected_ids
        assert await effects.total_runs() == EVENTS
        seen = await effects.sequences(sorted(expected))
        misordered = {k: seen[k] for k in expected if seen[k] != expected[k]}
        assert misordered == {}, f"{len(misordered)} keys out of order, e.g. {next(iter(misordered.items()))}"
        by_a = await effects.by_pid(a.proc.pid)
        print(f"\nsecond member left with {pending} of {EVENTS} events unhandled; runs: a={by_a}, b={by_b}")
        assert by_a > 0 and by_b > 0, f"both members must have worked: a={by_a}, b={by_b}"
        assert a.terminate() == 0, a.output()[-3000:]
    finally:
        hold.unlink(missing_ok=True)
        if feeder is not None:
            feeder.cancel()
        for proc in (a, b):
            if proc is not None and proc.proc.poll() is None:
                proc.kill()
        await effects.close()


# -- a million-event backlog -------------------------------------------------------------------------

BACKLOG, BACKLOG_KEYS = 1_000_000, 1_000
SAMPLE_S, SAMPLE_EVERY_S = 20.0, 0.2


def produce_backlog(settings: Settings, first: int, count: int) -> None:
    """Steps ``first`` .. ``first + count - 1`` of the backlog, exactly as ``Publisher`` writes them.

    Step ``i`` has key ``i % BACKLOG_KEYS`` and seq ``i // BACKLOG_KEYS``, so each key's seqs count
    up in publish order. The records come from choreo's own ``Wire`` (value and headers) and go out
    through a producer with the settings' client config, hence the same partitioner as choreo's.
    Idempotence keeps each partition in produce order through retries.
    """
    wire = Wire("test", [KeyedStep], topic_prefix=settings.topic_prefix)
    producer = Producer({
        "bootstrap.servers": settings.kafka_bootstrap, **settings.kafka_config,
        "enable.idempotence": True, "acks": "all", "linger.ms": 20, "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 500_000, "message.timeout.ms": 60_000,
    })
    errors: list[KafkaError] = []

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    for i in range(first, first + count):
        step = KeyedStep(key=f"k{i % BACKLOG_KEYS:03d}", seq=i // BACKLOG_KEYS)
        r = wire.encode(step, event_id=new_event_id(), correlation_id=step.key, causation_id=None)
        headers: list[tuple[str, str | bytes | None]] = list(r.headers)
        while True:
            try:
                producer.produce(r.topic, r.value, r.key, headers=headers, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)  # the local queue is full: let deliveries drain
        if i % 10_000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    assert left == 0 and not errors, f"{left} undelivered, errors: {errors[:3]}"


@pytest.mark.timeout(240)
async def test_a_million_event_backlog_keeps_the_service_memory_bounded(
    settings: Settings, tmp_path: Path
) -> None:
    started = time.monotonic()
    # The first steps go through Publisher, which creates the topic and registers the schema.
    async with Publisher("test", settings=settings) as publisher:
        head = [KeyedStep(key=f"k{i % BACKLOG_KEYS:03d}", seq=i // BACKLOG_KEYS) for i in range(BACKLOG_KEYS)]
        await publish_steps(publisher, head, chunk=BACKLOG_KEYS)
    await asyncio.to_thread(produce_backlog, settings, BACKLOG_KEYS, BACKLOG - BACKLOG_KEYS)
    published = time.monotonic()

    effects = Effects(settings)
    service = ServiceProcess(TARGET, settings, tmp_path / "keyed.log", CHOREO_CONCURRENCY="64",
                             KEYED_MAX_DELAY_S="0.01")
    pid = service.proc.pid
    try:
        async def working() -> bool:
            assert service.proc.poll() is None, service.output()[-3000:]
            return await effects.handled() > 0

        await wait_until(working, 60, "the service's first effect")
        peak_rss_kb = 0
        progress: list[int] = []
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < SAMPLE_S:
            assert service.proc.poll() is None, service.output()[-3000:]
            peak_rss_kb = max(peak_rss_kb, vm_kb(pid, "VmRSS"))
            if len(progress) < elapsed // (SAMPLE_S / 4) + 1:
                progress.append(await effects.handled())
            await asyncio.sleep(SAMPLE_EVERY_S)
        progress.append(await effects.handled())
        hwm_kb = vm_kb(pid, "VmHWM")

        stopping = time.monotonic()
        assert service.terminate(30) == 0, service.output()[-3000:]
        stopped_in = time.monotonic() - stopping

        print(f"\nbacklog published in {published - started:.1f} s; handled {progress} "
              f"(every {SAMPLE_S / 4:.0f} s); peak VmRSS {peak_rss_kb / 1024:.1f} MB, "
              f"VmHWM {hwm_kb / 1024:.1f} MB; stopped in {stopped_in:.1f} s")
        assert all(b > a for a, b in zip(progress, progress[1:])), f"progress stalled: {progress}"
        assert progress[-1] < BACKLOG, "the backlog must outlast the sampling for the bound to mean anything"
        peak_mb = max(peak_rss_kb, hwm_kb) / 1024
        assert peak_mb < RSS_BOUND_MB, f"peak RSS {peak_mb:.1f} MB over the {RSS_BOUND_MB} MB bound"

        counts = await effects.counts()
        duplicated = {k: v for k, v in counts.items() if v != 1}
        assert duplicated == {}
        keys = [f"k{k:03d}" for k in range(BACKLOG_KEYS)]
        seen = await effects.sequences(keys)
        # Each key's effects are a prefix of its published seqs, in order: nothing skipped or reordered.
        misordered = {k: s for k, s in seen.items() if s != list(range(len(s)))}
        assert misordered == {}, f"{len(misordered)} keys out of order, e.g. {next(iter(misordered.items()))}"
        assert sum(len(s) for s in seen.values()) == len(counts)
    finally:
        if service.proc.poll() is None:
            service.kill()
        await effects.close()
        # The embedded broker keeps every record in memory for the rest of the run.
        await delete_topic(settings, settings.topic_prefix + KeyedStep.topic())


async def delete_topic(settings: Settings, topic: str) -> None:
    # The client lives as long as this call: a failing test's traceback would otherwise keep it
    # reconnecting to a broker the session has already stopped.
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, **settings.kafka_config})
    for future in admin.delete_topics([topic], operation_timeout=30).values():
        await asyncio.wrap_future(future)
