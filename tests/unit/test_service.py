"""Service processing over the memory transport and memory idempotency store.

Each test builds its own small service and drives it with ``poll_once``; waits are bounded numbers of
polls (an idle poll of the memory transport takes about 10 ms), never sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from choreo import (
    ConfigurationError, Context, DeadLetterNow, DLQHeader, EmitError, Envelope, Event, Header, Publisher,
    RetryPolicy, Service, Settings,
)
from choreo.deadletter import last_header
from choreo.idempotency import ClaimResult, idempotency_key
from choreo.schemas import AvroSchema, parse_schema
from choreo.stores.memory import MemoryIdempotencyStore
from choreo.transport import OutgoingRecord, Record
from choreo.transport.memory import MemoryBroker, MemoryTransport
from choreo.wire import Wire, derive_event_id


def _schema(name: str, fields: list[dict[str, Any]]) -> AvroSchema:
    return parse_schema({"type": "record", "name": name, "namespace": "checkout", "version": 1, "fields": fields})


class OrderPlaced(Event, schema=_schema("OrderPlaced", [
    {"name": "order_id", "type": "string"}, {"name": "quantity", "type": "int"}])):
    order_id: str
    quantity: int


class StockReserved(Event, schema=_schema("StockReserved", [{"name": "order_id", "type": "string"}])):
    order_id: str


class RefundIssued(Event, schema=_schema("RefundIssued", [{"name": "order_id", "type": "string"}])):
    order_id: str


PREFIX = "t."
ORDERS = PREFIX + "checkout.order-placed.v1"
STOCK = PREFIX + "checkout.stock-reserved.v1"
# Two correlation ids (hence keys) that the memory broker puts on different partitions of 4.
SAGA_A, SAGA_B = "saga-a", "saga-b"


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
def config() -> Settings:
    return Settings(topic_prefix=PREFIX, topic_partitions=4)


@pytest.fixture
async def make_service(broker: MemoryBroker, config: Settings) -> AsyncIterator[Callable[..., Service]]:
    made: list[Service] = []

    def make(name: str = "inventory", **kwargs: Any) -> Service:
        service = Service(name, settings=config, transport=MemoryTransport(broker),
                          idempotency=MemoryIdempotencyStore(), **kwargs)
        made.append(service)
        return service

    yield make
    for service in made:
        await service.close()


@pytest.fixture
async def publisher(broker: MemoryBroker, config: Settings) -> AsyncIterator[Publisher]:
    publisher = Publisher("web", settings=config, transport=MemoryTransport(broker))
    await publisher.start()
    yield publisher
    await publisher.close()


async def poll_until(service: Service, condition: Callable[[], bool], *, polls: int = 300) -> None:
    """Poll until ``condition()`` holds; fail after ``polls`` polls (a few seconds at most)."""
    for _ in range(polls):
        if condition():
            await service.flush()  # what the batches so far did is durable, as a test expects
            return
        await service.poll_once(timeout=0.01)
    assert condition(), f"condition not reached within {polls} polls"
    await service.flush()


async def poll_times(service: Service, polls: int) -> None:
    for _ in range(polls):
        await service.poll_once(timeout=0.01)
    await service.flush()


def decode_all(records: list[Record], cls: type[Event]) -> list[tuple[Any, Event]]:
    wire = Wire("test", [cls])
    return [wire.decode(record, cls) for record in records]


# --- declaration ---------------------------------------------------------------------------------


async def test_a_service_without_handlers_fails_to_start(make_service: Callable[..., Service]) -> None:
    with pytest.raises(ConfigurationError, match="no handlers"):
        await make_service().start()


def test_a_generator_handler_is_rejected_at_registration() -> None:
    service = Service("inventory", settings=Settings())

    def reserve(event: OrderPlaced, ctx: Context) -> Any:
        yield None

    with pytest.raises(ConfigurationError, match="plain 'def'"):
        service.on(OrderPlaced)(reserve)


def test_handler_names_must_be_unique_within_a_service() -> None:
    service = Service("inventory", settings=Settings())

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        pass

    with pytest.raises(ConfigurationError, match="reserve"):

        @service.on(OrderPlaced, name="reserve")
        async def other(event: OrderPlaced, ctx: Context) -> None:
            pass


def test_the_decorator_returns_the_handler_unchanged() -> None:
    service = Service("inventory", settings=Settings())

    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        pass

    assert service.on(OrderPlaced)(reserve) is reserve
    assert [s.name for s in service.subscriptions] == ["reserve"]


@pytest.mark.parametrize("name", ["", "has space", "slash/name"])
def test_a_service_name_must_be_simple(name: str) -> None:
    with pytest.raises(ConfigurationError):
        Service(name, settings=Settings())


async def test_handlers_cannot_be_added_after_start(make_service: Callable[..., Service]) -> None:
    service = make_service()

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        pass

    await service.start()
    with pytest.raises(ConfigurationError, match="before it starts"):

        @service.on(OrderPlaced)
        async def late(event: OrderPlaced, ctx: Context) -> None:
            pass


def test_consumed_and_emitted_topics_carry_the_prefix(config: Settings) -> None:
    service = Service("inventory", settings=config)

    @service.on(OrderPlaced, emits=[StockReserved])
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        pass

    assert service.consumed_topics() == [ORDERS]
    assert service.emitted_topics() == [STOCK]


def test_the_consumer_group_is_the_service_name_after_the_prefix(config: Settings) -> None:
    assert Service("inventory", settings=config).group == PREFIX + "inventory"
    assert Service("inventory", settings=config, group="stock").group == PREFIX + "stock"


# --- processing and emitting ---------------------------------------------------------------------


async def test_emitted_events_land_on_their_topic_with_causation_and_correlation_ids(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    service = make_service()

    @service.on(OrderPlaced, emits=[StockReserved])
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        ctx.emit(StockReserved(order_id=event.order_id))

    await service.start()
    source_id = await publisher.publish(OrderPlaced(order_id="o-1", quantity=2), correlation_id=SAGA_A)
    await poll_until(service, lambda: bool(broker.records(STOCK)))

    [(envelope, event)] = decode_all(broker.records(STOCK), StockReserved)
    assert event == StockReserved(order_id="o-1")
    assert envelope.topic == STOCK
    assert envelope.causation_id == source_id
    assert envelope.correlation_id == SAGA_A
    assert envelope.key == SAGA_A.encode()
    assert envelope.producer == "inventory"
    assert envelope.event_id == derive_event_id(source_id, "reserve", 0)
    assert service.stats.emitted == 1


async def test_an_emitted_event_may_choose_its_key(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    service = make_service()

    @service.on(OrderPlaced, emits=[StockReserved])
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        ctx.emit(StockReserved(order_id=event.order_id), key="sku-1")

    await service.start()
    await publisher.publish(OrderPlaced(order_id="o-1", quantity=2), correlation_id=SAGA_A)
    await poll_until(service, lambda: bool(broker.records(STOCK)))
    assert [r.key for r in broker.records(STOCK)] == [b"sku-1"]


async def test_the_context_carries_the_event_identity(
    make_service: Callable[..., Service], publisher: Publisher
) -> None:
    service = make_service()
    seen: list[Context] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        seen.append(ctx)

    await service.start()
    event_id = await publisher.publish(OrderPlaced(order_id="o-1", quantity=2), correlation_id=SAGA_A)
    await poll_until(service, lambda: bool(seen))

    [ctx] = seen
    assert (ctx.event_id, ctx.correlation_id, ctx.attempt) == (event_id, SAGA_A, 1)
    assert (ctx.service, ctx.handler) == ("inventory", "reserve")
    assert event_id in ctx.idempotency_key and "reserve" in ctx.idempotency_key


async def test_an_undeclared_emit_fails_the_handler_and_emits_nothing(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = make_service()

    @service.on(OrderPlaced, emits=[StockReserved])
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        ctx.emit(StockReserved(order_id=event.order_id))
        ctx.emit(RefundIssued(order_id=event.order_id))

    await service.start()
    await publisher.publish(OrderPlaced(order_id="o-1", quantity=2), correlation_id=SAGA_A)
    with caplog.at_level(logging.ERROR):
        await poll_until(service, lambda: service.stats.failed >= 1)

    assert broker.records(STOCK) == []
    assert not broker.records(PREFIX + "checkout.refund-issued.v1")
    assert service.stats.processed == 0 and service.stats.emitted == 0
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and "reserve" in r.getMessage()]
    assert failures and "EmitError" in failures[0].getMessage()
    assert "RefundIssued" in failures[0].getMessage()


def test_emit_error_is_raised_by_the_context_itself() -> None:
    envelope = Envelope("e", "checkout.OrderPlaced", "c", None, "2026-01-01T00:00:00.000+00:00", "web", 0)
    ctx = Context(envelope, service="inventory", handler="reserve", idempotency_key="k",
                  allowed=frozenset({StockReserved}), logger=logging.getLogger("test"))
    with pytest.raises(EmitError, match="RefundIssued"):
        ctx.emit(RefundIssued(order_id="o-1"))
    assert ctx.emitted == []


async def test_two_handlers_for_one_event_type_both_run(
    make_service: Callable[..., Service], publisher: Publisher
) -> None:
    service = make_service()
    calls: list[str] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append("reserve")

    @service.on(OrderPlaced)
    async def audit(event: OrderPlaced, ctx: Context) -> None:
        calls.append("audit")

    await service.start()
    await publisher.publish(OrderPlaced(order_id="o-1", quantity=2), correlation_id=SAGA_A)
    await poll_until(service, lambda: len(calls) == 2)
    assert sorted(calls) == ["audit", "reserve"]
    assert service.stats.processed == 2


async def test_run_processes_until_the_condition_then_closes(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    service = make_service()
    calls: list[str] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(event.order_id)

    await publisher.publish(OrderPlaced(order_id="o-1", quantity=2), correlation_id=SAGA_A)
    polls = iter(range(300))
    await service.run(until=lambda: bool(calls) or next(polls) == 299)

    assert calls == ["o-1"]
    assert broker.groups[service.group].members == []
    assert sum(broker.groups[service.group].committed.values()) == 1


# --- duplicates ----------------------------------------------------------------------------------


async def test_the_same_event_delivered_twice_runs_the_handler_once(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    service = make_service()
    calls: list[str] = []

    @service.on(OrderPlaced, emits=[StockReserved])
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(ctx.event_id)
        ctx.emit(StockReserved(order_id=event.order_id))

    await service.start()
    event = OrderPlaced(order_id="o-1", quantity=2)
    await publisher.publish(event, event_id="evt-1")
    await poll_until(service, lambda: service.stats.processed == 1)
    await publisher.publish(event, event_id="evt-1")
    await poll_until(service, lambda: service.stats.skipped_duplicates == 1)

    assert calls == ["evt-1"]
    assert len(broker.records(STOCK)) == 1


async def test_the_same_event_twice_in_one_batch_runs_the_handler_once(
    make_service: Callable[..., Service], publisher: Publisher
) -> None:
    service = make_service()
    calls: list[str] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(ctx.event_id)

    await service.start()
    event = OrderPlaced(order_id="o-1", quantity=2)
    await publisher.publish(event, event_id="evt-1")
    await publisher.publish(event, event_id="evt-1")
    await poll_until(service, lambda: service.stats.processed + service.stats.skipped_duplicates >= 2)

    assert calls == ["evt-1"]


async def test_a_redelivery_after_a_crash_skips_the_finished_handler(
    broker: MemoryBroker, config: Settings, publisher: Publisher
) -> None:
    """The outcome was recorded but the offset never committed: the next member skips the event."""
    store = MemoryIdempotencyStore()
    calls: list[str] = []

    def build() -> tuple[Service, MemoryTransport]:
        transport = MemoryTransport(broker)
        service = Service("inventory", settings=config, transport=transport, idempotency=store)

        @service.on(OrderPlaced)
        async def reserve(event: OrderPlaced, ctx: Context) -> None:
            calls.append(ctx.event_id)

        return service, transport

    first, first_transport = build()
    await first.start()
    await publisher.publish(OrderPlaced(order_id="o-1", quantity=2), correlation_id=SAGA_A)
    await poll_until(first, lambda: bool(calls))
    broker.groups[first.group].committed.clear()  # as if the commit never reached the broker
    first_transport.crash()

    second, _ = build()
    await second.start()
    await poll_until(second, lambda: second.stats.skipped_duplicates == 1)
    await second.close()
    assert len(calls) == 1


# --- failures and retries ------------------------------------------------------------------------


async def test_a_failing_handler_is_retried_until_it_succeeds(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    service = make_service()
    attempts: list[str] = []

    @service.on(OrderPlaced, emits=[StockReserved])
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        attempts.append(event.order_id)
        ctx.emit(StockReserved(order_id=event.order_id))
        if len(attempts) <= 2:
            raise RuntimeError("warehouse unavailable")

    await service.start()
    await publisher.publish(OrderPlaced(order_id="o-1", quantity=2), correlation_id=SAGA_A)
    await poll_until(service, lambda: service.stats.processed == 1)

    assert attempts == ["o-1", "o-1", "o-1"]
    assert service.stats.failed == 2
    assert len(broker.records(STOCK)) == 1, "failed attempts emit nothing"


async def test_a_failed_event_waits_for_its_backoff_before_the_retry(
    make_service: Callable[..., Service], publisher: Publisher
) -> None:
    service = make_service()
    attempts: list[str] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        attempts.append(event.order_id)
        raise RuntimeError("warehouse unavailable")

    await service.start()
    await publisher.publish(OrderPlaced(order_id="o-1", quantity=2), correlation_id=SAGA_A)
    await poll_until(service, lambda: len(attempts) == 1)

    # The first backoff is 0.1 s; polls that do not wait come back empty, as the partition is paused.
    assert [await service.poll_once(timeout=0) for _ in range(5)] == [0] * 5
    assert attempts == ["o-1"]
    await poll_until(service, lambda: len(attempts) == 2)


async def test_later_events_on_the_partition_run_only_after_the_retried_one_in_order(
    make_service: Callable[..., Service], publisher: Publisher
) -> None:
    service = make_service()
    calls: list[str] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(event.order_id)
        if event.order_id == "first" and calls.count("first") <= 2:
            raise RuntimeError("warehouse unavailable")

    await service.start()
    for order_id in ("first", "second", "third"):
        await publisher.publish(OrderPlaced(order_id=order_id, quantity=1), correlation_id=SAGA_A)
    await poll_until(service, lambda: service.stats.processed == 3)

    assert calls == ["first", "first", "first", "second", "third"]


async def test_a_retrying_partition_does_not_hold_up_other_partitions(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    service = make_service()
    calls: list[str] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(event.order_id)
        if event.order_id == "stuck":
            raise RuntimeError("always fails")

    await service.start()
    await publisher.publish(OrderPlaced(order_id="stuck", quantity=1), correlation_id=SAGA_A)
    await publisher.publish(OrderPlaced(order_id="free", quantity=1), correlation_id=SAGA_B)
    assert len({r.partition for r in broker.records(ORDERS)}) == 2
    await poll_until(service, lambda: "free" in calls)
    assert service.stats.processed == 1


async def test_the_committed_offset_never_passes_an_unfinished_record(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    service = make_service()
    failing = {"second"}

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        if event.order_id in failing:
            raise RuntimeError("not yet")

    await service.start()
    for order_id in ("first", "second", "third"):
        await publisher.publish(OrderPlaced(order_id=order_id, quantity=1), correlation_id=SAGA_A)
    [tp] = {(r.topic, r.partition) for r in broker.records(ORDERS)}
    committed = broker.groups[service.group].committed

    await poll_until(service, lambda: service.stats.failed >= 2)
    assert committed.get(tp) == 1, "only 'first' (offset 0) is finished"

    failing.clear()
    await poll_until(service, lambda: service.stats.processed == 3)
    assert committed[tp] == 3


async def test_a_failure_of_the_second_handler_holds_the_offset_of_the_record(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    service = make_service()
    calls: list[str] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append("reserve")

    @service.on(OrderPlaced)
    async def audit(event: OrderPlaced, ctx: Context) -> None:
        calls.append("audit")
        if calls.count("audit") == 1:
            raise RuntimeError("audit log down")

    await service.start()
    await publisher.publish(OrderPlaced(order_id="o-1", quantity=1), correlation_id=SAGA_A)
    [tp] = {(r.topic, r.partition) for r in broker.records(ORDERS)}
    await poll_until(service, lambda: service.stats.failed == 1)
    assert tp not in broker.groups[service.group].committed

    await poll_until(service, lambda: service.stats.processed == 2)
    assert calls == ["reserve", "audit", "audit"], "the handler that succeeded is not run again"
    assert broker.groups[service.group].committed[tp] == 1


# --- poison records ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("with_headers", "reason"), [(True, "not-avro"), (False, "missing-header")]
)
async def test_a_poison_record_is_dead_lettered_in_its_place_and_the_partition_goes_on(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker,
    caplog: pytest.LogCaptureFixture, with_headers: bool, reason: str,
) -> None:
    service = make_service()
    calls: list[str] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(event.order_id)

    await service.start()
    await publisher.publish(OrderPlaced(order_id="before", quantity=1), correlation_id=SAGA_A)
    [good] = broker.records(ORDERS)
    headers = list(good.headers) if with_headers else []
    partition, offset = broker.append(OutgoingRecord(ORDERS, good.key, b"\x00not avro", headers))
    assert (partition, offset) == (good.partition, 1)
    await publisher.publish(OrderPlaced(order_id="after", quantity=1), correlation_id=SAGA_A)
    await publisher.publish(OrderPlaced(order_id="elsewhere", quantity=1), correlation_id=SAGA_B)

    with caplog.at_level(logging.ERROR):
        await poll_until(service, lambda: {"before", "after", "elsewhere"} <= set(calls))

    assert calls.index("before") < calls.index("after"), "order kept around the poison record"
    assert list(service.stats.dead_lettered) == [(ORDERS, partition, 1, reason)]
    [dead] = broker.records(ORDERS + ".dlq")
    assert dead.value == b"\x00not avro" and dead.key == good.key
    assert last_header(dead.headers, DLQHeader.REASON) == reason
    assert last_header(dead.headers, DLQHeader.OFFSET) == "1"
    assert last_header(dead.headers, DLQHeader.TOPIC) == ORDERS
    assert broker.groups[service.group].committed[(ORDERS, partition)] == 3

    [message] = [r.getMessage() for r in caplog.records
                 if r.levelno == logging.ERROR and "cannot process" in r.getMessage()]
    assert ORDERS in message and f"[{partition}]" in message
    assert "offset 1" in message and reason in message and ".dlq" in message


@pytest.mark.parametrize("fault", ["truncated", "trailing-bytes"])
@pytest.mark.parametrize("copy", [False, True], ids=["own-id", "copy-of-a-good-one"])
async def test_a_body_that_cannot_be_read_is_dead_lettered_and_holds_no_claim(
    publisher: Publisher, broker: MemoryBroker, config: Settings, fault: str, copy: bool,
) -> None:
    # Its headers and schema fingerprint are sound; only reading the body fails. It takes no claim
    # of its own, and a good copy of the same event (same id, hence key) keeps its claim.
    store = MemoryIdempotencyStore()
    service = Service("inventory", settings=config, transport=MemoryTransport(broker), idempotency=store)
    calls: list[str] = []
    others: list[ClaimResult] = []  # what another process gets for the running event's key

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(event.order_id)
        others.extend(await store.claim([ctx.idempotency_key], "someone-else", 1_000))

    await service.start()
    await publisher.publish(OrderPlaced(order_id="before", quantity=1), correlation_id=SAGA_A)
    [good] = broker.records(ORDERS)
    event_id = dict(good.headers)[Header.EVENT_ID] if copy else b"bad-1"
    headers = [(k, event_id if k == Header.EVENT_ID else v) for k, v in good.headers]
    value = good.value[:-1] if fault == "truncated" else good.value + b"\x00"  # type: ignore[operator,index]
    partition, _ = broker.append(OutgoingRecord(ORDERS, good.key, value, headers))
    await publisher.publish(OrderPlaced(order_id="after", quantity=1), correlation_id=SAGA_A)
    await publisher.publish(OrderPlaced(order_id="elsewhere", quantity=1), correlation_id=SAGA_B)

    await poll_until(service, lambda: {"before", "after", "elsewhere"} <= set(calls))
    await service.close()

    assert calls.index("before") < calls.index("after") and sorted(calls) == ["after", "before", "elsewhere"]
    assert others == [ClaimResult.BUSY] * 3, "every running event keeps its claim"
    assert list(service.stats.dead_lettered) == [(ORDERS, partition, 1, "not-avro")]
    [dead] = broker.records(ORDERS + ".dlq")
    assert dead.value == value and last_header(dead.headers, DLQHeader.OFFSET) == "1"
    assert broker.groups[service.group].committed[(ORDERS, partition)] == 3
    assert event_id is not None
    key = idempotency_key(config.redis_prefix, "inventory", "reserve", SAGA_A, event_id.decode())
    # A copy's key stays done (the good one's outcome); an unreadable event's own key was never claimed.
    assert await store.claim([key], "someone-else", 1_000) == [ClaimResult.DONE if copy else ClaimResult.CLAIMED]


async def test_a_poison_record_behind_a_failed_record_of_its_key_is_dead_lettered_once(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    service = make_service()
    calls: list[str] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(event.order_id)
        if len(calls) == 1:
            raise RuntimeError("transient")

    await service.start()
    await publisher.publish(OrderPlaced(order_id="before", quantity=1), correlation_id=SAGA_A)
    [good] = broker.records(ORDERS)
    broker.append(OutgoingRecord(ORDERS, good.key, b"\x00not avro", list(good.headers)))

    await poll_until(service, lambda: calls == ["before", "before"] and len(service.stats.dead_lettered) == 1,
                     polls=100)
    assert len(broker.records(ORDERS + ".dlq")) == 1, "the poison record is dead-lettered once"
    assert broker.groups[service.group].committed[(ORDERS, good.partition)] == 2


async def test_a_handler_that_keeps_failing_is_dead_lettered_after_its_attempts(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    service = make_service(retry=RetryPolicy(max_attempts=3, initial_delay_s=0.001, max_delay_s=0.001))
    calls: list[str] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(event.order_id)
        if event.order_id == "bad":
            raise ValueError("card service says no")

    await service.start()
    await publisher.publish(OrderPlaced(order_id="bad", quantity=1), correlation_id=SAGA_A, event_id="evt-bad")
    await publisher.publish(OrderPlaced(order_id="next", quantity=1), correlation_id=SAGA_A)
    await poll_until(service, lambda: "next" in calls, polls=200)

    assert calls == ["bad", "bad", "bad", "next"], "three attempts, then the partition moves on in order"
    [dead] = broker.records(ORDERS + ".dlq")
    assert last_header(dead.headers, DLQHeader.REASON) == "handler-error"
    assert last_header(dead.headers, DLQHeader.ERROR_TYPE) == "ValueError"
    assert last_header(dead.headers, DLQHeader.ERROR) == "card service says no"
    assert last_header(dead.headers, DLQHeader.ATTEMPTS) == "3"
    assert last_header(dead.headers, DLQHeader.HANDLER) == "reserve"
    assert "Traceback" in (last_header(dead.headers, DLQHeader.TRACEBACK) or "")
    assert last_header(dead.headers, Header.EVENT_ID) == "evt-bad", "the original headers are kept"


async def test_dead_letter_now_skips_the_retries(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    service = make_service()
    calls: list[str] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(event.order_id)
        raise DeadLetterNow("unknown customer")

    await service.start()
    await publisher.publish(OrderPlaced(order_id="o", quantity=1), correlation_id=SAGA_A)
    await poll_until(service, lambda: len(service.stats.dead_lettered) == 1)
    assert calls == ["o"]
    [dead] = broker.records(ORDERS + ".dlq")
    assert last_header(dead.headers, DLQHeader.ERROR_TYPE) == "DeadLetterNow"


# --- publisher -----------------------------------------------------------------------------------


async def test_a_publisher_with_a_given_transport_starts_on_first_publish(
    broker: MemoryBroker, config: Settings
) -> None:
    publisher = Publisher("web", settings=config, transport=MemoryTransport(broker))
    try:
        await publisher.publish(OrderPlaced(order_id="o-1", quantity=1))
    finally:
        await publisher.close()
    assert len(broker.records(ORDERS)) == 1


async def test_a_compensation_that_gives_up_is_dead_lettered_and_announced(
    make_service: Callable[..., Service], publisher: Publisher, broker: MemoryBroker
) -> None:
    from choreo import CompensationFailed

    service = make_service(retry=RetryPolicy(max_attempts=2, initial_delay_s=0.001, max_delay_s=0.001))

    @service.on(OrderPlaced, emits=[StockReserved])
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        ctx.emit(StockReserved(order_id=event.order_id))

    @service.compensate(RefundIssued, undoes=reserve)
    async def release(event: RefundIssued, ctx: Context) -> None:
        raise RuntimeError("warehouse API down")

    await service.start()
    await publisher.publish(RefundIssued(order_id="o-1"), correlation_id=SAGA_A, event_id="refund-1")
    await poll_until(service, lambda: len(service.stats.dead_lettered) == 1, polls=100)

    [dead] = broker.records(PREFIX + "checkout.refund-issued.v1.dlq")
    assert last_header(dead.headers, DLQHeader.HANDLER) == "release"
    [announced] = broker.records(PREFIX + CompensationFailed.topic())
    wire = Wire("test")
    envelope, event = wire.decode(announced, CompensationFailed)
    assert envelope.correlation_id == SAGA_A and envelope.causation_id == "refund-1"
    assert event == CompensationFailed(saga_id=SAGA_A, service="inventory", handler="release",
                                       error="RuntimeError: warehouse API down")


async def test_a_writer_schema_that_cannot_be_fetched_is_retried_not_dropped(
    broker: MemoryBroker, config: Settings, publisher: Publisher
) -> None:
    from choreo import TransportError
    from choreo.schemas import AvroSchema

    class FlakyRegistry(MemoryTransport):
        failures = 2

        def lookup_schema(self, fingerprint: int) -> AvroSchema | None:
            if self.failures:
                self.failures -= 1
                raise TransportError("schema topic unreachable")
            return super().lookup_schema(fingerprint)

    class OrderPlacedV1b(Event, schema=_schema("OrderPlaced", [
        {"name": "order_id", "type": "string"}, {"name": "quantity", "type": "int"},
        {"name": "note", "type": "string", "default": ""}])):
        order_id: str
        quantity: int
        note: str = ""

    service = Service("reader", settings=config, transport=FlakyRegistry(broker), idempotency=MemoryIdempotencyStore())
    seen: list[str] = []

    @service.on(OrderPlaced)
    async def take(event: OrderPlaced, ctx: Context) -> None:
        seen.append(event.order_id)

    await service.start()
    await publisher.publish(OrderPlacedV1b(order_id="new-writer", quantity=1, note="x"), correlation_id=SAGA_A)
    await poll_until(service, lambda: seen == ["new-writer"], polls=100)
    assert list(service.stats.dead_lettered) == []


async def test_a_body_that_cannot_be_read_is_dead_lettered_once_for_all_its_handlers(
    publisher: Publisher, broker: MemoryBroker, config: Settings,
) -> None:
    # One dead letter for the record, not one per handler, and no claim left behind for either.
    store = MemoryIdempotencyStore()
    service = Service("inventory", settings=config, transport=MemoryTransport(broker), idempotency=store)
    calls: list[str] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(f"reserve {event.order_id}")

    @service.on(OrderPlaced)
    async def audit(event: OrderPlaced, ctx: Context) -> None:
        calls.append(f"audit {event.order_id}")

    await service.start()
    await publisher.publish(OrderPlaced(order_id="before", quantity=1), correlation_id=SAGA_A)
    [good] = broker.records(ORDERS)
    headers = [(k, b"bad-1" if k == Header.EVENT_ID else v) for k, v in good.headers]
    partition, _ = broker.append(OutgoingRecord(ORDERS, good.key, good.value[:-1], headers))  # type: ignore[index]
    await publisher.publish(OrderPlaced(order_id="after", quantity=1), correlation_id=SAGA_A)

    await poll_until(service, lambda: len(calls) == 4)
    await service.close()

    # Each handler keeps the partition's order (their chains run side by side).
    assert [c for c in calls if c.startswith("reserve")] == ["reserve before", "reserve after"]
    assert [c for c in calls if c.startswith("audit")] == ["audit before", "audit after"]
    assert list(service.stats.dead_lettered) == [(ORDERS, partition, 1, "not-avro")]
    assert len(broker.records(ORDERS + ".dlq")) == 1
    assert broker.groups[service.group].committed[(ORDERS, partition)] == 3
    keys = [idempotency_key(config.redis_prefix, "inventory", name, SAGA_A, "bad-1") for name in ("reserve", "audit")]
    assert await store.claim(keys, "someone-else", 1_000) == [ClaimResult.CLAIMED] * 2
