"""The saga tracker: folds every event of every saga into per-saga state, and times sagas out.

The tracker is an ordinary choreo ``Service`` (its own consumer group) subscribed to every event type
of the flow graph. Each event is folded once (the service's idempotency keys guarantee it) into the
saga named by its correlation id, by the pure function ``fold``; the state is kept in a
``SagaStore`` (Redis). A timer publishes ``SagaTimedOut`` for a saga past its deadline (or past its
step deadline since the last event); compensations react to it like to any failure event.

Saga status: running -> completed | compensating -> compensated; timed_out when the deadline passed
(compensation then follows); compensation_failed when a compensation gave up (``CompensationFailed``,
sent by the service when it dead-letters a compensation's event). Step status: pending -> running (its input seen) -> completed | failed;
compensated once a compensation that undoes it completed; skipped if the saga ended without it; a step
still running when a timed-out saga ends is failed (it is the one that hung).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from opentelemetry import trace

from choreo.context import Context
from choreo.errors import ConfigurationError
from choreo.events import Event
from choreo.graph import FlowGraph, Step
from choreo.saga import CompensationFailed, Saga, SagaTimedOut
from choreo.service import Service
from choreo.settings import Settings
from choreo.wire import derive_event_id

log = logging.getLogger("choreo.tracker")

TERMINAL = frozenset({"completed", "compensated", "compensation_failed", "timed_out"})

SagaState = dict[str, Any]


class SagaStore(Protocol):
    """Where saga state lives. ``update`` is atomic per saga, also across tracker processes."""

    async def update(self, saga_id: str, change: Any) -> SagaState | None:
        """Apply ``change(old_state_or_None) -> new_state_or_None`` atomically and store the result."""

    async def get(self, saga_id: str) -> SagaState | None: ...

    async def due(self, now_ms: int, limit: int) -> list[str]:
        """Ids of sagas whose (step) deadline is at or before ``now_ms``."""

    async def postpone(self, saga_id: str, until_ms: int) -> None: ...

    async def close(self) -> None: ...


class _Index:
    """Lookups from event type names to steps, and which steps belong to which saga."""

    def __init__(self, graph: FlowGraph, sagas: Sequence[Saga]) -> None:
        self.graph = graph
        self.types: dict[str, type[Event]] = {}
        for step in graph.steps:
            for t in (step.consumes, *step.emits):
                self.types[t.event_type()] = t
        for saga in sagas:
            for t in (saga.starts_with, *saga.end_events):
                self.types[t.event_type()] = t
        self.types[SagaTimedOut.event_type()] = SagaTimedOut
        self.types[CompensationFailed.event_type()] = CompensationFailed
        self.failures = {s.consumes.event_type() for s in graph.steps if s.compensation} | {
            e.event_type() for s in sagas for e in s.fails_on
        } | {SagaTimedOut.event_type()}
        self.saga_steps: dict[str, list[Step]] = {}
        self.saga_of_type: dict[str, Saga] = {}
        for saga in sagas:
            steps = self._reachable(saga.starts_with) | self._reachable(SagaTimedOut)
            self.saga_steps[saga.name] = sorted(steps.values(), key=lambda s: s.id)
            for step in steps.values():
                for t in (step.consumes, *step.emits):
                    self.saga_of_type.setdefault(t.event_type(), saga)
            self.saga_of_type.setdefault(saga.starts_with.event_type(), saga)
            self.saga_of_type.setdefault(CompensationFailed.event_type(), saga)

    def _reachable(self, start: type[Event]) -> dict[str, Step]:
        found: dict[str, Step] = {}
        queue = [start]
        while queue:
            event = queue.pop()
            for step in self.graph.consumers(event):
                if step.id not in found:
                    found[step.id] = step
                    queue.extend(step.emits)
        return found


def _span_context(traceparent: str | None) -> trace.SpanContext:
    """The span context in a stored ``traceparent`` (invalid, so ignored, if there is none)."""
    parts = (traceparent or "").split("-")
    if len(parts) != 4:
        return trace.INVALID_SPAN_CONTEXT
    return trace.SpanContext(int(parts[1], 16), int(parts[2], 16), is_remote=True,
                             trace_flags=trace.TraceFlags(int(parts[3], 16)))


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def fold(state: SagaState | None, saga: Saga, index: _Index, *, saga_id: str, event_id: str, event_type: str,
         producer: str, causation_id: str | None, at_ms: int, attempt: int) -> SagaState:
    """The saga's state after one more event (pure; ``state`` itself for a duplicate).

    Events of one saga travel on several topics, so they may arrive in any order. The state is
    therefore replayed from all events seen so far, in causal order (by occurrence time, each after
    its cause), which gives the same story whatever the arrival order.
    """
    if state is not None and event_id in state["seen"]:
        return state
    event = {"id": event_id, "type": event_type, "producer": producer, "causation": causation_id,
             "at": at_ms, "attempt": attempt}
    events = [*(state["events"] if state else []), event]
    return _replay(saga, index, saga_id, _causal_order(events))


def _causal_order(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    remaining = sorted(events, key=lambda e: (e["at"], e["id"]))
    ids = {e["id"] for e in remaining}
    ordered: list[dict[str, Any]] = []
    placed: set[str] = set()
    while remaining:
        pick = next((e for e in remaining if e["causation"] not in ids or e["causation"] in placed), remaining[0])
        remaining.remove(pick)
        ordered.append(pick)
        placed.add(pick["id"])
    return ordered


def _replay(saga: Saga, index: _Index, saga_id: str, events: list[dict[str, Any]]) -> SagaState:
    deadline_ms = int(saga.deadline.total_seconds() * 1000)
    start_type = saga.starts_with.event_type()
    started = next((e["at"] for e in events if e["type"] == start_type), min(e["at"] for e in events))
    state: SagaState = {
        "id": saga_id, "saga": saga.name, "status": "running", "started_at": started,
        "updated_at": max(e["at"] for e in events), "ended_at": None, "deadline_at": started + deadline_ms,
        "steps": {
            s.id: {"service": s.service, "handler": s.handler, "compensation": s.compensation,
                   "undoes": f"{s.service}.{s.undoes}" if s.undoes else None, "status": "pending",
                   "started_at": None, "finished_at": None, "attempts": 0, "events": []}
            for s in index.saga_steps.get(saga.name, [])
        },
        "events": events, "seen": [e["id"] for e in events], "late": [],
    }
    types_by_id = {e["id"]: e["type"] for e in events}
    completes = {t.event_type() for t in saga.completes_on}
    fails = {t.event_type() for t in saga.fails_on}
    for e in events:
        _apply(state, index, e, types_by_id.get(e["causation"] or ""), completes, fails)
    state["next_deadline"] = next_deadline(state, saga)
    return state


def _apply(state: SagaState, index: _Index, e: dict[str, Any], cause_type: str | None,
           completes: set[str], fails: set[str]) -> None:
    event_type, at_ms = e["type"], e["at"]
    type_cls = index.types.get(event_type)
    if type_cls is not None:
        for step in index.graph.consumers(type_cls):
            entry = state["steps"].get(step.id)
            if entry is not None and entry["status"] == "pending":
                entry["status"], entry["started_at"] = "running", at_ms
        producers = [s for s in index.graph.producers(type_cls) if s.service == e["producer"] and s.id in state["steps"]]
        if cause_type is not None:
            producers = [s for s in producers if s.consumes.event_type() == cause_type] or producers
        for step in producers[:1]:
            entry = state["steps"][step.id]
            if step.compensation:
                entry["status"] = "completed"
                undone = state["steps"].get(entry["undoes"]) if entry["undoes"] else None
                if undone is not None and undone["status"] == "completed":
                    undone["status"] = "compensated"
            else:
                entry["status"] = "failed" if event_type in index.failures else "completed"
            entry["finished_at"] = at_ms
            entry["started_at"] = entry["started_at"] or at_ms
            entry["attempts"] = max(entry["attempts"], e["attempt"])
            entry["events"].append(e["id"])

    status = state["status"]
    if status in TERMINAL and status != "timed_out":
        if state["ended_at"] is not None and at_ms > state["ended_at"]:
            state["late"].append(e["id"])  # it occurred after the saga ended: ``saga show`` reports it
    elif event_type in completes and status != "timed_out":
        _end(state, "completed", at_ms)
    elif event_type in fails:
        _end(state, "timed_out" if status == "timed_out" else "compensated", at_ms)
    elif event_type == CompensationFailed.event_type():
        # A compensation gave up (its event is in a dead-letter topic): the saga cannot be unwound by
        # itself any more. It ends here and is reported, never forgotten.
        _end(state, "compensation_failed", at_ms)
    elif event_type == SagaTimedOut.event_type():
        state["status"] = "timed_out"
    elif event_type in index.failures and status == "running":
        state["status"] = "compensating"


def _end(state: SagaState, status: str, at_ms: int) -> None:
    state["status"], state["ended_at"] = status, at_ms
    for entry in state["steps"].values():
        if entry["status"] == "pending":
            entry["status"] = "skipped"
        elif entry["status"] == "running":
            # Its input arrived but it never answered: on a timed-out saga, that is the step that hung.
            entry["status"] = "failed" if status == "timed_out" else "skipped"


def next_deadline(state: SagaState, saga: Saga) -> int | None:
    """When the saga times out if nothing else happens (None once it ended or timed out)."""
    if state["status"] in TERMINAL or state["ended_at"] is not None:
        return None
    deadline = int(state["deadline_at"])
    if saga.step_deadline is not None:
        deadline = min(deadline, int(state["updated_at"]) + int(saga.step_deadline.total_seconds() * 1000))
    return deadline


class SagaTracker:
    """Builds the tracker service for ``sagas`` over the handlers of ``services``.

    Run it like any service: ``tracker = SagaTracker("checkout-tracker", services, [checkout]).service``
    and ``choreo run module:tracker``. ``check_interval_s`` is how often deadlines are checked.
    """

    def __init__(self, name: str, services: Iterable[Service], sagas: Sequence[Saga], *,
                 settings: Settings | None = None, store: SagaStore | None = None,
                 check_interval_s: float = 1.0) -> None:
        if not sagas:
            raise ConfigurationError(f"saga tracker {name}: give it at least one saga")
        self.graph = FlowGraph.build(services, sagas)
        self.sagas = list(sagas)
        self._index = _Index(self.graph, self.sagas)
        self._store = store
        self._interval = check_interval_s
        self._timer: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None
        self.service = Service(name, settings=settings)
        for type_name in sorted(self._index.types):
            cls = self._index.types[type_name]
            self.service.on(cls, name=f"track.{type_name}")(self._observe)
        self.service.on_start(self._start)
        self.service.on_stop(self._stop)

    @property
    def store(self) -> SagaStore:
        if self._store is None:
            raise ConfigurationError(f"saga tracker {self.service.name} is not started")
        return self._store

    async def _start(self) -> None:
        if self._store is None:
            from choreo.stores.redis import RedisSagaStore

            settings = self.service.settings
            self._store = RedisSagaStore(settings.redis_url, prefix=settings.redis_prefix)
        self._stopping = asyncio.Event()
        self._timer = asyncio.create_task(self._check_deadlines(self._stopping), name=f"{self.service.name}-deadlines")

    async def _stop(self) -> None:
        if self._timer is not None:
            # The cancel alone can be lost: on Python 3.11 ``asyncio.wait_for`` (redis-py's socket writes)
            # returns a result that arrived with the cancel and drops the cancel. The timer also checks
            # the flag, and is waited for no longer than the shutdown timeout: a service must stop.
            assert self._stopping is not None
            self._stopping.set()
            self._timer.cancel()
            _, pending = await asyncio.wait({self._timer}, timeout=self.service.settings.shutdown_timeout_s)
            if pending:
                log.warning("the saga deadline timer of %s did not stop within %.0f s; left behind",
                            self.service.name, self.service.settings.shutdown_timeout_s)
            self._timer = None
        if self._store is not None:
            await self._store.close()

    async def _observe(self, event: Event, ctx: Context) -> None:
        env = ctx.envelope
        saga = self._index.saga_of_type.get(env.event_type)
        if saga is None:
            return
        at_ms = int(env.occurred_at_datetime().timestamp() * 1000)

        # The saga's trace (the handler runs inside this event's consumer span, when tracing is on).
        span = trace.get_current_span().get_span_context()
        traceparent = f"00-{span.trace_id:032x}-{span.span_id:016x}-{span.trace_flags:02x}" if span.is_valid else None

        ended_before: list[bool] = []

        def change(state: SagaState | None) -> SagaState:
            ended_before[:] = [state is not None and state.get("ended_at") is not None]
            new = fold(state, saga, self._index, saga_id=env.correlation_id, event_id=env.event_id,
                       event_type=env.event_type, producer=env.producer, causation_id=env.causation_id,
                       at_ms=at_ms, attempt=env.attempt)
            if new is not state:
                new["trace"] = (state or {}).get("trace") or traceparent
            return new

        new = await self.store.update(env.correlation_id, change)
        metrics = self.service.metrics
        if metrics.enabled and new is not None and new.get("ended_at") is not None and ended_before == [False]:
            metrics.saga_ended(saga.name, new["status"], (new["ended_at"] - new["started_at"]) / 1000)

    async def _check_deadlines(self, stopping: asyncio.Event) -> None:
        from choreo.publisher import Publisher

        publisher = Publisher(self.service.name, settings=self.service.settings)
        try:
            while True:
                try:
                    await asyncio.wait_for(stopping.wait(), self._interval)
                    return  # asked to stop (also after a cancel that was lost during the last check)
                except asyncio.TimeoutError:
                    pass
                try:
                    await self.check_deadlines(publisher)
                    counts = getattr(self.store, "counts", None)
                    if counts is not None and self.service.metrics.enabled:
                        self.service.metrics.set_sagas(*await counts(int(time.time() * 1000)))
                except Exception:  # a Redis or broker outage must not kill the timer; it retries
                    log.exception("checking saga deadlines failed; retrying in %.1f s", self._interval)
        finally:
            await publisher.close()

    async def check_deadlines(self, publisher: Any, now_ms: int | None = None) -> int:
        """Publish ``SagaTimedOut`` for every saga past its deadline; returns how many."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        count = 0
        for saga_id in await self.store.due(now_ms, 500):
            state = await self.store.get(saga_id)
            saga = next((s for s in self.sagas if state and s.name == state["saga"]), None)
            if state is None or saga is None or next_deadline(state, saga) is None:
                continue
            event = SagaTimedOut(saga_id=saga_id, saga=saga.name, status=state["status"],
                                 deadline=_iso(int(next_deadline(state, saga) or 0)))
            # A fixed id per saga: a tracker that publishes twice (a crash, two trackers) is deduplicated.
            # Published inside the saga's trace, so its compensations appear there too.
            with trace.use_span(trace.NonRecordingSpan(_span_context(state.get("trace")))):
                await publisher.publish(event, correlation_id=saga_id,
                                        event_id=derive_event_id(saga_id, "timeout", 0))
            await self.store.postpone(saga_id, now_ms + 30_000)  # until the fold sees the timeout
            log.warning("saga %s (%s) timed out in status %s", saga_id, saga.name, state["status"])
            count += 1
        return count


