"""Tracing (OpenTelemetry): one trace per saga, across services, exported over OTLP.

The W3C trace context travels in each record's ``traceparent``/``tracestate`` headers. A publish
opens a producer span (``send <topic>``, a new trace unless one is current), a handled event a
consumer span (``process <topic>``) whose parent is the context in the record, and each event a
handler emits a producer span under that. Retry and dead-letter records keep the original headers,
so every attempt and the dead-lettering land in the saga's trace; a replayed event keeps them too.

Configuration is the standard ``OTEL_*`` environment: tracing is on when
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set, over
``OTEL_EXPORTER_OTLP_PROTOCOL`` ``http/protobuf`` (default) or ``grpc``; ``OTEL_SERVICE_NAME``
overrides the resource's ``service.name`` (by default the choreo service's name), and
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off. Each component owns its
``TracerProvider`` (nothing global is set), and when tracing is off every call here returns at once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from choreo.errors import ConfigurationError
from choreo.transport import Headers, OutgoingRecord, Record

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_PROPAGATOR = TraceContextTextMapPropagator()
_PROTOCOLS = ("http/protobuf", "grpc")


def trace_enabled(env: Mapping[str, str]) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or env.get("OTEL_TRACES_EXPORTER", "") == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def otlp_protocol(env: Mapping[str, str], signal: str) -> str:
    """The OTLP protocol for ``signal`` (``TRACES`` or ``METRICS``) from the standard variables."""
    protocol = (env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or _PROTOCOLS[0])
    if protocol not in _PROTOCOLS:
        raise ConfigurationError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: choreo exports over {' or '.join(_PROTOCOLS)}"
        )
    return protocol


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    if otlp_protocol(env, "TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def _saga_context(saga_id: str, event_id: str, sampler: Any) -> SpanContext:
    """The remote parent of an untraced event: trace id from the saga id, span id from the event id.

    Whether it is sampled is the sampler's root decision for that trace id, which every service
    makes alike (``traceidratio`` looks only at the id), so a sampled saga is sampled everywhere."""
    trace_id = int.from_bytes(hashlib.blake2b(saga_id.encode(), digest_size=16).digest(), "big") or 1
    span_id = int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "big") or 1
    sampled = sampler is None or sampler.should_sample(None, trace_id, "saga").decision.is_sampled()
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)


def trace_id_of(headers: Headers) -> str | None:
    """The 32-hex-digit trace id in a record's ``traceparent`` header, if any."""
    for key, value in headers:
        if key == TRACEPARENT and value:
            parts = value.decode(errors="replace").split("-")
            if len(parts) >= 3 and len(parts[1]) == 32:
                return parts[1]
    return None


class Tracing:
    """Spans for one service or publisher. ``Tracing.off()`` costs one attribute check per call site."""

    def __init__(self, provider: TracerProvider | None, name: str) -> None:
        self._provider = provider
        self.enabled = provider is not None
        self._tracer = provider.get_tracer("choreo") if provider is not None else trace.NoOpTracer()
        # A parent-based sampler's root sampler decides for sagas that arrive without a trace.
        sampler = getattr(provider, "sampler", None)
        self._root_sampler = getattr(sampler, "_root", sampler)
        # With a parent-based sampler (the default), an unsampled parent means an unsampled span.
        from opentelemetry.sdk.trace.sampling import ParentBased

        self._follows_parent = isinstance(sampler, ParentBased)
        self.name = name

    @classmethod
    def off(cls) -> Tracing:
        return cls(None, "")

    @classmethod
    def from_env(cls, service_name: str, env: Mapping[str, str] | None = None,
                 exporter: SpanExporter | None = None) -> Tracing:
        """Tracing configured by ``OTEL_*`` (or sending to ``exporter``), or off when none is set."""
        env = os.environ if env is None else env
        if exporter is None and not trace_enabled(env):
            return cls.off()
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
        provider = TracerProvider(resource=Resource.create(attributes))
        provider.add_span_processor(BatchSpanProcessor(exporter or _otlp_exporter(env)))
        return cls(provider, service_name)

    # -- consuming ----------------------------------------------------------------------------------

    def consumer_span(self, record: Record, attributes: Callable[[], dict[str, Any]], *, saga_id: str,
                      event_id: str, replayed: bool = False) -> Span:
        """A started ``process <topic>`` span whose parent is the context carried by ``record``.

        A record without one (published by an untraced producer) gets a parent derived from its saga
        id, so every service that handles the saga's first events still joins one trace. In a saga
        that is not sampled the span is the parent's non-recording context and ``attributes`` is
        never called: an unsampled event costs little more than reading its header."""
        carrier = {k: v.decode(errors="replace") for k, v in record.headers if k in (TRACEPARENT, TRACESTATE) and v}
        if carrier:
            parent = _PROPAGATOR.extract(carrier)
        else:
            parent = trace.set_span_in_context(trace.NonRecordingSpan(_saga_context(saga_id, event_id,
                                                                                   self._root_sampler)))
        if self._follows_parent:
            context = trace.get_current_span(parent).get_span_context()
            if context.is_valid and not context.trace_flags.sampled:
                return trace.NonRecordingSpan(context)
        links: Sequence[Link] = ()
        if replayed:
            # A replayed event runs in its original trace; the link marks where that trace resumes.
            links = [Link(trace.get_current_span(parent).get_span_context(), {"choreo.replayed": True})]
        return self._tracer.start_span(f"process {record.topic}", context=parent, kind=SpanKind.CONSUMER,
                                       attributes=attributes(), links=links)

    @contextmanager
    def activate(self, span: Span) -> Iterator[None]:
        """Make ``span`` current while a handler runs (its own spans and logs nest under it)."""
        with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield

    # -- producing ----------------------------------------------------------------------------------

    def producer_spans(self, records: Sequence[OutgoingRecord], parent: Span | None,
                       attributes: Sequence[dict[str, Any]]) -> list[Span]:
        """A started ``send <topic>`` span per record, its context injected into the record's headers.

        Without ``parent`` each span continues the current context, or starts a new trace (a publish
        that starts a saga)."""
        if parent is not None and not parent.is_recording() and self._follows_parent:
            # An unsampled saga: pass its context on, with no spans that would be dropped anyway.
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(parent))
            encoded = [(k, v.encode()) for k, v in carrier.items()]
            for record in records:
                record.headers.extend(encoded)
            return []
        context = trace.set_span_in_context(parent) if parent is not None else None
        spans = []
        for record, attrs in zip(records, attributes):
            span = self._tracer.start_span(f"send {record.topic}", context=context, kind=SpanKind.PRODUCER,
                                           attributes=attrs)
            carrier = {}
            _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
            record.headers.extend((k, v.encode()) for k, v in carrier.items())
            spans.append(span)
        return spans

    @staticmethod
    def end_all(spans: Sequence[Span], error: BaseException | None = None) -> None:
        for span in spans:
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            span.end()

    @staticmethod
    def failed(span: Span, exc: BaseException, *, dead_letter_topic: str | None = None,
               retry_in_s: float | None = None, via: str = "") -> None:
        """Mark ``span`` failed: the exception, then either the retry or the dead-lettering."""
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        if dead_letter_topic is not None:
            span.add_event("dead-lettered", {"messaging.destination.name": dead_letter_topic})
        elif retry_in_s is not None:
            span.add_event("retry scheduled", {"choreo.retry.delay_s": retry_in_s, "choreo.retry.via": via})

    async def close(self) -> None:
        """Flush and stop the exporter (spans still buffered are sent)."""
        if self._provider is not None:
            import asyncio

            await asyncio.to_thread(self._provider.shutdown)
