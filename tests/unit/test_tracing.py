"""Spans on the memory transport, captured in memory: consumer and producer spans with the
messaging attributes, retries and dead-lettering in the same trace, nothing at all when off."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from choreo import Context, DeadLetterNow, Publisher, RetryPolicy, Service, Settings
from choreo.stores.memory import MemoryIdempotencyStore
from choreo.tracing import Tracing, trace_enabled, trace_id_of
from choreo.transport.memory import MemoryBroker, MemoryTransport
from tests.unit.test_service import ORDERS, PREFIX, STOCK, OrderPlaced, StockReserved, poll_until


class SharedExporter(InMemorySpanExporter):
    """One exporter for several providers: a provider shutting down must not stop it for the rest."""

    def shutdown(self) -> None:
        return None


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return SharedExporter()


@pytest.fixture
async def world(spans: InMemorySpanExporter) -> AsyncIterator[tuple[Callable[..., Service], Publisher, MemoryBroker]]:
    broker = MemoryBroker()
    config = Settings(topic_prefix=PREFIX, topic_partitions=2)
    made: list[Service] = []

    def make(**kwargs: Any) -> Service:
        service = Service("inventory", settings=config, transport=MemoryTransport(broker),
                          idempotency=MemoryIdempotencyStore(),
                          tracing=Tracing.from_env("inventory", env={}, exporter=spans), **kwargs)
        made.append(service)
        return service

    publisher = Publisher("web", settings=config, transport=MemoryTransport(broker),
                          tracing=Tracing.from_env("web", env={}, exporter=spans))
    await publisher.start()
    yield make, publisher, broker
    for service in made:
        await service.close()
    await publisher.close()


async def _finished(service: Service, spans: InMemorySpanExporter, count: int) -> list[Any]:
    # Spans are exported in batches: closing the service flushes them.
    await service.close()
    found = spans.get_finished_spans()
    assert len(found) >= count, [s.name for s in found]
    return list(found)


async def test_a_handled_event_is_a_consumer_span_under_the_publish_and_over_its_emits(
    world: tuple[Callable[..., Service], Publisher, MemoryBroker], spans: InMemorySpanExporter
) -> None:
    make, publisher, broker = world
    service = make()

    @service.on(OrderPlaced, emits=[StockReserved])
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        ctx.emit(StockReserved(order_id=event.order_id))

    await service.start()
    event_id = await publisher.publish(OrderPlaced(order_id="o1", quantity=1), correlation_id="saga-1")
    await poll_until(service, lambda: service.stats.processed == 1)
    await publisher.close()
    found = {s.name: s for s in await _finished(service, spans, 3)}
    send, process, emit = found[f"send {ORDERS}"], found[f"process {ORDERS}"], found[f"send {STOCK}"]
    assert send.parent is None and send.kind is SpanKind.PRODUCER
    assert process.kind is SpanKind.CONSUMER and process.parent.span_id == send.context.span_id
    assert emit.parent.span_id == process.context.span_id
    assert len({send.context.trace_id, process.context.trace_id, emit.context.trace_id}) == 1
    a = process.attributes
    assert (a["messaging.system"], a["messaging.destination.name"], a["messaging.message.id"]) == (
        "kafka", ORDERS, event_id)
    assert a["messaging.consumer.group.name"] == PREFIX + "inventory" and a["messaging.kafka.offset"] == 0
    assert (a["choreo.saga.id"], a["choreo.step"], a["choreo.attempt"], a["choreo.compensation"]) == (
        "saga-1", "reserve", 1, False)
    [out] = broker.records(STOCK)
    assert trace_id_of(out.headers) == f"{process.context.trace_id:032x}", "the emitted event carries the trace"


async def test_retries_and_the_dead_letter_are_in_the_same_trace(
    world: tuple[Callable[..., Service], Publisher, MemoryBroker], spans: InMemorySpanExporter
) -> None:
    make, publisher, broker = world
    service = make(retry=RetryPolicy(max_attempts=3, initial_delay_s=0.001, max_delay_s=0.001))
    runs: list[int] = []

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("flaky")
        raise DeadLetterNow("give up")

    await service.start()
    await publisher.publish(OrderPlaced(order_id="o1", quantity=1), correlation_id="saga-1")
    await poll_until(service, lambda: len(service.stats.dead_lettered) == 1)
    await publisher.close()
    attempts = sorted((s for s in await _finished(service, spans, 4) if s.kind is SpanKind.CONSUMER),
                      key=lambda s: s.attributes["choreo.attempt"])
    assert [s.attributes["choreo.attempt"] for s in attempts] == [1, 2, 3]
    assert len({s.context.trace_id for s in attempts}) == 1
    assert all(s.status.status_code is StatusCode.ERROR for s in attempts)
    assert [e.name for e in attempts[0].events] == ["exception", "retry scheduled"]
    assert [e.name for e in attempts[2].events] == ["exception", "dead-lettered"]
    [letter] = broker.records(ORDERS + ".dlq")
    assert trace_id_of(letter.headers) == f"{attempts[0].context.trace_id:032x}", "the DLQ keeps the trace context"


async def test_an_untraced_publish_still_gives_one_trace_per_saga(spans: InMemorySpanExporter) -> None:
    broker = MemoryBroker()
    config = Settings(topic_prefix=PREFIX, topic_partitions=2)
    services = []
    for name in ("a", "b"):
        service = Service(name, settings=config, transport=MemoryTransport(broker),
                          idempotency=MemoryIdempotencyStore(), tracing=Tracing.from_env(name, env={}, exporter=spans))

        @service.on(OrderPlaced)
        async def handle(event: OrderPlaced, ctx: Context) -> None:
            return None

        await service.start()
        services.append(service)
    async with Publisher("web", settings=config, transport=MemoryTransport(broker), tracing=Tracing.off()) as pub:
        await pub.publish(OrderPlaced(order_id="o1", quantity=1), correlation_id="saga-9")
        assert trace_id_of(broker.records(ORDERS)[0].headers) is None
    for service in services:
        await poll_until(service, lambda s=service: s.stats.processed == 1)  # type: ignore[misc]
        await service.close()
    consumers = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert len(consumers) == 2 and len({s.context.trace_id for s in consumers}) == 1


async def test_tracing_off_adds_no_headers(world: tuple[Callable[..., Service], Publisher, MemoryBroker]) -> None:
    _, _, broker = world
    async with Publisher("web", settings=Settings(topic_prefix=PREFIX), transport=MemoryTransport(broker),
                         tracing=Tracing.off()) as publisher:
        await publisher.publish(OrderPlaced(order_id="o1", quantity=1))
    assert trace_id_of(broker.records(ORDERS)[0].headers) is None


def test_tracing_is_on_only_with_an_otlp_endpoint() -> None:
    assert not trace_enabled({})
    assert trace_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert trace_enabled({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"})
    assert not trace_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"})
    assert not trace_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"})


def test_an_unknown_otlp_protocol_fails_at_start_naming_the_variable() -> None:
    from choreo import ConfigurationError

    with pytest.raises(ConfigurationError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        Tracing.from_env("x", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"})


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_spans_reach_an_otlp_receiver_over_either_protocol(protocol: str) -> None:
    from tests.otlp import GrpcOtlpReceiver, OtlpReceiver

    with (GrpcOtlpReceiver() if protocol == "grpc" else OtlpReceiver()) as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
        broker = MemoryBroker()
        config = Settings(topic_prefix=PREFIX, topic_partitions=1)
        with pytest.MonkeyPatch.context() as patch:  # the exporters read the endpoint from the environment
            for name, value in env.items():
                patch.setenv(name, value)
            tracing = Tracing.from_env("web", env=env)
        assert tracing.enabled
        async with Publisher("web", settings=config, transport=MemoryTransport(broker), tracing=tracing) as pub:
            await pub.publish(OrderPlaced(order_id="o1", quantity=1), correlation_id="saga-1")
        [span] = receiver.snapshot()  # closing the publisher flushed it
        assert (span.name, span.service, span.attributes["choreo.saga.id"]) == (f"send {ORDERS}", "web", "saga-1")


async def test_ratio_sampling_of_untraced_sagas_is_the_same_in_every_service(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
    broker = MemoryBroker()
    config = Settings(topic_prefix=PREFIX, topic_partitions=2)
    services = []
    for name in ("a", "b"):
        service = Service(name, settings=config, transport=MemoryTransport(broker),
                          idempotency=MemoryIdempotencyStore(), tracing=Tracing.from_env(name, env={}, exporter=spans))

        @service.on(OrderPlaced)
        async def handle(event: OrderPlaced, ctx: Context) -> None:
            return None

        await service.start()
        services.append(service)
    async with Publisher("web", settings=config, transport=MemoryTransport(broker), tracing=Tracing.off()) as pub:
        for i in range(40):
            await pub.publish(OrderPlaced(order_id=f"o{i}", quantity=1), correlation_id=f"saga-{i}")
    for service in services:
        await poll_until(service, lambda s=service: s.stats.processed == 40)  # type: ignore[misc]
        await service.close()
    sampled = {name: {s.attributes["choreo.saga.id"] for s in spans.get_finished_spans()
                      if s.resource.attributes["service.name"] == name} for name in ("a", "b")}
    assert sampled["a"] == sampled["b"], "both services keep the same sagas"
    assert 5 < len(sampled["a"]) < 35, "about half"
