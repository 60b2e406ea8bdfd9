"""Key-ordered concurrency inside a partition, offsets that never pass an unfinished event, and
backpressure, on the memory transport (the conformance suite holds it to the Kafka transport's contract).

Every event here goes to one partition (one correlation id per test unless said otherwise), so any
concurrency seen is concurrency inside a partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from choreo import ConfigurationError, Context, Event, Publisher, RetryPolicy, Service, Settings
from choreo.metrics import Metrics
from choreo.schemas import parse_schema
from choreo.stores.memory import MemoryIdempotencyStore
from choreo.transport.memory import MemoryBroker, MemoryTransport
from tests.unit.test_metrics import _value

PREFIX = "par."


class Work(Event, schema=parse_schema({
    "type": "record", "name": "Work", "namespace": "par", "version": 1,
    "fields": [{"name": "key", "type": "string"}, {"name": "seq", "type": "int"}],
})):
    key: str
    seq: int


TOPIC = PREFIX + Work.topic()


class Tracker:
    """Records what a handler saw: calls in flight (now and at most), and each key's order."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.peak_per_key: dict[str, int] = {}
        self.running: dict[str, int] = {}
        self.seen: dict[str, list[int]] = {}

    async def run(self, event: Work, delay: float, gate: asyncio.Event | None = None) -> None:
        self.in_flight += 1
        self.running[event.key] = self.running.get(event.key, 0) + 1
        self.peak = max(self.peak, self.in_flight)
        self.peak_per_key[event.key] = max(self.peak_per_key.get(event.key, 0), self.running[event.key])
        try:
            if gate is not None:
                await gate.wait()
            await asyncio.sleep(delay)
            self.seen.setdefault(event.key, []).append(event.seq)
        finally:
            self.in_flight -= 1
            self.running[event.key] -= 1


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
async def make_service(broker: MemoryBroker) -> AsyncIterator[Callable[..., Service]]:
    made: list[Service] = []

    store = MemoryIdempotencyStore()  # shared, as Redis is by every member of a group

    def make(**settings: Any) -> Service:
        metrics = settings.pop("metrics", None)
        config = Settings(topic_prefix=PREFIX, topic_partitions=settings.pop("partitions", 1), **settings)
        service = Service("par", settings=config, transport=MemoryTransport(broker), idempotency=store,
                          metrics=metrics)
        made.append(service)
        return service

    yield make
    for service in made:
        await service.close()


async def publish(broker: MemoryBroker, keys: list[str], *, saga: str | None = "one-saga",
                  partitions: int = 1) -> None:
    """Events with the given record keys, seq in publish order. The memory broker spreads records
    by key, so tests that need one partition create one."""
    config = Settings(topic_prefix=PREFIX, topic_partitions=partitions)
    async with Publisher("web", settings=config, transport=MemoryTransport(broker)) as publisher:
        for seq, key in enumerate(keys):
            await publisher.publish(Work(key=key, seq=seq), correlation_id=saga or key, key=key)


async def poll_until(service: Service, condition: Callable[[], bool], polls: int = 500) -> None:
    for _ in range(polls):
        if condition():
            await service.flush()  # what the batches so far did is durable, as a test expects
            return
        await service.poll_once(timeout=0.005)
    assert condition(), f"condition not reached within {polls} polls"
    await service.flush()


async def poll_times(service: Service, polls: int) -> None:
    for _ in range(polls):
        await service.poll_once(timeout=0.005)
    await service.flush()


def expected_order(keys: list[str]) -> dict[str, list[int]]:
    order: dict[str, list[int]] = {}
    for seq, key in enumerate(keys):
        order.setdefault(key, []).append(seq)
    return order


async def test_keys_of_one_partition_run_concurrently_up_to_the_bound_and_each_key_in_order(
    make_service: Callable[..., Service], broker: MemoryBroker
) -> None:
    service = make_service(concurrency=5)
    tracker = Tracker()

    @service.on(Work)
    async def work(event: Work, ctx: Context) -> None:
        await tracker.run(event, 0.002 * (event.seq % 3))

    keys = [f"k{i % 12}" for i in range(120)]
    await publish(broker, keys)
    assert len({r.partition for r in broker.records(TOPIC)}) == 1
    await service.start()
    await poll_until(service, lambda: sum(map(len, tracker.seen.values())) == len(keys))

    assert tracker.peak == 5, "five keys at a time, never more"
    assert set(tracker.peak_per_key.values()) == {1}, "one event of a key at a time"
    assert tracker.seen == expected_order(keys)


