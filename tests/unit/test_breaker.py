"""Circuit breakers: the state machine, and a service that stops burning retries on a dead dependency."""

from __future__ import annotations

import pytest

from choreo import CircuitBreaker, ConfigurationError, Context, Publisher, RetryPolicy, Service, Settings
from choreo.breaker import BreakerState
from choreo.stores.memory import MemoryIdempotencyStore
from choreo.transport.memory import MemoryBroker, MemoryTransport
from tests.unit.test_service import ORDERS, PREFIX, SAGA_A, OrderPlaced


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_failures_in_the_window_then_probes_once() -> None:
    clock, changes = Clock(), []
    b = BreakerState(CircuitBreaker(failures=3, window_s=10, open_s=5), clock=clock,
                     on_change=lambda old, new, why: changes.append((old, new)))
    for t in (0, 1, 2):
        clock.now = t
        assert b.allow()
        b.failure()
    assert b.state == "open" and not b.allow() and b.retry_in() == 5
    clock.now = 7
    assert b.allow() and b.state == "half-open"
    assert not b.allow(), "one probe at a time"
    b.failure()
    assert b.state == "open" and b.retry_in() == 5
    clock.now = 12
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()
    assert changes == [("closed", "open"), ("open", "half-open"), ("half-open", "open"), ("open", "half-open"),
                       ("half-open", "closed")]


def test_failures_outside_the_window_do_not_open_it() -> None:
    clock = Clock()
    b = BreakerState(CircuitBreaker(failures=2, window_s=1, open_s=5), clock=clock)
    b.failure()
    clock.now = 5
    b.failure()
    assert b.state == "closed"


def test_bad_settings_fail_when_built() -> None:
    with pytest.raises(ConfigurationError, match="CircuitBreaker"):
        CircuitBreaker(failures=0)


async def test_an_open_breaker_spares_the_retries_and_the_probe_closes_it() -> None:
    broker = MemoryBroker()
    config = Settings(topic_prefix=PREFIX, topic_partitions=4)
    service = Service("svc", settings=config, transport=MemoryTransport(broker), idempotency=MemoryIdempotencyStore(),
                      retry=RetryPolicy(max_attempts=3, initial_delay_s=0.001, max_delay_s=0.001))
    down = {"yes": True}
    calls: list[str] = []

    @service.on(OrderPlaced, breaker=CircuitBreaker(failures=2, window_s=60, open_s=0.05))
    async def charge(event: OrderPlaced, ctx: Context) -> None:
        calls.append(event.order_id)
        if down["yes"]:
            raise ConnectionError("payment API unreachable")

    publisher = Publisher("web", settings=config, transport=MemoryTransport(broker))
    await publisher.start()
    await service.start()
    await publisher.publish(OrderPlaced(order_id="o-1", quantity=1), correlation_id=SAGA_A)
    for _ in range(100):
        await service.poll_once(timeout=0.005)
        if service.breaker_states() == {"charge": "open"}:
            break
    assert service.breaker_states() == {"charge": "open"} and calls == ["o-1", "o-1"]
    down["yes"] = False  # the dependency comes back: the next probe succeeds
    for _ in range(200):
        await service.poll_once(timeout=0.005)
        if service.stats.processed == 1:
            break
    assert service.stats.processed == 1 and service.breaker_states() == {"charge": "closed"}
    assert calls == ["o-1", "o-1", "o-1"], "two failures opened it; the probe ran once and succeeded"
    assert broker.records(ORDERS + ".dlq") == [], "attempts were not burned while it was open"
    await service.close()
    await publisher.close()