def verify(state: SagaState, graph: FlowGraph) -> list[str]:
    """Where a saga's observed events depart from the declared graph (empty when they do not).

    Reports every event whose cause is not a declared edge (no handler of its producer consumes the
    cause's type and may emit its type), whose cause was never observed, or that occurred before its
    cause (its prerequisite).
    """
    types = {t.event_type(): t for s in graph.steps for t in (s.consumes, *s.emits)}
    starts = {s.starts_with.event_type() for s in graph.sagas} | {SagaTimedOut.event_type()}
    by_id = {e["id"]: e for e in state["events"]}
    problems: list[str] = []
    for event in state["events"]:
        what = f"{event['type']} {event['id']} from {event['producer']}"
        cause_id = event["causation"]
        if cause_id is None:
            if event["type"] not in starts:
                problems.append(f"{what} has no cause, but only a saga's start event may begin a chain")
            continue
        cause = by_id.get(cause_id)
        if cause is None:
            problems.append(f"{what}: its cause {cause_id} was never observed in this saga")
            continue
        emitted, consumed = types.get(event["type"]), types.get(cause["type"])
        declared = emitted is not None and consumed is not None and any(
            s.service == event["producer"] and s.consumes is consumed and emitted in s.emits for s in graph.steps
        )
        if not declared:
            problems.append(
                f"{what} caused by {cause['type']} {cause_id}: no handler of {event['producer']} consumes "
                f"{cause['type']} and emits {event['type']} (not a declared edge)"
            )
        if event["at"] < cause["at"]:
            problems.append(f"{what} occurred {cause['at'] - event['at']} ms before its cause {cause['type']} {cause_id}")
    return problems