async def test_calls_that_wait_on_nothing_run_in_order_and_the_first_that_waits_brings_the_bound(
    make_service: Callable[..., Service], broker: MemoryBroker
) -> None:
    # A batch starts with one worker; the first call that waits on something starts the others.
    service = make_service(concurrency=4)
    tracker = Tracker()
    order: list[int] = []

    @service.on(Work)
    async def work(event: Work, ctx: Context) -> None:
        order.append(event.seq)
        if event.seq >= 10:  # the first ten never give the loop a turn
            await tracker.run(event, 0.003)

    keys = [f"k{i}" for i in range(30)]
    await publish(broker, keys)
    await service.start()
    await poll_until(service, lambda: len(order) == len(keys) and tracker.in_flight == 0)

    assert order[:11] == list(range(11)), "in offset order up to the first call that waits"
    assert tracker.peak == 4, "then as many waiting calls at a time as the bound allows"
    assert sorted(order) == list(range(30))


async def test_the_bound_holds_across_partitions(make_service: Callable[..., Service], broker: MemoryBroker) -> None:
    service = make_service(concurrency=3, partitions=4)
    tracker = Tracker()

    @service.on(Work)
    async def work(event: Work, ctx: Context) -> None:
        await tracker.run(event, 0.002)

    keys = [f"k{i}" for i in range(40)]
    await publish(broker, keys, saga=None, partitions=4)
    assert len({r.partition for r in broker.records(TOPIC)}) == 4
    await service.start()
    await poll_until(service, lambda: sum(map(len, tracker.seen.values())) == len(keys))
    assert tracker.peak == 3


async def test_partition_ordering_runs_one_event_at_a_time(make_service: Callable[..., Service],
                                                            broker: MemoryBroker) -> None:
    service = make_service(concurrency=8, ordering="partition")
    tracker = Tracker()

    @service.on(Work)
    async def work(event: Work, ctx: Context) -> None:
        await tracker.run(event, 0.001)

    keys = [f"k{i % 5}" for i in range(30)]
    await publish(broker, keys)
    await service.start()
    await poll_until(service, lambda: sum(map(len, tracker.seen.values())) == len(keys))
    assert tracker.peak == 1
    assert [seq for key in sorted(tracker.seen) for seq in tracker.seen[key]] == [
        seq for key in sorted(expected_order(keys)) for seq in expected_order(keys)[key]]


async def test_an_unordered_handler_runs_events_of_one_key_side_by_side(
    make_service: Callable[..., Service], broker: MemoryBroker
) -> None:
    service = make_service(concurrency=4)
    tracker = Tracker()

    @service.on(Work, ordering="unordered")
    async def work(event: Work, ctx: Context) -> None:
        await tracker.run(event, 0.002)

    keys = ["same"] * 12
    await publish(broker, keys)
    await service.start()
    await poll_until(service, lambda: len(tracker.seen.get("same", [])) == 12)
    assert tracker.peak_per_key["same"] == 4
    assert sorted(tracker.seen["same"]) == list(range(12))


async def test_a_handler_may_keep_its_own_ordering(make_service: Callable[..., Service], broker: MemoryBroker) -> None:
    service = make_service(concurrency=6, ordering="unordered")
    tracker = Tracker()

    @service.on(Work, ordering="key")
    async def work(event: Work, ctx: Context) -> None:
        await tracker.run(event, 0.001)

    keys = ["a", "b"] * 10
    await publish(broker, keys)
    await service.start()
    await poll_until(service, lambda: sum(map(len, tracker.seen.values())) == len(keys))
    assert tracker.peak == 2 and set(tracker.peak_per_key.values()) == {1}
    assert tracker.seen == expected_order(keys)


def test_a_bad_ordering_fails_at_registration_and_in_settings() -> None:
    service = Service("par", settings=Settings(topic_prefix=PREFIX))
    with pytest.raises(ConfigurationError, match="ordering must be one of key, partition, unordered"):
        service.on(Work, ordering="random", name="bad")(lambda e, c: None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="CHOREO_ORDERING"):
        Settings.from_env({"CHOREO_ORDERING": "sorted"})
    with pytest.raises(ConfigurationError, match="CHOREO_CONCURRENCY"):
        Settings.from_env({"CHOREO_CONCURRENCY": "0"})


