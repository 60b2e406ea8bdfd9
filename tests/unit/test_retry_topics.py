"""Retry topics on the memory transport: long delays leave the partition free, a retry record waits
for its due time, later events of a key wait behind it (unless retries are unordered), and an event
that gives up in a retry topic is dead-lettered as its original record."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from choreo import Context, DLQHeader, IdempotencyError, Publisher, RetryLater, RetryPolicy, Service, Settings
from choreo.parking import Gate
from choreo.retry import RetryHeader, RetryState, original_topic, retry_tier, retry_topic
from choreo.stores.memory import MemoryIdempotencyStore, MemoryParkingLot
from choreo.transport import OutgoingRecord
from choreo.transport.memory import MemoryBroker, MemoryTransport
from tests.unit.test_service import ORDERS, PREFIX, OrderPlaced, poll_until

# One partition: events of different keys share it, so "the partition moves on" is observable.
RETRY_1 = ORDERS + ".retry.1"


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
def lot() -> MemoryParkingLot:
    return MemoryParkingLot()


@pytest.fixture
async def make_service(broker: MemoryBroker, lot: MemoryParkingLot) -> AsyncIterator[Callable[..., Service]]:
    made: list[Service] = []

    def make(**kwargs: Any) -> Service:
        service = Service("inventory", settings=Settings(topic_prefix=PREFIX, topic_partitions=1),
                          transport=MemoryTransport(broker), idempotency=MemoryIdempotencyStore(), parking=lot,
                          **kwargs)
        made.append(service)
        return service

    yield make
    for service in made:
        await service.close()


@pytest.fixture
async def publisher(broker: MemoryBroker) -> AsyncIterator[Publisher]:
    publisher = Publisher("web", settings=Settings(topic_prefix=PREFIX, topic_partitions=1),
                          transport=MemoryTransport(broker))
    await publisher.start()
    yield publisher
    await publisher.close()


def _flaky(service: Service, fails: dict[str, int], log: list[str], **kwargs: Any) -> None:
    @service.on(OrderPlaced, **kwargs)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        if fails.get(event.order_id, 0) > 0:
            fails[event.order_id] -= 1
            raise RuntimeError(f"{event.order_id} not yet")
        log.append(event.order_id)


# Deterministic delays of 0.05 s, 0.1 s, ...; every one is "long" (in_process_max_s=0).
VIA_TOPICS = RetryPolicy(max_attempts=4, initial_delay_s=0.05, max_delay_s=1.0, in_process_max_s=0.0,
                         random=lambda: 1.0)


async def test_a_long_delay_goes_through_a_retry_topic_and_the_partition_moves_on(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    service = make_service(retry=VIA_TOPICS)
    log: list[str] = []
    _flaky(service, {"a1": 1}, log)
    await service.start()
    await publisher.publish(OrderPlaced(order_id="a1", quantity=1), correlation_id="a", event_id="e-a1")
    await publisher.publish(OrderPlaced(order_id="b1", quantity=1), correlation_id="b", event_id="e-b1")
    await poll_until(service, lambda: log == ["b1"])  # b1 ran while a1 waits in the retry topic
    [waiting] = broker.records(RETRY_1)
    state = RetryState.read(waiting.headers)
    assert (state.attempts, state.handlers, state.origin, state.parked) == (1, ("reserve",), (ORDERS, 0, 0), False)
    assert "RuntimeError: a1 not yet" in state.error
    assert waiting.value == broker.records(ORDERS)[0].value and waiting.key == b"a"
    await poll_until(service, lambda: log == ["b1", "a1"])
    assert service.stats.retried == 1 and not broker.records(ORDERS + ".dlq")


async def test_a_retry_record_never_runs_before_it_is_due(
    make_service: Callable[..., Service], publisher: Publisher
) -> None:
    service = make_service(retry=RetryPolicy(in_process_max_s=0.1))
    runs: list[float] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RetryLater("the warehouse is closed", delay_s=0.6)

    await service.start()
    await publisher.publish(OrderPlaced(order_id="a1", quantity=1), correlation_id="a")
    await poll_until(service, lambda: len(runs) == 2, polls=1000)
    assert runs[1] - runs[0] >= 0.6 - 0.01  # due time is a lower bound (ms resolution)


async def test_later_events_of_a_key_in_retry_wait_behind_it_and_run_in_order(
    make_service: Callable[..., Service], publisher: Publisher, lot: MemoryParkingLot
) -> None:
    service = make_service(retry=VIA_TOPICS)
    log: list[str] = []
    _flaky(service, {"a1": 2}, log)
    await service.start()
    for order_id, key in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("a3", "a")]:
        await publisher.publish(OrderPlaced(order_id=order_id, quantity=1), correlation_id=key)
    await poll_until(service, lambda: len(log) == 4, polls=1000)
    assert log[0] == "b1", "the other key was not held up"
    assert [o for o in log if o.startswith("a")] == ["a1", "a2", "a3"]
    assert service.stats.parked >= 2 and not lot.lists, "the key's list is gone once all ran"


async def test_unordered_retries_let_later_events_of_the_key_run(
    make_service: Callable[..., Service], publisher: Publisher, lot: MemoryParkingLot
) -> None:
    service = make_service(retry=RetryPolicy(max_attempts=4, initial_delay_s=0.05, in_process_max_s=0.0,
                                             random=lambda: 1.0, ordered=False))
    log: list[str] = []
    _flaky(service, {"a1": 1}, log)
    await service.start()
    for order_id in ("a1", "a2"):
        await publisher.publish(OrderPlaced(order_id=order_id, quantity=1), correlation_id="a")
    await poll_until(service, lambda: len(log) == 2)
    assert log == ["a2", "a1"] and service.stats.parked == 0 and not lot.lists


async def test_an_event_that_gives_up_in_a_retry_topic_is_dead_lettered_as_its_original(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker, lot: MemoryParkingLot
) -> None:
    service = make_service(retry=VIA_TOPICS)
    log: list[str] = []
    _flaky(service, {"a1": 99}, log)
    await service.start()
    await publisher.publish(OrderPlaced(order_id="a1", quantity=1), correlation_id="a", event_id="e-a1")
    await publisher.publish(OrderPlaced(order_id="a2", quantity=1), correlation_id="a")
    await poll_until(service, lambda: log == ["a2"], polls=1000)
    [letter] = broker.records(ORDERS + ".dlq")
    original = broker.records(ORDERS)[0]
    headers = dict(letter.headers)
    assert headers[DLQHeader.TOPIC] == ORDERS.encode() and headers[DLQHeader.OFFSET] == b"0"
    assert headers[DLQHeader.ATTEMPTS] == b"4" and headers[DLQHeader.ERROR] == b"a1 not yet"
    assert not any(k in RetryHeader.ALL for k, _ in letter.headers), "the original headers, as first consumed"
    assert letter.value == original.value and letter.key == original.key
    assert [r.topic for r in broker.records(ORDERS + ".retry.1")] and not lot.lists


async def test_a_retry_record_with_broken_headers_is_dead_lettered_with_the_reason(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    service = make_service()
    log: list[str] = []
    _flaky(service, {}, log)
    await service.start()
    await publisher.publish(OrderPlaced(order_id="a1", quantity=1), correlation_id="a")
    good = broker.records(ORDERS)[0]
    broker.append(OutgoingRecord(RETRY_1, b"a", good.value or b"", [*good.headers, (RetryHeader.DUE, b"soon")]))
    await poll_until(service, lambda: bool(broker.records(ORDERS + ".dlq")) and log == ["a1"])
    [letter] = broker.records(ORDERS + ".dlq")
    assert dict(letter.headers)[DLQHeader.REASON] == b"bad-retry-headers"
    assert b"choreo-retry-" in dict(letter.headers)[DLQHeader.ERROR]  # names the header


def test_tiers_hold_growing_delays_and_names_map_back() -> None:
    assert [retry_tier(d, 3) for d in (0.2, 5, 9.9, 10, 99, 100, 1e6)] == [1, 1, 1, 2, 2, 3, 3]
    assert retry_tier(500, 1) == 1
    assert retry_topic("t.orders.v1", 2) == "t.orders.v1.retry.2"
    assert original_topic("t.orders.v1.retry.2") == "t.orders.v1" == original_topic("t.orders.v1")
    assert original_topic("t.retry.later") == "t.retry.later"


def test_retry_state_round_trips_and_names_what_is_missing() -> None:
    state = RetryState(2, 1234, ("reserve", "audit"), "2026-11-25T10:00:00.000+00:00", ("t.o.v1", 3, 17),
                       error="RuntimeError: x")
    assert RetryState.read([("other", b"x"), *state.headers()]) == state
    with pytest.raises(ValueError, match="choreo-retry-due"):
        RetryState.read([h for h in state.headers() if h[0] != RetryHeader.DUE])


def test_service_consumes_every_retry_tier(make_service: Callable[..., Service]) -> None:
    service = make_service()
    _flaky(service, {}, [])
    assert service.retry_topics() == [retry_topic(ORDERS, k) for k in (1, 2, 3)]


class _CountingLot(MemoryParkingLot):
    """Counts the gate calls; its first ``fail`` questions ``any_parked`` fail as an outage would."""

    def __init__(self, fail: int = 0) -> None:
        super().__init__()
        self.gates = 0
        self.fail = fail

    async def any_parked(self, keys: Sequence[str]) -> bool:
        if self.fail:
            self.fail -= 1
            raise IdempotencyError("Redis is down (test)")
        return await super().any_parked(keys)

    async def gate(self, entries: Sequence[tuple[str, str, bool]], ttl_ms: int) -> list[Gate]:
        self.gates += 1
        return await super().gate(entries, ttl_ms)


async def test_the_gate_runs_only_for_a_batch_whose_keys_have_a_parking_list(
    broker: MemoryBroker, publisher: Publisher
) -> None:
    lot = _CountingLot()
    # a1's retry is due after 0.5 s: a2 arrives while a1 still heads its key's list.
    slow_retry = RetryPolicy(max_attempts=4, initial_delay_s=0.5, max_delay_s=1.0, in_process_max_s=0.0,
                             random=lambda: 1.0)
    service = Service("inventory", settings=Settings(topic_prefix=PREFIX, topic_partitions=1),
                      transport=MemoryTransport(broker), idempotency=MemoryIdempotencyStore(), parking=lot,
                      retry=slow_retry)
    log: list[str] = []
    _flaky(service, {"a1": 1}, log)
    await service.start()
    try:
        await publisher.publish(OrderPlaced(order_id="b1", quantity=1), correlation_id="b")
        await poll_until(service, lambda: log == ["b1"])
        assert lot.gates == 0, "nothing was parked: the claim's question answered for the gate"
        await publisher.publish(OrderPlaced(order_id="a1", quantity=1), correlation_id="a")
        await poll_until(service, lambda: service.stats.retried == 1)  # a1 waits in a retry topic
        await publisher.publish(OrderPlaced(order_id="a2", quantity=1), correlation_id="a")
        await poll_until(service, lambda: log == ["b1", "a1", "a2"])
        assert lot.gates > 0 and service.stats.parked >= 1, "a2 was gated behind a1, and ran after it"
    finally:
        await service.close()


async def test_a_failed_parking_question_gives_back_the_batch_claims_and_retries_it(
    broker: MemoryBroker, publisher: Publisher
) -> None:
    lot, store = _CountingLot(fail=1), MemoryIdempotencyStore()
    service = Service("inventory", settings=Settings(topic_prefix=PREFIX, topic_partitions=1),
                      transport=MemoryTransport(broker), idempotency=store, parking=lot)
    log: list[str] = []
    _flaky(service, {}, log)
    await service.start()
    try:
        await publisher.publish(OrderPlaced(order_id="a1", quantity=1), correlation_id="a")
        await poll_until(service, lambda: lot.fail == 0)
        assert log == [] and not store._keys, "nothing ran, and the claim was given back"
        await poll_until(service, lambda: log == ["a1"])
        assert service.stats.processed == 1
    finally:
        await service.close()
