"""Metrics (OpenTelemetry): handler duration, events by outcome, dependency wait time, consumer lag,
in-flight events and saga outcomes, served for Prometheus scraping and exported over OTLP.

* ``CHOREO_METRICS_PORT`` (``Settings.metrics_port``) serves ``/metrics`` in Prometheus' text format
  on that port (all interfaces, as a scrape target in a container must be reachable).
* An OTLP endpoint in the standard ``OTEL_*`` variables (as for traces; ``OTEL_METRICS_EXPORTER=none``
  turns it off) pushes the same metrics every ``OTEL_METRIC_EXPORT_INTERVAL`` ms.

With neither, ``Metrics.off()`` is used and every call returns at once. Each service owns its
``MeterProvider``; nothing global is set.

Names (Prometheus form in brackets):

* ``choreo.handler.duration`` [``choreo_handler_duration_seconds``]: one handler run, by service,
  handler, event type and outcome (ok, failed, dead_lettered).
* ``choreo.events`` [``choreo_events_total``]: events by service, handler, event type and outcome:
  ok, skipped (a duplicate), failed (an attempt), retried, dead_lettered, parked.
* ``choreo.dependency.wait`` [``choreo_dependency_wait_seconds``]: from an event's creation to its
  handler starting, per edge of the flow graph (event type -> service.handler): waiting, not working.
* ``choreo.consumer.lag`` [``choreo_consumer_lag``]: records not yet consumed per topic and partition
  (high watermark minus position, as the client last saw them).
* ``choreo.consumer.in_flight`` [``choreo_consumer_in_flight``]: events fetched and not finished: the
  batch being processed, events waiting in memory behind an unfinished event of their key, and
  handler calls still running after their batch went on.
* ``choreo.consumer.paused`` [``choreo_consumer_paused``]: partitions paused for backpressure (too
  many events waiting in memory).
* ``choreo.saga.duration`` [``choreo_saga_duration_seconds``]: start to end, by saga and outcome
  (completed, compensated, compensation_failed, timed_out); from the saga tracker.
* ``choreo.sagas.running`` and ``choreo.sagas.overdue`` [same, with underscores]: sagas not ended,
  and those past their deadline (alert on the second); from the saga tracker.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

from choreo.errors import ConfigurationError
from choreo.tracing import otlp_protocol
from choreo.transport import TopicPartition

log = logging.getLogger("choreo.metrics")

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def otlp_metrics_enabled(env: Mapping[str, str]) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or env.get("OTEL_METRICS_EXPORTER", "") == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _otlp_reader(env: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    if otlp_protocol(env, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        return PeriodicExportingMetricReader(GrpcExporter())
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    return PeriodicExportingMetricReader(HttpExporter())


class Metrics:
    """The metrics of one service. Build with ``from_settings``; ``Metrics.off()`` records nothing."""

    def __init__(self, service: str, readers: list[Any], port: int = 0) -> None:
        self.service = service
        self.enabled = bool(readers)
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._provider: Any = None
        self._scrape: Any = None
        self._lag: dict[TopicPartition, int] = {}
        self._in_flight = 0
        self._paused = 0
        self._sagas: tuple[int, int] | None = None
        self._attrs: dict[tuple[str, str, str], dict[str, str]] = {}
        if not readers:
            return
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource

        self._scrape = next((r for r in readers if type(r).__name__ == "InMemoryMetricReader"), None)
        seconds = ExplicitBucketHistogramAggregation(_SECONDS)
        views = [View(instrument_name=n, aggregation=seconds)
                 for n in ("choreo.handler.duration", "choreo.dependency.wait", "choreo.saga.duration")]
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
        self._provider = MeterProvider(metric_readers=readers, views=views, resource=Resource.create(attributes))
        meter = self._provider.get_meter("choreo")
        self._duration = meter.create_histogram("choreo.handler.duration", unit="s",
                                                description="handler run time")
        self._events = meter.create_counter("choreo.events", unit="{event}", description="events by outcome")
        self._wait = meter.create_histogram("choreo.dependency.wait", unit="s",
                                            description="from an event's creation to its handler starting")
        self._saga_duration = meter.create_histogram("choreo.saga.duration", unit="s",
                                                     description="saga start to end, by outcome")
        meter.create_observable_gauge("choreo.consumer.lag", [self._observe_lag], unit="{record}",
                                      description="records not yet consumed, per partition")
        meter.create_observable_gauge("choreo.consumer.in_flight", [self._observe_in_flight], unit="{event}",
                                      description="events fetched and not finished")
        meter.create_observable_gauge("choreo.consumer.paused", [self._observe_paused], unit="{partition}",
                                      description="partitions paused for backpressure")
        meter.create_observable_gauge("choreo.sagas.running", [self._observe_running], unit="{saga}",
                                      description="sagas not ended")
        meter.create_observable_gauge("choreo.sagas.overdue", [self._observe_overdue], unit="{saga}",
                                      description="sagas past their deadline")

    @classmethod
    def off(cls) -> Metrics:
        return cls("", [])

    @classmethod
    def from_settings(cls, service: str, port: int, env: Mapping[str, str] | None = None,
                      extra_readers: Iterable[Any] = ()) -> Metrics:
        env = os.environ if env is None else env
        readers: list[Any] = list(extra_readers)
        if port:
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            readers.append(InMemoryMetricReader())
        if otlp_metrics_enabled(env):
            readers.append(_otlp_reader(env))
        return cls(service, readers, port)

    # -- recording (hot path: callers check ``enabled`` first) ------------------------------------------

    def _labels(self, handler: str, event_type: str, outcome: str) -> dict[str, str]:
        key = (handler, event_type, outcome)
        attrs = self._attrs.get(key)
        if attrs is None:
            attrs = self._attrs[key] = {"service": self.service, "handler": handler, "event_type": event_type,
                                        "outcome": outcome}
        return attrs

    def handled(self, handler: str, event_type: str, outcome: str, seconds: float) -> None:
        self._duration.record(seconds, self._labels(handler, event_type, outcome))

    def counted(self, handler: str, event_type: str, outcome: str, n: int = 1) -> None:
        self._events.add(n, self._labels(handler, event_type, outcome))

    def waited(self, handler: str, event_type: str, seconds: float) -> None:
        key = (handler, event_type, "")
        attrs = self._attrs.get(key)
        if attrs is None:
            attrs = self._attrs[key] = {"service": self.service, "handler": handler, "event_type": event_type,
                                        "edge": f"{event_type} -> {self.service}.{handler}"}
        self._wait.record(max(0.0, seconds), attrs)

    def set_lag(self, lag: Mapping[TopicPartition, int]) -> None:
        self._lag = dict(lag)

    def set_in_flight(self, count: int, paused: int = 0) -> None:
        self._in_flight = count
        self._paused = paused

    def saga_ended(self, saga: str, outcome: str, seconds: float) -> None:
        self._saga_duration.record(max(0.0, seconds), {"saga": saga, "outcome": outcome})

    def set_sagas(self, running: int, overdue: int) -> None:
        self._sagas = (running, overdue)

    def _observe_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"service": self.service, "topic": t, "partition": str(p)})
                for (t, p), n in sorted(self._lag.items())]

    def _observe_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._in_flight, {"service": self.service})]

    def _observe_paused(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._paused, {"service": self.service})]

    def _observe_running(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self._sagas is None else [Observation(self._sagas[0], {"service": self.service})]

    def _observe_overdue(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self._sagas is None else [Observation(self._sagas[1], {"service": self.service})]

    # -- serving ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Serve ``/metrics`` on the configured port; a port in use fails at start-up, naming it."""
        if not self._port or self._server is not None or self._scrape is None:
            return
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = metrics.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        try:
            self._server = ThreadingHTTPServer(("0.0.0.0", self._port), Handler)
        except OSError as exc:
            raise ConfigurationError(f"CHOREO_METRICS_PORT={self._port}: cannot serve metrics: {exc.strerror}") from None
        threading.Thread(target=self._server.serve_forever, name=f"{self.service}-metrics", daemon=True).start()
        log.info("metrics of %s on http://0.0.0.0:%d/metrics", self.service, self._port)

    def render(self) -> str:
        """The current values in Prometheus' text exposition format."""
        if self._scrape is None:
            return ""
        return prometheus_text(self._scrape.get_metrics_data())

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None


