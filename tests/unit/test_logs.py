"""Structured logs: event fields from ``event_context``, the JSON and text formats, configure_logging."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from choreo import ConfigurationError, Settings, configure_logging, event_context
from choreo.logs import ContextFilter, JsonFormatter, TextFormatter, current_fields

log = logging.getLogger("choreo.service.inventory")
EVENT = {"service": "inventory", "handler": "reserve_stock", "event_id": "evt-1", "saga_id": "order-1"}


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream to configure logging with; the root logger is restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield io.StringIO()
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_event_fields_inside_event_context_only(stream: io.StringIO) -> None:
    configure_logging(Settings(log_format="json"), stream=stream)
    log.info("before")
    with event_context(**EVENT) as fields:
        log.info("reserved %d of %s", 2, "widget")
        logging.getLogger("services.inventory").warning("the handler's own logger")
    log.info("after")
    before, inside, own, after = json_lines(stream)
    assert fields.saga_id == "order-1"
    assert inside["message"] == "reserved 2 of widget"
    assert inside["level"] == "INFO" and inside["logger"] == "choreo.service.inventory"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", inside["time"])
    for line in (inside, own):
        assert {k: line[k] for k in EVENT} == EVENT
        assert "trace_id" not in line  # none given and no span is current
    assert own["level"] == "WARNING" and own["logger"] == "services.inventory"
    for line in (before, after):
        assert not set(line) & {*EVENT, "trace_id"}
        assert set(line) == {"time", "level", "logger", "message"}


async def test_fields_survive_into_a_task_created_inside_the_context(stream: io.StringIO) -> None:
    configure_logging(Settings(log_format="json"), stream=stream)
    go = asyncio.Event()

    async def later() -> None:
        await go.wait()
        log.info("in the task")

    with event_context(**EVENT):
        task = asyncio.create_task(later())
    assert current_fields() is None
    log.info("outside")
    go.set()
    await task
    outside, in_task = json_lines(stream)
    assert {k: in_task[k] for k in EVENT} == EVENT
    assert "saga_id" not in outside


def test_nested_contexts_restore_the_outer_fields() -> None:
    with event_context(**EVENT):
        with event_context(**{**EVENT, "event_id": "evt-2"}):
            inner = current_fields()
        outer = current_fields()
    assert inner is not None and inner.event_id == "evt-2"
    assert outer is not None and outer.event_id == "evt-1"
    assert current_fields() is None


def test_text_format_shows_the_bracket_only_about_an_event(stream: io.StringIO) -> None:
    configure_logging(Settings(), stream=stream)
    log.info("starting")
    with event_context(**EVENT, trace_id="0af7651916cd43dd8448eb211c80319c"):
        log.info("reserved")
    starting, reserved = stream.getvalue().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO choreo.service.inventory: starting",
                        starting)
    assert reserved.endswith(
        " INFO choreo.service.inventory: reserved [saga=order-1 event=evt-1 "
        "handler=inventory.reserve_stock trace=0af7651916cd43dd8448eb211c80319c]")


def test_configuring_twice_installs_one_handler(stream: io.StringIO) -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    configure_logging(Settings(), stream=io.StringIO())
    configure_logging(Settings(log_format="json"), stream=stream)
    assert len(root.handlers) == before + 1
    log.warning("once")
    assert len(json_lines(stream)) == 1


def test_the_level_comes_from_settings_unless_given(stream: io.StringIO) -> None:
    configure_logging(Settings(log_level="WARNING"), stream=stream)
    assert logging.getLogger().level == logging.WARNING
    configure_logging(Settings(log_level="WARNING"), level="debug", stream=stream)
    assert logging.getLogger().level == logging.DEBUG
    with pytest.raises(ConfigurationError, match="verbose"):
        configure_logging(Settings(), level="verbose", stream=stream)


def test_without_settings_format_and_level_come_from_the_environment(
        stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOREO_LOG_FORMAT", "json")
    monkeypatch.setenv("CHOREO_LOG_LEVEL", "ERROR")
    monkeypatch.setenv("CHOREO_KAFKA", "not an address")  # other variables are not read
    configure_logging(stream=stream)
    log.warning("dropped")
    log.error("kept")
    assert [line["message"] for line in json_lines(stream)] == ["kept"]
    monkeypatch.setenv("CHOREO_LOG_FORMAT", "xml")
    with pytest.raises(ConfigurationError, match="CHOREO_LOG_FORMAT"):
        configure_logging(stream=stream)


def test_the_trace_id_comes_from_the_current_span(stream: io.StringIO) -> None:
    configure_logging(Settings(log_format="json"), stream=stream)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("handle") as span:
        with event_context(**EVENT):
            log.info("from the span")
        with event_context(**EVENT, trace_id="given"):
            log.info("given wins")
        log.info("outside an event")
    from_span, given, outside = json_lines(stream)
    assert from_span["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert re.fullmatch(r"[0-9a-f]{32}", from_span["trace_id"])
    assert given["trace_id"] == "given"
    assert "trace_id" not in outside


def test_exceptions_are_under_exception(stream: io.StringIO) -> None:
    configure_logging(Settings(log_format="json"), stream=stream)
    with event_context(**EVENT):
        try:
            raise ValueError("out of widgets")
        except ValueError:
            log.exception("reserving failed")
    (line,) = json_lines(stream)
    assert line["message"] == "reserving failed" and line["level"] == "ERROR"
    assert line["exception"].startswith("Traceback") and "ValueError: out of widgets" in line["exception"]
    assert line["saga_id"] == "order-1"


def test_text_format_puts_the_traceback_on_the_next_lines(stream: io.StringIO) -> None:
    configure_logging(Settings(), stream=stream)
    try:
        raise ValueError("out of widgets")
    except ValueError:
        log.exception("reserving failed")
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("reserving failed")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: out of widgets"


def test_extra_fields_are_kept_and_unserialisable_ones_stringified(stream: io.StringIO) -> None:
    class Sku:
        def __str__(self) -> str:
            return "widget"

    configure_logging(Settings(log_format="json"), stream=stream)
    log.info("m", extra={"quantity": 2, "tags": ["a", "b"], "sku": Sku(), "odd": {(1, 2): "tuple key"},
                         "level": "not the level"})
    (line,) = json_lines(stream)
    assert line["quantity"] == 2 and line["tags"] == ["a", "b"] and line["sku"] == "widget"
    assert line["odd"] == "{(1, 2): 'tuple key'}"
    assert line["level"] == "INFO"


def test_extra_event_fields_given_by_the_caller_win() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    record.saga_id = "explicit"
    with event_context(**EVENT):
        assert ContextFilter().filter(record)
    assert record.__dict__["saga_id"] == "explicit" and record.__dict__["event_id"] == "evt-1"


def test_formatters_work_on_records_the_filter_never_saw() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain %s", ("line",), None)
    assert TextFormatter().format(record).endswith("INFO x: plain line")
    assert set(json.loads(JsonFormatter().format(record))) == {"time", "level", "logger", "message"}


def test_the_cli_reports_a_bad_log_setting_as_an_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from choreo.cli import main

    monkeypatch.setenv("CHOREO_LOG_FORMAT", "xml")
    assert main(["graph", "check", "services.checkout:system"]) == 1
    assert capsys.readouterr().err.startswith("choreo: error: invalid settings from environment: CHOREO_LOG_FORMAT")


async def test_a_services_lines_about_an_event_carry_its_fields(stream: io.StringIO) -> None:
    from choreo import Context, Publisher, RetryPolicy, Service
    from choreo.stores.memory import MemoryIdempotencyStore
    from choreo.transport.memory import MemoryBroker, MemoryTransport
    from tests.unit.test_service import PREFIX, OrderPlaced, poll_until

    configure_logging(Settings(log_format="json", log_level="INFO"), stream=stream)
    broker, config = MemoryBroker(), Settings(topic_prefix=PREFIX, topic_partitions=1)
    service = Service("inventory", settings=config, transport=MemoryTransport(broker),
                      idempotency=MemoryIdempotencyStore(), retry=RetryPolicy(max_attempts=2, initial_delay_s=0.001))

    @service.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        logging.getLogger("shop").info("reserving %s", event.order_id)  # any logger, not only ctx's
        raise RuntimeError("no stock")

    await service.start()
    async with Publisher("web", settings=config, transport=MemoryTransport(broker)) as publisher:
        event_id = await publisher.publish(OrderPlaced(order_id="o1", quantity=1), correlation_id="saga-1")
    await poll_until(service, lambda: len(service.stats.dead_lettered) == 1)
    await service.close()
    about = [line for line in json_lines(stream) if "o1" in line["message"] or "no stock" in line["message"]]
    assert {line["logger"] for line in about} >= {"shop", "choreo.service.inventory"}
    assert len(about) >= 4  # two runs, a retry warning, the dead-lettering
    for line in about:
        assert (line["service"], line["handler"], line["event_id"], line["saga_id"]) == (
            "inventory", "reserve", event_id, "saga-1"), line
