"""Metrics on the memory transport: outcomes, durations, waits and lag as recorded and as Prometheus
text; the scrape endpoint; nothing recorded when off."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from choreo import ConfigurationError, Context, DeadLetterNow, Publisher, RetryLater, Service, Settings
from choreo.metrics import Metrics, otlp_metrics_enabled
from choreo.stores.memory import MemoryIdempotencyStore
from choreo.transport.memory import MemoryBroker, MemoryTransport
from tests.unit.test_service import ORDERS, PREFIX, OrderPlaced, poll_until


def _value(text: str, name: str, **labels: str) -> float:
    """The sample ``name`` whose labels include ``labels``."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+)(\{.*\})? (\S+)", line)
        if match and match.group(1) == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(match.group(3))
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


@pytest.fixture
async def run() -> AsyncIterator[tuple[Service, Publisher, Metrics]]:
    broker = MemoryBroker()
    config = Settings(topic_prefix=PREFIX, topic_partitions=2)
    metrics = Metrics.from_settings("inventory", 0, env={}, extra_readers=[InMemoryMetricReader()])
    service = Service("inventory", settings=config, transport=MemoryTransport(broker),
                      idempotency=MemoryIdempotencyStore(), metrics=metrics)
    attempts: dict[str, int] = {}

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        attempts[event.order_id] = attempts.get(event.order_id, 0) + 1
        if event.order_id == "flaky" and attempts["flaky"] < 3:
            raise RetryLater("not yet", delay_s=0.001)
        if event.order_id == "bad":
            raise DeadLetterNow("never")

    publisher = Publisher("web", settings=config, transport=MemoryTransport(broker))
    await publisher.start()
    await service.start()
    yield service, publisher, metrics
    await service.close()
    await publisher.close()


async def test_outcomes_durations_and_waits_match_what_happened(run: tuple[Service, Publisher, Metrics]) -> None:
    service, publisher, metrics = run
    for order_id in ("a", "b", "c", "flaky", "bad"):
        await publisher.publish(OrderPlaced(order_id=order_id, quantity=1))
    await poll_until(service, lambda: service.stats.processed == 4 and len(service.stats.dead_lettered) == 1)
    await service.poll_once(timeout=0.01)
    text = metrics.render()
    labels = {"service": "inventory", "handler": "reserve", "event_type": "checkout.OrderPlaced"}
    assert _value(text, "choreo_events_total", outcome="ok", **labels) == 4
    assert _value(text, "choreo_events_total", outcome="dead_lettered", **labels) == 1
    assert _value(text, "choreo_events_total", outcome="failed", **labels) == 3  # flaky twice, bad once
    assert _value(text, "choreo_events_total", outcome="retried", **labels) == 2
    assert _value(text, "choreo_handler_duration_seconds_count", outcome="ok", **labels) == 4
    assert _value(text, "choreo_handler_duration_seconds_count", outcome="failed", **labels) == 2
    assert _value(text, "choreo_handler_duration_seconds_bucket", outcome="ok", le="+Inf", **labels) == 4
    assert _value(text, "choreo_dependency_wait_seconds_count", edge="checkout.OrderPlaced -> inventory.reserve") == 7
    assert _value(text, "choreo_consumer_in_flight", service="inventory") == 0
    lags = [_value(text, "choreo_consumer_lag", topic=ORDERS, partition=str(p)) for p in (0, 1)]
    assert lags == [0, 0]
    assert "# TYPE choreo_events_total counter" in text and "# TYPE choreo_handler_duration_seconds histogram" in text


async def test_the_endpoint_serves_prometheus_text_and_a_taken_port_fails_at_start() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = Metrics.from_settings("svc", port, env={})
    metrics.start()
    try:
        metrics.counted("h", "t.E", "ok", 2)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert _value(body, "choreo_events_total", handler="h", outcome="ok") == 2
        with pytest.raises(ConfigurationError, match=f"CHOREO_METRICS_PORT={port}"):
            Metrics.from_settings("other", port, env={}).start()
    finally:
        metrics.close()


def test_without_a_port_or_an_endpoint_metrics_are_off() -> None:
    assert not Metrics.from_settings("svc", 0, env={}).enabled
    assert otlp_metrics_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not otlp_metrics_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_METRICS_EXPORTER": "none"})
    assert not otlp_metrics_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"})
