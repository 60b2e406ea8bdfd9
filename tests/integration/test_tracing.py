"""One trace per saga: the checkout system runs as real processes exporting over OTLP/HTTP to a
receiver in the test, which decodes what it gets with opentelemetry-proto."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import service_env
from tests.integration.helpers import eventually, publish
from tests.integration.test_cli import choreo
from tests.integration.test_checkout import FAILURES, STOCK, Checkout, _ids, _order, checkout  # noqa: F401
from tests.otlp import OtlpReceiver, SpanRecord

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

PRODUCER, CONSUMER = 4, 5
FIVE = {"order", "inventory", "payment", "shipping", "notification"}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def checkout_env(receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "200"}
    for name, value in otel.items():  # the test's own publisher traces too: the publish is the root
        monkeypatch.setenv(name, value)
    return {**FAILURES, **otel}


def _check_tree(spans: list[SpanRecord], group_prefix: str) -> None:
    """Every consumer span's parent is the producer span of the event it handles; every producer
    span but the root is a child of the consumer span that emitted it, in the same service."""
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if not s.parent_id]
    assert [(r.kind, r.service) for r in roots] == [(PRODUCER, "test")], "one root: the publish"
    for span in spans:
        if span.kind == CONSUMER:
            parent = by_id.get(span.parent_id)
            assert parent is not None, f"the parent of {span.name} in {span.service} has not arrived"
            assert parent.kind == PRODUCER and parent.name == f"send {span.attributes['messaging.destination.name']}"
            assert parent.attributes["messaging.message.id"] == span.attributes["messaging.message.id"]
            a = span.attributes
            assert a["messaging.system"] == "kafka" and a["messaging.operation.type"] == "process"
            assert a["messaging.consumer.group.name"] == group_prefix + span.service
            assert a["choreo.service"] == span.service and a["choreo.step"] and a["choreo.attempt"] == 1
            assert a["messaging.destination.partition.id"].isdigit() and a["messaging.kafka.offset"] >= 0
        elif span.parent_id:
            parent = by_id.get(span.parent_id)
            assert parent is not None, f"the parent of {span.name} in {span.service} has not arrived"
            assert parent.kind == CONSUMER and parent.service == span.service


@pytest.mark.timeout(150)
async def test_a_saga_is_one_trace_across_the_five_services(checkout: Checkout, receiver: OtlpReceiver) -> None:
    await checkout.redis.hset(f"{checkout.prefix}inventory:stock", mapping=STOCK)
    happy, no_carrier = _ids("happy", True)[0], _ids("nocarrier", False)[0]
    await publish(checkout.settings, [_order(happy), _order(no_carrier)])
    await checkout.wait_ended(2, 90)

    def saga(saga_id: str) -> list[SpanRecord]:
        return [s for s in receiver.snapshot() if s.attributes.get("choreo.saga.id") == saga_id]

    async def complete() -> None:
        for saga_id, last_step in ((happy, "notify_shipped"), (no_carrier, "notify_cancelled")):
            spans = saga(saga_id)
            assert any(s.attributes.get("choreo.step") == last_step for s in spans), f"{saga_id}: {len(spans)}"
            ids = {s.trace_id for s in spans}
            assert len(ids) == 1, f"saga {saga_id} spans {len(ids)} traces: " + repr(
                sorted((s.trace_id[:6], s.service, s.name, s.attributes.get("choreo.step"), bool(s.parent_id))
                       for s in spans))
            # Everything in that trace belongs to the saga, and every service took part.
            in_trace = [s for s in receiver.snapshot() if s.trace_id in ids]
            assert {s.attributes.get("choreo.saga.id") for s in in_trace} == {saga_id}
            assert FIVE <= {s.service for s in in_trace}
            # Spans arrive in each service's export batches: a parent may come after its child.
            _check_tree(spans, checkout.settings.topic_prefix)

    await eventually(complete, 60)
    steps = {s.attributes["choreo.step"]: s for s in saga(happy) if s.kind == CONSUMER}
    assert {"reserve_stock", "charge", "schedule", "notify_shipped"} <= set(steps)
    assert not any(s.attributes["choreo.compensation"] for s in steps.values())
    # The failed order: its compensations are in the same trace, marked as such, after the failure.
    compensations = {(s.service, s.attributes["choreo.step"]) for s in saga(no_carrier)
                     if s.kind == CONSUMER and s.attributes["choreo.compensation"]}
    assert {"payment", "inventory"} <= {service for service, _ in compensations}, compensations

    # choreo saga show names the trace and links it in Jaeger.
    [trace_id] = {s.trace_id for s in saga(happy)}
    env = {**service_env(checkout.settings), "CHOREO_JAEGER_URL": "http://jaeger.example:16686"}

    async def shown() -> None:
        out = choreo("saga", "show", happy, env=env)
        assert out.returncode == 0, out.stderr
        assert f"trace {trace_id}  http://jaeger.example:16686/trace/{trace_id}" in out.stdout, out.stdout

    await eventually(shown, 30)