def _prom_name(name: str, unit: str) -> str:
    base = name.replace(".", "_")
    return base + "_seconds" if unit == "s" else base


def _labels(attributes: Mapping[str, Any], extra: str = "") -> str:
    parts = [f'{k.replace(".", "_")}="{_escape(str(v))}"' for k, v in sorted(attributes.items())]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def prometheus_text(data: Any) -> str:
    """OpenTelemetry ``MetricsData`` (cumulative) as Prometheus text: counters get ``_total``,
    histograms ``_bucket`` (cumulative, with ``le``), ``_sum`` and ``_count``."""
    from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum

    lines: list[str] = []
    for resource_metrics in data.resource_metrics if data is not None else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                name = _prom_name(metric.name, metric.unit or "")
                points = metric.data.data_points
                if isinstance(metric.data, Sum) and metric.data.is_monotonic:
                    lines += [f"# HELP {name}_total {metric.description}", f"# TYPE {name}_total counter"]
                    lines += [f"{name}_total{_labels(p.attributes)} {_number(p.value)}" for p in points]
                elif isinstance(metric.data, (Sum, Gauge)):
                    lines += [f"# HELP {name} {metric.description}", f"# TYPE {name} gauge"]
                    lines += [f"{name}{_labels(p.attributes)} {_number(p.value)}" for p in points]
                elif isinstance(metric.data, Histogram):
                    lines += [f"# HELP {name} {metric.description}", f"# TYPE {name} histogram"]
                    for p in points:
                        running = 0
                        for bound, count in zip([*p.explicit_bounds, float("inf")], p.bucket_counts):
                            running += count
                            le = "+Inf" if bound == float("inf") else _number(float(bound))
                            bucket = _labels(p.attributes, 'le="' + le + '"')
                            lines.append(f"{name}_bucket{bucket} {running}")
                        lines.append(f"{name}_sum{_labels(p.attributes)} {_number(p.sum)}")
                        lines.append(f"{name}_count{_labels(p.attributes)} {p.count}")
    return "\n".join(lines) + "\n"