async def test_a_failing_key_holds_only_itself_and_the_offset_waits_for_it(
    make_service: Callable[..., Service], broker: MemoryBroker
) -> None:
    service = make_service(concurrency=4)
    service.retry = RetryPolicy(initial_delay_s=0.05, max_delay_s=0.05, max_attempts=100)
    failing = {"stuck"}
    done: list[tuple[str, int]] = []

    @service.on(Work)
    async def work(event: Work, ctx: Context) -> None:
        if event.key in failing:
            raise RuntimeError("dependency down")
        done.append((event.key, event.seq))

    keys = ["free", "stuck", "free", "stuck", "other", "free"]
    await publish(broker, keys)
    [tp] = {(r.topic, r.partition) for r in broker.records(TOPIC)}
    await service.start()
    committed = broker.groups[service.group].committed
    await poll_until(service, lambda: len(done) == 4 and service.stats.failed >= 2)

    assert sorted(done) == [("free", 0), ("free", 2), ("free", 5), ("other", 4)], "the other keys went on"
    assert [seq for key, seq in done if key == "free"] == [0, 2, 5]
    assert committed.get(tp) == 1, "the offset stops at the unfinished event (offset 1)"
    failing.clear()
    await poll_until(service, lambda: len(done) == 6)
    assert done[4:] == [("stuck", 1), ("stuck", 3)]
    await poll_until(service, lambda: committed.get(tp) == 6)


async def test_events_waiting_in_memory_are_bounded_by_pausing_their_partitions(
    make_service: Callable[..., Service], broker: MemoryBroker
) -> None:
    service = make_service(concurrency=4, max_buffered=10, batch_size=4,
                           metrics=Metrics.from_settings("par", 0, env={}, extra_readers=[InMemoryMetricReader()]))
    service.retry = RetryPolicy(initial_delay_s=0.01, max_delay_s=0.01, max_attempts=1_000)
    transport = service._transport
    assert isinstance(transport, MemoryTransport)
    blocked = True
    done: list[int] = []

    @service.on(Work, ordering="partition")
    async def work(event: Work, ctx: Context) -> None:
        if blocked:
            raise RuntimeError("dependency down")
        done.append(event.seq)

    keys = ["k"] * 100
    await publish(broker, keys)
    await service.start()
    for _ in range(100):
        await service.poll_once(timeout=0.002)
    waiting = sum(len(items) for items in service._carried.values())
    assert 10 <= waiting <= 10 + 4, "the bound plus at most one batch"
    assert transport._paused, "the partition stopped fetching"
    text = service.metrics.render()
    assert _value(text, "choreo_consumer_paused", service="par") == 1
    assert _value(text, "choreo_consumer_in_flight", service="par") == waiting
    blocked = False
    await poll_until(service, lambda: len(done) == 100)
    assert done == list(range(100))
    assert not transport._paused


async def test_a_revoked_partition_gives_its_waiting_events_to_the_next_owner(
    make_service: Callable[..., Service], broker: MemoryBroker
) -> None:
    first, second = make_service(concurrency=4), make_service(concurrency=4)
    failing = True
    handled: list[tuple[str, int]] = []

    for service, name in ((first, "first"), (second, "second")):
        service.retry = RetryPolicy(initial_delay_s=0.01, max_delay_s=0.01, max_attempts=1_000)

        def register(service: Service, name: str) -> None:
            @service.on(Work)
            async def work(event: Work, ctx: Context) -> None:
                if name == "first" and event.key == "slow" and failing:
                    raise RuntimeError("not yet")
                handled.append((name, event.seq))

        register(service, name)

    keys = ["slow", "fast", "slow", "fast"]
    await publish(broker, keys)
    await first.start()
    await poll_until(first, lambda: len(handled) == 2)
    [tp] = {(r.topic, r.partition) for r in broker.records(TOPIC)}
    assert broker.groups[first.group].committed.get(tp) is None, "offset 0 is not finished"
    await first.close()  # gives up its partitions: the waiting events go with them

    await second.start()
    await poll_until(second, lambda: len(handled) >= 4 and broker.groups[second.group].committed.get(tp) == 4)
    assert sorted(handled) == [("first", 1), ("first", 3), ("second", 0), ("second", 2)]
    assert broker.groups[second.group].committed[tp] == 4


# --- slow calls: a batch goes on without them ----------------------------------------------------


