"""The checkout saga's trace in a real Jaeger v2, read back through Jaeger's HTTP query API.

Runs only where ``CHOREO_JAEGER_QUERY`` is set: ``make test-kafka`` starts Jaeger with
``scripts/jaeger.py run`` (which sets it, and the OTLP endpoints), or by hand:

    .venv/bin/python scripts/jaeger.py run -- .venv/bin/python -m pytest tests/integration/test_jaeger.py

The five services and the tracker run as their own processes; half of them export over OTLP/HTTP and
the other half over OTLP/gRPC, so one saga's trace is put together from both of Jaeger's receivers.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from choreo import Settings
from services.events import OrderPlaced
from tests.integration.helpers import ServiceProcess, eventually, publish, wait_until
from tests.integration.test_checkout import TARGETS

QUERY = os.environ.get("CHOREO_JAEGER_QUERY", "")

pytestmark = [
    pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow,
    pytest.mark.skipif(not QUERY, reason="needs Jaeger: CHOREO_JAEGER_QUERY is set by scripts/jaeger.py run "
                                         "(make test-kafka)"),
]

SAGA_SERVICES = ("order", "inventory", "payment", "shipping", "notification")
# Which OTLP receiver each process exports to; the test's own publisher (the saga's root) uses HTTP.
PROTOCOLS = {"order": "http/protobuf", "inventory": "grpc", "payment": "http/protobuf", "shipping": "grpc",
             "notification": "http/protobuf", "tracker": "grpc"}


def _otel(protocol: str) -> dict[str, str]:
    endpoint = os.environ["CHOREO_JAEGER_OTLP_GRPC" if protocol == "grpc" else "CHOREO_JAEGER_OTLP_HTTP"]
    # A short batch delay: spans reach Jaeger ~0.2 s after they end, not 5 s.
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_BSP_SCHEDULE_DELAY": "200"}


def _get(path: str, **params: str) -> Any:
    url = f"{QUERY}{path}?{urllib.parse.urlencode(params)}" if params else f"{QUERY}{path}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _saga_traces(saga_id: str) -> dict[str, dict[str, Any]]:
    """Every trace in Jaeger that has a span tagged with this saga id, by trace id.

    Jaeger's /api/traces needs a service, so every service Jaeger knows is asked: a saga's events
    that opened a trace of their own (in any process) show up too."""
    tags = json.dumps({"choreo.saga.id": saga_id})
    traces: dict[str, dict[str, Any]] = {}
    for service in _get("/api/services")["data"] or []:
        for trace in _get("/api/traces", service=service, tags=tags, limit="20")["data"] or []:
            traces[trace["traceID"]] = trace
    return traces


def _spans(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The trace's spans, each with its service name and its tags as a dict."""
    processes = trace["processes"]
    return [{"service": processes[s["processID"]]["serviceName"], "name": s["operationName"],
             "tags": {t["key"]: t["value"] for t in s["tags"]}} for s in trace["spans"]]


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


@pytest.mark.timeout(240)
async def test_a_saga_is_one_trace_in_jaeger(settings: Settings, tmp_path: Path, unique: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing from the outer environment may redirect or rename what the processes export.
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    procs: dict[str, ServiceProcess] = {}
    redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        for name, target in TARGETS.items():
            procs[name] = ServiceProcess(target, settings, tmp_path / f"{name}.log",
                                         CHECKOUT_SAGA_DEADLINE_S="300", **_otel(PROTOCOLS[name]))
        # The publish in this process starts the saga's trace (its producer span is the root).
        for key, value in _otel("http/protobuf").items():
            monkeypatch.setenv(key, value)
        order_id = f"jaeger-{unique}"  # the order id is the saga id
        await publish(settings, [OrderPlaced(order_id=order_id, customer_id="c-jaeger", sku="gadget", quantity=1,
                                             amount_cents=1_000)])

        async def shipped() -> bool:
            for name, proc in procs.items():
                assert proc.proc.poll() is None, f"{name} exited:\n{_tail(proc.log_path)}"
            return await redis.hget(f"{settings.redis_prefix}notification:sent", order_id) == "shipped"
        await wait_until(shipped, 120, f"order {order_id} to complete")

        async def whole_trace_in_jaeger() -> None:
            traces = await asyncio.to_thread(_saga_traces, order_id)
            by_trace = {tid: {s["service"] for s in _spans(t)} for tid, t in traces.items()}
            best = max(by_trace.values(), key=lambda s: len(s & set(SAGA_SERVICES)), default=set())
            missing = [f"{name} (OTLP {PROTOCOLS[name]})" for name in SAGA_SERVICES if name not in best]
            assert not missing, (
                f"no trace in Jaeger holds spans of {', '.join(missing)} yet; services by trace: {by_trace}")
        await eventually(whole_trace_in_jaeger, 60)

        # Late spans (the tracker's) may still arrive; none of them may open another trace.
        await asyncio.sleep(1)
        traces = await asyncio.to_thread(_saga_traces, order_id)
        assert len(traces) == 1, {tid: sorted({(s["service"], s["name"]) for s in _spans(t)})
                                  for tid, t in traces.items()}
        spans = _spans(next(iter(traces.values())))
        services = {s["service"] for s in spans}
        assert set(SAGA_SERVICES) <= services, services
        for span in spans:
            if span["service"] in SAGA_SERVICES:
                assert span["tags"].get("choreo.saga.id") == order_id, span
        for service in SAGA_SERVICES:
            handled = [s for s in spans if s["service"] == service and s["name"].startswith("process ")]
            assert handled, f"no consumer span of {service}: {[s['name'] for s in spans if s['service'] == service]}"
            assert all(s["tags"].get("messaging.system") == "kafka" for s in handled), handled
    finally:
        codes = {name: proc.terminate() for name, proc in procs.items() if proc.proc.poll() is None}
        await redis.aclose()
    assert all(code == 0 for code in codes.values()), codes
