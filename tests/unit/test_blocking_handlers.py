"""Handlers written as plain ``def`` (blocking I/O) run in the service's bounded thread pool, never on
the event loop, with the same emits, retries and log fields as async handlers."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from choreo import Context, Publisher, RetryPolicy, Service, Settings, configure_logging
from choreo.stores.memory import MemoryIdempotencyStore
from choreo.transport.memory import MemoryBroker, MemoryTransport
from tests.unit.test_service import PREFIX, STOCK, OrderPlaced, StockReserved, poll_until


@pytest.fixture
async def world() -> AsyncIterator[tuple[Callable[..., Service], Publisher, MemoryBroker]]:
    broker = MemoryBroker()
    made: list[Service] = []

    def make(**settings: Any) -> Service:
        config = Settings(topic_prefix=PREFIX, topic_partitions=4, **settings)
        service = Service("inventory", settings=config, transport=MemoryTransport(broker),
                          idempotency=MemoryIdempotencyStore(), retry=RetryPolicy(initial_delay_s=0.001))
        made.append(service)
        return service

    publisher = Publisher("web", settings=Settings(topic_prefix=PREFIX, topic_partitions=4),
                          transport=MemoryTransport(broker))
    await publisher.start()
    yield make, publisher, broker
    for service in made:
        await service.close()
    await publisher.close()


async def test_a_plain_def_runs_off_the_event_loop_and_emits(
    world: tuple[Callable[..., Service], Publisher, MemoryBroker]
) -> None:
    make, publisher, broker = world
    service = make()
    threads: list[str] = []

    @service.on(OrderPlaced, emits=[StockReserved])
    def reserve(event: OrderPlaced, ctx: Context) -> None:
        threads.append(threading.current_thread().name)
        time.sleep(0.01)  # blocking I/O, as a database driver would do
        ctx.emit(StockReserved(order_id=event.order_id))

    await service.start()
    await publisher.publish(OrderPlaced(order_id="o1", quantity=1))
    await poll_until(service, lambda: service.stats.processed == 1)
    assert threads == ["inventory-handler_0"] and threading.current_thread().name != threads[0]
    assert len(broker.records(STOCK)) == 1


async def test_blocking_handlers_are_bounded_by_the_pool_and_retried_like_async_ones(
    world: tuple[Callable[..., Service], Publisher, MemoryBroker]
) -> None:
    make, publisher, _ = world
    service = make(handler_threads=2)
    running, peak, lock = [0], [0], threading.Lock()
    failed: set[str] = set()

    @service.on(OrderPlaced)
    def reserve(event: OrderPlaced, ctx: Context) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.02)
            if event.order_id not in failed:
                failed.add(event.order_id)
                raise TimeoutError("database busy")
        finally:
            with lock:
                running[0] -= 1

    await service.start()
    for i in range(12):  # spread over the 4 partitions, which run concurrently
        await publisher.publish(OrderPlaced(order_id=f"o{i}", quantity=1), correlation_id=f"saga-{i}")
    await poll_until(service, lambda: service.stats.processed == 12, polls=2000)
    assert peak[0] == 2, "never more threads than handler_threads"
    assert service.stats.failed == 12 and service.stats.retried == 12


async def test_log_lines_from_a_blocking_handler_name_its_event(
    world: tuple[Callable[..., Service], Publisher, MemoryBroker]
) -> None:
    make, publisher, _ = world
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging(Settings(log_format="json"), stream=stream)
    try:
        service = make()

        @service.on(OrderPlaced)
        def reserve(event: OrderPlaced, ctx: Context) -> None:
            logging.getLogger("db").info("reserved %s", event.order_id)

        await service.start()
        event_id = await publisher.publish(OrderPlaced(order_id="o1", quantity=1), correlation_id="saga-1")
        await poll_until(service, lambda: service.stats.processed == 1)
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    [line] = [json.loads(raw) for raw in stream.getvalue().splitlines() if "reserved o1" in raw]
    assert (line["handler"], line["event_id"], line["saga_id"]) == ("reserve", event_id, "saga-1")