async def test_one_slow_call_holds_back_only_its_key(make_service: Callable[..., Service], broker: MemoryBroker) -> None:
    service = make_service(concurrency=4, slow_handler_ms=20)
    release = asyncio.Event()
    done: list[tuple[str, int]] = []

    @service.on(Work)
    async def work(event: Work, ctx: Context) -> None:
        if event.key == "slow" and event.seq == 0:
            await release.wait()  # a call that takes as long as the test wants
        done.append((event.key, event.seq))

    keys = ["slow", "fast", "slow", "fast", "other"]
    await publish(broker, keys)
    [tp] = {(r.topic, r.partition) for r in broker.records(TOPIC)}
    await service.start()
    committed = broker.groups[service.group].committed
    await poll_until(service, lambda: len(done) == 3)
    await poll_times(service, 10)
    assert sorted(done) == [("fast", 1), ("fast", 3), ("other", 4)], "the other keys went on"
    assert committed.get(tp) is None, "nothing passes the running call at offset 0"

    release.set()
    await poll_until(service, lambda: len(done) == 5 and committed.get(tp) == 5, polls=100)
    assert [seq for key, seq in done if key == "slow"] == [0, 2]
    assert service.stats.processed == 5


async def test_stop_waits_for_a_slow_call_and_makes_its_outcome_durable(
    make_service: Callable[..., Service], broker: MemoryBroker
) -> None:
    service = make_service(concurrency=4, slow_handler_ms=20)
    started, release = asyncio.Event(), asyncio.Event()

    @service.on(Work)
    async def work(event: Work, ctx: Context) -> None:
        started.set()
        await release.wait()

    await publish(broker, ["only"])
    [tp] = {(r.topic, r.partition) for r in broker.records(TOPIC)}
    await service.start()
    running = asyncio.create_task(service.run())
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.05)  # the batch has gone on without the call
    service.stop()
    await asyncio.sleep(0.05)
    assert not running.done(), "run() waits for the call"
    release.set()
    await asyncio.wait_for(running, 5)
    assert service.stats.processed == 1
    assert broker.groups[service.group].committed[tp] == 1


async def test_a_slow_call_outliving_its_partition_is_finished_once_and_its_key_stays_in_order(
    make_service: Callable[..., Service], broker: MemoryBroker
) -> None:
    # Two partitions, no retry topics: when the second member joins, it takes partition 1 over.
    first = make_service(concurrency=4, slow_handler_ms=20, partitions=2, retry_tiers=0)
    second = make_service(concurrency=4, partitions=2, retry_tiers=0)
    release = asyncio.Event()
    handled: list[tuple[str, int]] = []

    def register(service: Service, name: str) -> None:
        @service.on(Work)
        async def work(event: Work, ctx: Context) -> None:
            if name == "first" and event.seq == 0:
                await release.wait()
            handled.append((name, event.seq))

    register(first, "first")
    register(second, "second")
    await publish(broker, ["KEY", "KEY", "KEY"], partitions=2)
    [tp] = {(r.topic, r.partition) for r in broker.records(TOPIC)}
    assert tp[1] == 1
    await first.start()
    await poll_times(first, 5)
    assert handled == []
    await second.start()  # takes partition 1 over while the call runs on the first member
    await poll_times(first, 3)
    await poll_times(second, 20)
    assert tp in second._transport.assignment() and tp not in first._transport.assignment()  # type: ignore[union-attr]
    assert handled == [], "the claim keeps the new owner waiting behind the running call"

    release.set()
    await poll_times(first, 5)  # settles it: emitted and marked done, though the offset is not its own
    await poll_until(second, lambda: len(handled) == 3)
    assert handled == [("first", 0), ("second", 1), ("second", 2)]
    await poll_until(second, lambda: broker.groups[second.group].committed.get(tp) == 3)


async def test_late_calls_count_against_the_concurrency_bound(
    make_service: Callable[..., Service], broker: MemoryBroker
) -> None:
    service = make_service(concurrency=2, slow_handler_ms=5)
    tracker = Tracker()
    release = asyncio.Event()

    @service.on(Work)
    async def work(event: Work, ctx: Context) -> None:
        await tracker.run(event, 0.0, gate=release)

    keys = ["a", "b", "c", "d", "a", "c"]
    await publish(broker, keys)
    await service.start()
    store = service._store
    assert store is not None
    claims: list[int] = []
    claim = store.claim

    async def counted(keys: Any, owner: str, lease_ms: int) -> Any:
        claims.append(len(keys))
        return await claim(keys, owner, lease_ms)

    store.claim = counted  # type: ignore[method-assign]
    await poll_times(service, 30)
    assert tracker.peak == 2 and tracker.seen == {}, "two slow calls hold both slots; nothing else starts"
    assert len(claims) == 1, "while every slot is taken, waiting events are not claimed again and again"
    release.set()
    await poll_until(service, lambda: sum(map(len, tracker.seen.values())) == len(keys))
    assert tracker.peak == 2
    assert tracker.seen == expected_order(keys)
