"""Service: a named consumer group whose handlers react to events and emit new ones.

The path of one batch (see DESIGN.md)::

    fetch batch -> decode (Avro by fingerprint) -> claim every idempotency key (one Redis call;
      beside it, whether any key has a parking list: only then the retry-order gate, a second)
      -> run handlers: a chain per record key in offset order, chains concurrently (bounded)
      -> hand the emitted events to the producer; then, as the batch's tail:
         wait for the broker's acks -> mark keys done / release failed claims (one Redis call)
         -> store offsets (committed asynchronously, periodically and on revoke/close)

The tail runs while the next batch is fetched, decoded, claimed and handled (its waits are about a
third of a batch's time). The next batch writes nothing (parks, sends, offsets) until the tail is
durable, so records of a key still go out in order; it claims only after the tail if it runs an event
held over in memory, whose claim the tail may give back. If the tail fails, neither batch happened:
the next gives back its claims and both are read again from the stored offsets.

An offset is stored only once the outcome of every record below it is durable, so a crash at any
point re-delivers from the lowest unfinished record; the idempotency key then skips what already
happened, and emitted event ids are derived from the input id, so a re-emitted event is a duplicate
that downstream services skip in turn.

An event that does not finish in its batch (a retry waiting in place, a claim held elsewhere, a
handler call slower than ``Settings.slow_handler_ms``) holds back only its chain: it and the chain's
later events wait in memory, bounded by ``Settings.max_buffered``, while the partition goes on.

Failures (see ``choreo.retry``): a record that cannot be decoded is dead-lettered in its place. A
handler that raises is retried after a backoff: a short one waits in place (its key waits behind it),
a long one goes through a retry topic while the partition moves on, with the key's later events
parked behind it (``choreo.parking``) so retries never reorder a key. After the last attempt the
event is dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import math
import os
import socket
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from choreo.context import Context
from choreo.errors import ChoreoError, ConfigurationError, DecodeError, EmitError, IdempotencyError, TransportError
from choreo.events import Envelope, Event, utc_now_iso
from choreo.idempotency import ClaimResult, IdempotencyStore, idempotency_key
from choreo.routing import Handler, Ordering, Subscription
from choreo.breaker import BreakerState, CircuitBreaker
from choreo.deadletter import Failure, dead_letter, dead_letter_topic, last_header
from choreo.parking import Gate, GateResult, ParkingLot, park_key
from choreo import retry as _retry
from choreo.retry import (
    DeadLetterNow,
    RetryLater,
    RetryPolicy,
    RetryState,
    original_topic,
    retry_tier,
    retry_topic,
    without_retry_headers,
)
from choreo.saga import STOPPED_STATUSES, CompensationFailed
from choreo.settings import Settings
from choreo.logs import enter_event, event_context, leave_event
from choreo.metrics import Metrics
from choreo.tracing import Tracing, trace_id_of
from choreo.transport import OutgoingRecord, Record, TopicPartition, TopicSpec, Transport
from choreo.wire import Wire, derive_event_id

log = logging.getLogger("choreo.service")

H = TypeVar("H", bound=Handler)

_OK, _SKIPPED, _FAILED, _BUSY, _NOT_RUN, _DEAD, _TO_RETRY, _PARKED = range(8)
_BEHIND = math.inf
# Outcomes counted once their batch is committed (failed attempts and retries are counted as they happen).
_OUTCOME_NAMES = {_OK: "ok", _SKIPPED: "skipped", _DEAD: "dead_lettered", _PARKED: "parked"}
# Outcomes after which the offset may move on: a retried or parked event lives on in a retry topic.
_FINISHED = (_OK, _SKIPPED, _DEAD, _TO_RETRY, _PARKED)


@dataclass(slots=True)
class _Item:
    record: Record
    envelope: Envelope
    event: Event
    sub: Subscription
    key: str
    claim: ClaimResult = ClaimResult.BUSY
    outcome: int = _NOT_RUN
    # Tuples, not default lists: two lists per event are measurable, and both are only ever replaced.
    out: Sequence[OutgoingRecord] = ()
    copy_of: _Item | None = None  # an earlier item of this batch with the same idempotency key
    stopped_saga: str | None = None  # the status of a saga whose forward steps no longer run
    error: BaseException | None = None  # the handler's exception when it failed
    retry: RetryState | None = None  # set for a record read from a retry topic
    park_key: str | None = None  # set for a handler with ordered retries and a keyed record
    gate: Gate | None = None
    delay: float = 0.0  # the backoff before the next attempt, once it failed
    due_ms: int = 0  # when its retry record may run (epoch ms)
    spans: Sequence[Any] = ()  # producer spans of its emitted events, ended on ack
    #: Held over to a later batch: when it may run again (monotonic s), or ``_BEHIND`` an earlier
    #: event of its chain, with which it goes.
    not_before: float = 0.0
    #: The worker still running its handler after its batch went on (see ``Settings.slow_handler_ms``).
    task: asyncio.Task[None] | None = None
    orphan: bool = False  # its partition was revoked while its handler ran

    def _reset(self) -> _Item:
        """Forget the outcome of a run, for an event held over to a later batch."""
        self.claim, self.outcome, self.out, self.copy_of = ClaimResult.BUSY, _NOT_RUN, (), None
        self.stopped_saga, self.error, self.gate, self.spans = None, None, None, ()
        return self


@dataclass(slots=True)
class ServiceStats:
    """Counters since start. ``dead_lettered`` keeps ``(topic, partition, offset, reason)`` of the last
    1,000 records sent to a dead-letter topic (bounded: a service runs for months)."""

    processed: int = 0
    skipped_duplicates: int = 0
    failed: int = 0
    emitted: int = 0
    batches: int = 0
    retried: int = 0
    parked: int = 0
    dead_lettered: deque[tuple[str, int, int, str]] = field(default_factory=lambda: deque(maxlen=1000))


class Service:
    """A named service: its handlers, its consumer group, and the loop that runs them.

    Register handlers with ``@service.on(EventType, emits=[...])``. Run with ``await service.run()``
    (or ``choreo run module:service``); ``stop()`` makes it finish the batch in flight, commit and
    close. ``transport`` and ``idempotency`` default to Kafka and Redis built from ``settings``
    (which default to ``Settings.from_env()`` when the service starts).
    """

    def __init__(
        self,
        name: str,
        *,
        settings: Settings | None = None,
        group: str | None = None,
        transport: Transport | None = None,
        idempotency: IdempotencyStore | None = None,
        skip_ended_sagas: bool = False,
        retry: RetryPolicy | None = None,
        parking: ParkingLot | None = None,
        tracing: Tracing | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if not name or not all(c.isalnum() or c in "_-." for c in name):
            raise ConfigurationError(f"service name {name!r} must be non-empty letters, digits, '_', '-', '.'")
        self.name = name
        self._group = group or name
        self._settings = settings
        self._transport = transport
        self._store = idempotency
        self._parking = parking
        self._tracing = tracing
        self._metrics = metrics
        self._threads: ThreadPoolExecutor | None = None
        self._lag_at = 0.0
        self._subs: list[Subscription] = []
        self._by_type: dict[type[Event], list[Subscription]] = {}
        self._by_topic: dict[str, tuple[type[Event], list[Subscription]]] = {}
        self._wire: Wire | None = None
        self._owner = f"{name}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop_requested = False
        # Failed attempts per (partition, offset, handler), with the time of the first failure.
        self._attempts: dict[tuple[TopicPartition, int, str], tuple[int, str]] = {}
        self._resume_at: dict[TopicPartition, float] = {}
        self._failures: dict[TopicPartition, int] = {}
        # Events held over to a later batch per partition, in offset order: those behind an
        # unfinished event of their chain. The partition's offset never passes the first of them.
        self._carried: dict[TopicPartition, list[_Item]] = {}
        # The next offset to read per partition: what is committed once nothing is held over.
        self._position: dict[TopicPartition, int] = {}
        # The offset last stored per partition (at first, that of the first record fetched): offsets
        # only move forward.
        self._stored: dict[TopicPartition, int] = {}
        # Partitions paused because too many events wait in memory (Settings.max_buffered).
        self._backpressured: set[TopicPartition] = set()
        self._buffered = 0
        self._due_at: float | None = None  # the earliest not_before of the held-over events
        # Handler calls that outlived their batch, by chain: each holds back its chain until settled.
        self._late: dict[object, _Item] = {}
        self._tail: _Tail | None = None
        self._draining = False
        self.stats = ServiceStats()
        self._log = logging.getLogger(f"choreo.service.{name}")
        self._started = False
        self._batch_time = ""
        self._batch_ms = 0
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._skip_ended_sagas = skip_ended_sagas
        self._breakers: dict[str, BreakerState] = {}
        #: The retry policy of handlers registered without their own.
        self.retry = retry or RetryPolicy()
        self._saga_statuses: Any = None
        self._retry_sources: set[str] = set()

    # -- declaration --------------------------------------------------------------------------------

    def on(
        self,
        event_type: type[Event],
        *,
        emits: Sequence[type[Event]] = (),
        name: str | None = None,
        compensable: bool = True,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        ordering: Ordering | None = None,
    ) -> Callable[[H], H]:
        """Register the decorated ``async def handler(event, ctx)`` for ``event_type``: a forward step.

        A plain ``def`` handler (blocking I/O) runs in the service's thread pool
        (``Settings.handler_threads``), never on the event loop.

        ``emits`` lists every event type the handler may emit; emitting another raises ``EmitError``.
        The handler's ``name`` (default: the function name) is part of its idempotency keys.
        ``compensable=False`` declares that the step needs no compensation when a later step fails
        (the flow-graph check otherwise asks for one). ``ordering`` overrides the service's
        ``Settings.ordering`` for this handler: ``key``, ``partition`` or ``unordered``.
        """

        def register(fn: H) -> H:
            self.add(Subscription.build(event_type, fn, emits=emits, name=name, compensable=compensable, retry=retry,
                                        breaker=breaker, ordering=ordering))
            return fn

        return register

    def compensate(
        self,
        event_type: type[Event],
        *,
        undoes: str | Callable[..., Any] | None = None,
        emits: Sequence[type[Event]] = (),
        name: str | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        ordering: Ordering | None = None,
    ) -> Callable[[H], H]:
        """Register a compensating handler: it reacts to a failure event on the saga's failure path.

        ``undoes`` names the forward handler of this service whose effects it reverses (the handler
        itself or its name). Compensations may only emit events that lead to other compensations or
        to the saga's end; ``choreo graph check`` rejects one that leads to a forward step.
        """
        if undoes is None or isinstance(undoes, str):
            target = undoes
        else:  # the handler function: find the name it was registered under
            target = next((s.name for s in self._subs if s.handler is undoes and not s.compensation),
                          getattr(undoes, "__name__", repr(undoes)))

        def register(fn: H) -> H:
            if target is not None and not any(s.name == target and not s.compensation for s in self._subs):
                raise ConfigurationError(
                    f"service {self.name}: compensation {name or fn.__name__!r} undoes {target!r}, "
                    "which is not a forward handler of this service (register the step first)"
                )
            self.add(Subscription.build(event_type, fn, emits=emits, name=name, compensation=True, undoes=target,
                                        retry=retry, breaker=breaker, ordering=ordering))
            return fn

        return register

    @property
    def metrics(self) -> Metrics:
        """This service's metrics (``Metrics.off()`` before it starts or when none are configured)."""
        return self._metrics or Metrics.off()

    def breaker_states(self) -> dict[str, str]:
        """The state of each handler's circuit breaker: closed, open or half-open."""
        return {name: b.state for name, b in sorted(self._breakers.items())}

    def _breaker_changed(self, handler: str) -> Callable[[str, str, str], None]:
        def changed(old: str, new: str, why: str) -> None:
            level = logging.WARNING if new != "closed" else logging.INFO
            self._log.log(level, "circuit breaker of handler %s: %s -> %s (%s)", handler, old, new, why)

        return changed

    def on_start(self, fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Run ``await fn()`` when the service starts, before any event (e.g. open a database pool)."""
        self._on_start.append(fn)
        return fn

    def on_stop(self, fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Run ``await fn()`` after the service has committed and closed its consumer."""
        self._on_stop.append(fn)
        return fn

    def add(self, sub: Subscription) -> None:
        if self._started:
            raise ConfigurationError(f"service {self.name}: handlers must be registered before it starts")
        if any(s.name == sub.name for s in self._subs):
            raise ConfigurationError(f"service {self.name}: two handlers are named {sub.name!r}")
        topic = sub.event_type.topic()
        for other in self._by_type:
            if other is not sub.event_type and other.topic() == topic:
                raise ConfigurationError(
                    f"service {self.name}: topic {topic} is claimed by {other.__name__} and {sub.event_type.__name__}"
                )
        self._by_type.setdefault(sub.event_type, []).append(sub)
        self._subs.append(sub)

    @property
    def group(self) -> str:
        """The consumer group id: the service name (or ``group=``) after the settings' ``topic_prefix``."""
        return self.settings.topic_prefix + self._group

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subs)

    def consumed_topics(self) -> list[str]:
        """Topic names this service subscribes to, with the settings' ``topic_prefix``."""
        prefix = self.settings.topic_prefix
        return sorted(prefix + t.topic() for t in self._by_type)

    def retry_topics(self) -> list[str]:
        """The retry tiers of every consumed topic (``<topic>.retry.1`` ...), also consumed."""
        return [retry_topic(t, k) for t in self.consumed_topics() for k in range(1, self.settings.retry_tiers + 1)]

    def emitted_topics(self) -> list[str]:
        prefix = self.settings.topic_prefix
        return sorted({prefix + t.topic() for s in self._subs for t in s.emits})

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, check Redis and the broker, create topics, join the consumer group."""
        if not self._subs:
            raise ConfigurationError(f"service {self.name} has no handlers")
        settings = self.settings
        if self._transport is None:
            from choreo.transport.kafka import KafkaTransport

            self._transport = KafkaTransport(settings, client_id=self.name)
        if self._store is None:
            from choreo.stores.redis import RedisIdempotencyStore

            self._store = RedisIdempotencyStore(settings.redis_url, prefix=settings.redis_prefix,
                                                 done_ttl_ms=settings.done_ttl_ms)
        await self._store.ping()
        if self._tracing is None:
            self._tracing = Tracing.from_env(self.name)
        if self._metrics is None:
            self._metrics = Metrics.from_settings(self.name, settings.metrics_port)
        self._metrics.start()
        if self._parking is None:
            from choreo.stores.redis import RedisIdempotencyStore, RedisParkingLot

            if isinstance(self._store, RedisIdempotencyStore):
                self._parking = RedisParkingLot(self._store.redis, settings.redis_url)
            else:
                from choreo.stores.memory import MemoryParkingLot

                self._parking = MemoryParkingLot()
        if self._skip_ended_sagas and self._saga_statuses is None:
            from choreo.stores.redis import RedisSagaStore

            self._saga_statuses = RedisSagaStore(settings.redis_url, prefix=settings.redis_prefix)
        await self._transport.connect()
        for hook in self._on_start:
            await hook()
        compensates = any(s.compensation for s in self._subs)
        internal = {settings.topic_prefix + CompensationFailed.topic()} if compensates else set()
        names = {*self.consumed_topics(), *self.emitted_topics(), *internal, *self.retry_topics(),
                 *(dead_letter_topic(t) for t in self.consumed_topics())}
        retries = set(self.retry_topics())
        specs = [TopicSpec(t, settings.retry_topic_partitions if t in retries else settings.topic_partitions,
                           settings.topic_replication) for t in sorted(names)]
        await self._transport.ensure_topics(specs, create=settings.create_topics)
        types = {s.event_type for s in self._subs} | {t for s in self._subs for t in s.emits}
        self._breakers = {
            sub.name: BreakerState(sub.breaker, on_change=self._breaker_changed(sub.name))
            for sub in self._subs if sub.breaker is not None
        }
        self._wire = Wire(self.name, types, topic_prefix=settings.topic_prefix,
                          lookup=self._transport.lookup_schema)
        emitted_types = {t for s in self._subs for t in s.emits} | ({CompensationFailed} if compensates else set())
        for emitted in sorted(emitted_types, key=lambda t: t.event_type()):
            await self._transport.register_schema(emitted.avro_schema())
        self._by_topic = {settings.topic_prefix + t.topic(): (t, subs) for t, subs in self._by_type.items()}
        for topic, route in list(self._by_topic.items()):
            for tier in range(1, settings.retry_tiers + 1):
                self._by_topic[retry_topic(topic, tier)] = route
                self._retry_sources.add(retry_topic(topic, tier))
        await self._transport.subscribe(
            self.consumed_topics() + self.retry_topics(), self.group, on_assign=self._assigned,
            on_revoke=self._revoked,
        )
        self._started = True
        self._log.info("service %s started: group %s, topics %s", self.name, self.group, self.consumed_topics())

    def stop(self) -> None:
        """Ask the loop to stop after the batch in flight; safe to call from a signal handler."""
        self._stop_requested = True

    async def run(self, *, until: Callable[[], bool] | None = None) -> None:
        """Start (if needed), process until ``stop()`` (or ``until()`` is true), then close."""
        try:
            if not self._started:
                await self.start()
            while not self._stop_requested and not (until and until()):
                await self.poll_once()
        finally:
            await self.close()

    async def _settle_late(self) -> None:
        """On the way out: wait for late handler calls (up to ``shutdown_timeout_s``) and make their
        outcome durable, starting nothing new."""
        if not self._late:
            return
        tasks = {i.task for i in self._late.values() if i.task is not None}
        _, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_timeout_s)
        if pending:
            self._log.warning("%d handler calls still running after %.0f s; their claims expire by themselves",
                              len(pending), self.settings.shutdown_timeout_s)
        self._draining = True
        await self._process([])

    async def poll_once(self, timeout: float = 0.1) -> int:
        """Fetch one batch and process it, with the held-over events now due; returns the number of
        records fetched. The batch's acks, done marks and offsets may still be under way on return:
        the next call waits for them before it writes anything, and ``flush`` or ``close`` waits too."""
        transport = self._require_transport()
        if self._tail is not None and self._tail.task is not None and self._tail.task.done():
            await self._previous_durable(set())  # a failed tail is read again even while idle
        self._resume_due()
        due_in = self._next_due()
        if due_in is not None:
            timeout = min(timeout, due_in)
        if self._late:
            timeout = min(timeout, 0.01)  # settle late calls soon after they finish
        records = await transport.fetch(self.settings.batch_size, timeout)
        metrics = self._metrics
        if metrics is not None and metrics.enabled:
            now = time.monotonic()
            # Also while idle: a caught-up (or stuck) consumer must still report its lag.
            if now - self._lag_at >= 1.0:
                self._lag_at = now
                metrics.set_lag(transport.lag())
        if not records and (due_in is None or self._next_due() != 0.0) and not any(
                i.task is not None and i.task.done() for i in self._late.values()):
            return 0
        if metrics is not None and metrics.enabled:
            metrics.set_in_flight(len(records) + self._buffered + len(self._late), len(self._backpressured))
            try:
                await self._process(records)
            finally:
                metrics.set_in_flight(self._buffered + len(self._late), len(self._backpressured))
            return len(records)
        await self._process(records)
        return len(records)

    def _next_due(self) -> float | None:
        """Seconds until the first held-over event may run (0.0: now), or None if none is held
        (events behind a running late call are not due until it is settled)."""
        if self._due_at is None:
            return None
        return max(0.0, self._due_at - time.monotonic())

    def _held_changed(self) -> None:
        self._buffered = sum(len(items) for items in self._carried.values())
        due = [i.not_before for items in self._carried.values() for i in items if i.not_before != _BEHIND]
        self._due_at = min(due) if due else None

    async def close(self) -> None:
        """Settle handler calls still running (see ``_settle_late``), commit, leave the group and
        release everything."""
        if self._late and self._started:
            try:
                await self._settle_late()
            except ChoreoError as exc:  # e.g. the broker is gone: their claims expire by themselves
                self._log.warning("settling %d running handler calls failed: %s", len(self._late), exc)
        if self._tail is not None:
            try:
                await self.flush()
            except ChoreoError as exc:  # its records are read again from the committed offsets
                self._log.warning("finishing the last batch failed: %s", exc)
        for item in self._late.values():  # still running after the shutdown timeout
            if item.task is not None:
                item.task.cancel()
        self._late.clear()
        if self._transport is not None:
            await self._transport.close()
        if self._store is not None:
            await self._store.close()
        if self._saga_statuses is not None:
            await self._saga_statuses.close()
        if self._parking is not None:
            await self._parking.close()
        if self._tracing is not None:
            await self._tracing.close()
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.close)
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None
        for hook in self._on_stop:
            await hook()
        self._log.info("service %s stopped", self.name)

    # -- rebalance ---------------------------------------------------------------------------------------

    def _assigned(self, partitions: Sequence[TopicPartition]) -> None:
        # A fresh assignment starts unpaused at the committed offset: forget local pauses.
        for tp in partitions:
            self._resume_at.pop(tp, None)
            self._failures.pop(tp, None)
            self._backpressured.discard(tp)
        self._log.info("assigned %s", sorted(partitions))

    def _revoked(self, partitions: Sequence[TopicPartition]) -> None:
        # Runs inside fetch, between batches: no handler is running. Held-over events hold no claim
        # and sit above the stored offset, so dropping them gives them cleanly to the next owner,
        # which reads them again from the offset committed as the partition goes.
        gone = set(partitions)
        dropped = 0
        for tp in partitions:
            self._resume_at.pop(tp, None)
            self._position.pop(tp, None)
            self._stored.pop(tp, None)
            self._backpressured.discard(tp)
            dropped += len(self._carried.pop(tp, ()))
        self._held_changed()
        # A late call goes on: once it finishes, its emitted events are sent and its key is marked
        # done, so the next owner (kept waiting by the claim meanwhile) skips it instead of running
        # it twice; only its offset is left to that owner.
        for item in self._late.values():
            if _tp(item.record) in gone:
                item.orphan = True
        self._attempts = {k: v for k, v in self._attempts.items() if k[0] not in gone}
        self._log.info("revoked %s%s", sorted(partitions),
                       f" ({dropped} unfinished events left to their next owner)" if dropped else "")

    def _resume_due(self) -> None:
        if not self._resume_at:
            return
        now = time.monotonic()
        due = [tp for tp, at in self._resume_at.items() if at <= now]
        for tp in due:
            del self._resume_at[tp]
        # A partition also paused for backpressure resumes once its held-over events drain.
        due = [tp for tp in due if tp not in self._backpressured]
        if due:
            self._require_transport().resume(due)

    # -- the batch pipeline ----------------------------------------------------------------------------

    async def _process(self, records: list[Record]) -> None:
        transport = self._require_transport()
        store = self._require_store()
        parking = self._parking
        assert self._wire is not None and parking is not None
        settings = self.settings
        self.stats.batches += 1
        # One timestamp per batch for every emitted event: isoformat per event is measurable, and a
        # batch is processed within milliseconds.
        self._batch_time = utc_now_iso()
        self._batch_ms = int(time.time() * 1000)
        fresh, poison, waits = self._decode(records)
        for tp, (offset, wait) in waits.items():
            self._pause(tp, offset, wait)
            self._position[tp] = offset
        touched = set(fresh) | set(poison) | set(waits) | set(self._carried)
        chains, held_back, late, rerun = self._plan(fresh)
        touched.update(_tp(i.record) for i in late)
        if chains and 1 < settings.concurrency <= len(self._late):
            # Every slot is taken by late calls: start nothing, claim nothing; look again shortly.
            again = time.monotonic() + 0.005
            for chain in chains:
                for index, item in enumerate(chain):
                    item.not_before = again if index == 0 else _BEHIND
                    held_back.setdefault(_tp(item.record), []).append(item)
            chains = []
        run = [item for chain in chains for item in chain]
        # Everything whose outcome this batch makes durable: what it runs, and the late calls of
        # earlier batches that have finished since.
        settled = run + late
        if not settled and not poison:
            if await self._previous_durable(touched):
                self._store_offsets(self._carry(held_back, [], touched))
            return
        tail = self._tail
        if tail is not None and (rerun or tail.released and not tail.released.isdisjoint(i.key for i in run)):
            # An event held over in memory runs again, or a copy of one the previous batch gives
            # back (a dead letter replayed, say): its claim must be given back before this batch
            # claims it anew, not after.
            if not await self._previous_durable(touched):
                return

        try:
            claims, parked = await self._claim(run, store, parking)
        except IdempotencyError as exc:
            self._log.error("%s; pausing %d partitions", exc, len(touched))
            if await self._previous_durable(touched):
                self._back_off(fresh, poison, settled, held_back, touched)
            return
        # The store grants this owner's own claim again, so an event whose claim this process holds
        # is recognised here: a copy in this batch or in the previous one (whose done marks may not
        # be written yet), a late call still running, or one settled now.
        claimed_here: dict[str, _Item] = {i.key: i for i in late}
        if self._late:
            claimed_here.update((i.key, i) for i in self._late.values())
        # The previous batch's done events are looked up where they are, not copied per batch.
        previous = self._tail.keys if self._tail is not None else {}
        for item, claim in zip(run, claims):
            if claim is ClaimResult.CLAIMED:
                first = claimed_here.get(item.key) or previous.get(item.key)
                if first is None:
                    claimed_here[item.key] = item
                else:
                    # A second copy of an event in this batch (the store grants our own claim again).
                    item.copy_of = first
                    claim = ClaimResult.BUSY
            item.claim = claim

        # Per-key order across retry topics: which events must wait behind an earlier one of their key.
        gated = [i for i in run if i.park_key is not None and i.claim is not ClaimResult.BUSY]
        if isinstance(parked, IdempotencyError):
            self._log.error("%s; pausing %d partitions", parked, len(touched))
            await self._release(self._claimed(run), store)
            if await self._previous_durable(touched):
                self._back_off(fresh, poison, settled, held_back, touched)
            return
        if gated and parked:
            try:
                gates = await parking.gate(
                    [(i.park_key, i.envelope.event_id, i.claim is ClaimResult.CLAIMED) for i in gated  # type: ignore[misc]
                     ], settings.done_ttl_ms)
            except IdempotencyError as exc:
                self._log.error("%s; pausing %d partitions", exc, len(touched))
                await self._release(self._claimed(run), store)
                if await self._previous_durable(touched):
                    self._back_off(fresh, poison, settled, held_back, touched)
                return
            for item, gate in zip(gated, gates):
                item.gate = gate

        if self._saga_statuses is not None:
            await self._skip_stopped_sagas(run)

        await self._run_chains(chains)
        if self._late:
            # A call that outlived the batch is settled by a later one: its outcome may change at
            # any await from here on, so nothing below may look at it.
            settled = [i for i in run if i.task is None] + late

        # A chain stops at its first event not finished (failed, or held elsewhere); that event and
        # the chain's later ones wait in memory for their turn, and the rest of the partition goes on.
        # A late call stays with its worker; the events behind it wait in memory.
        now = time.monotonic()
        for chain in chains + [[i] for i in late]:
            for index, item in enumerate(chain):
                if item.outcome not in _FINISHED:
                    for follower in chain[index + 1:]:
                        follower.not_before = _BEHIND
                    if item.task is not None:  # running on: it stays with its worker
                        held_back.setdefault(_tp(item.record), []).extend(chain[index + 1:])
                        break
                    if item.orphan:
                        break  # its partition is gone: its next owner runs it
                    item.not_before = now + self._wait_of(item)
                    held_back.setdefault(_tp(item.record), []).extend(chain[index:])
                    break
        # From here on this batch writes: the previous batch's outcome must be durable first, and
        # its records must have gone out before this batch's (per-key order).
        if not await self._previous_durable(touched, self._claimed(settled)):
            Tracing.end_all([span for item in settled if item.spans for span in item.spans],
                            TransportError("the previous batch failed; this one is read again"))
            return
        dead = self._dead_letters(settled, poison)
        retries = self._retry_records(settled) if self._retry_sources else []
        outgoing = [r for item in settled if item.outcome == _OK for r in item.out] + dead + retries
        if retries:
            parks = [(i.park_key, i.envelope.event_id, i.due_ms if i.outcome == _TO_RETRY else 0)
                     for i in settled if i.park_key is not None and i.outcome in (_TO_RETRY, _PARKED)]
            try:
                # Before the retry records go out: a head whose record is redelivered may run again.
                await parking.park(parks, settings.done_ttl_ms)
            except IdempotencyError as exc:
                self._log.error("%s; the batch will be retried", exc)
                await self._release(self._claimed(settled), store)
                self._back_off(fresh, poison, settled, held_back, touched)
                return
        spans = [span for item in settled if item.spans for span in item.spans]
        try:
            acks = transport.send(outgoing)  # the records are handed over now, in order
        except TransportError as exc:
            self._failed_send(exc, spans, len(outgoing))
            await self._release(self._claimed(settled), store)
            self._back_off(fresh, poison, settled, held_back, touched)
            return
        # The rest waits on the broker and Redis: the acks, the done marks, then the offsets. It runs
        # while the next batch is fetched, decoded, claimed and handled; that batch waits for it
        # before it writes anything (``_previous_durable``), and is read again if it failed. So the
        # events held over go to memory now, for the next batch to plan with; the offsets wait.
        commits = self._carry(held_back, settled, touched)
        # What the tail makes durable is read off the items now: the next batch resets the events
        # it takes over from memory.
        metrics = self._metrics
        keys = {i.key: i for i in settled if i.outcome == _OK}
        claimed = self._claimed(settled)
        tail = _Tail(
            touched=touched, keys=keys, spans=spans, records=len(outgoing),
            # A dead-lettered event is released, not done: a replay of it must run the handler again.
            done=list(keys),
            claimed=[i.key for i in claimed],
            released={i.key for i in claimed if i.outcome != _OK},
            # Heads that are finished for good let the next event of their key run.
            heads=[(i.park_key, i.envelope.event_id) for i in settled
                   if i.park_key is not None and i.gate is not None
                   and i.gate.result is GateResult.HEAD and i.outcome in (_OK, _SKIPPED, _DEAD)],
            commits=commits, ended=[tp for tp in fresh if tp not in held_back],
            finished=[(_tp(i.record), i.record.offset, i.sub.name) for i in settled if i.outcome in _FINISHED]
            if self._attempts else [],  # only batches that saw a failure pay for this walk
            counts=self._outcome_counts(settled) if metrics is not None and metrics.enabled else {},
            skipped=sum(1 for i in settled if i.outcome == _SKIPPED),
            emitted=len(outgoing) - len(dead) - len(retries),
        )
        tail.task = asyncio.ensure_future(self._finish(acks, tail))
        self._tail = tail

    async def _finish(self, acks: Awaitable[None], tail: _Tail) -> bool:
        """A batch's tail: wait for its acks, mark its keys done, store its offsets. False if its
        records or marks did not become durable (its claims are given back if its records are not out)."""
        store = self._require_store()
        parking = self._parking
        assert parking is not None
        settings = self.settings
        try:
            await acks
        except TransportError as exc:
            self._failed_send(exc, tail.spans, tail.records)
            await self._give_back(tail.claimed, store)
            return False
        if tail.spans:
            Tracing.end_all(tail.spans)
        try:
            await store.finish(tail.done, list(tail.released), self._owner, settings.done_ttl_ms)
            await parking.unpark(tail.heads)
        except IdempotencyError as exc:
            # The emitted events are out; the claims expire, and the re-run emits the same ids.
            self._log.error("%s; the batch will be retried", exc)
            return False
        self._store_offsets(tail.commits)
        for tp in tail.ended:
            self._failures.pop(tp, None)
        for attempt in tail.finished:
            self._attempts.pop(attempt, None)
        if tail.counts and self._metrics is not None:
            for (handler, event_type, outcome), n in tail.counts.items():
                self._metrics.counted(handler, event_type, outcome, n)
        self.stats.processed += len(tail.done)  # the keys of the events handled
        self.stats.skipped_duplicates += tail.skipped
        self.stats.emitted += tail.emitted
        return True

    def _failed_send(self, exc: TransportError, spans: list[Any], count: int) -> None:
        Tracing.end_all(spans, exc)
        self._log.error("publishing %d records failed: %s; the batch will be retried", count, exc)

    async def _previous_durable(self, touched: set[TopicPartition], claimed: Sequence[_Item] = ()) -> bool:
        """Wait for the previous batch's tail (see ``_finish``). If it failed, nothing of it or of the
        batch in hand happened: the batch in hand gives back its ``claimed`` items, and every
        partition either touched is read again from its stored offset after a backoff."""
        tail = self._tail
        if tail is None:
            return True
        self._tail = None
        assert tail.task is not None
        if await tail.task:
            return True
        if claimed:
            await self._release(list(claimed), self._require_store())
        self._rewind(tail.touched | touched)
        return False

    async def flush(self) -> None:
        """Wait until the batches processed so far are acknowledged, marked done and their offsets
        stored (``poll_once`` leaves that to the next call, which overlaps it with its own work)."""
        await self._previous_durable(set())

    def _rewind(self, partitions: set[TopicPartition]) -> None:
        """Forget what is held in memory for ``partitions`` and read them again, after a backoff, from
        their stored offsets: below those, every outcome is durable."""
        for tp in partitions:
            self._carried.pop(tp, None)
            offset = self._stored.get(tp)
            if offset is None:
                continue  # revoked meanwhile: its next owner reads it from the committed offset
            self._pause(tp, offset, None)
            self._position[tp] = offset
        self._held_changed()

    def _store_offsets(self, commits: dict[TopicPartition, int]) -> None:
        """Store offsets found by ``_carry`` once their outcomes are durable; offsets only move forward,
        and a partition revoked since is not ours to commit."""
        stored = self._stored
        moved = {tp: offset for tp, offset in commits.items() if tp in stored and offset > stored[tp]}
        if moved:
            stored.update(moved)
            self._require_transport().commit(moved)

    @staticmethod
    def _claimed(items: list[_Item]) -> list[_Item]:
        """The items whose claim this process holds and may give back: not those still running."""
        return [i for i in items if i.claim is ClaimResult.CLAIMED and i.task is None]

    def _decode(
        self, records: list[Record]
    ) -> tuple[dict[TopicPartition, list[_Item]], dict[TopicPartition, list[tuple[Record, DecodeError]]],
               dict[TopicPartition, tuple[int, float | None]]]:
        """The batch's records as items per partition in offset order, the records that cannot be
        decoded (dead-lettered in their place), and the partitions that wait from an offset on: a
        retry record not yet due (for the seconds given), or a writer schema that could not be
        fetched (None: back off). Every decoded record moves its partition's position on."""
        wire = self._wire
        assert wire is not None
        settings = self.settings
        prefix = settings.redis_prefix
        now_ms = self._batch_ms
        partitions: dict[TopicPartition, list[_Item]] = {}
        poison: dict[TopicPartition, list[tuple[Record, DecodeError]]] = {}
        waits: dict[TopicPartition, tuple[int, float | None]] = {}
        position = self._position
        stored = self._stored
        group = self.group
        parks: dict[str, bool] = {}  # per handler: are its keyed events gated (ordered retries)?
        for record in records:
            tp = (record.topic, record.partition)
            if tp in self._resume_at or tp in waits:
                continue  # waiting: it will be fetched again from the offset it waits at
            if tp not in stored:
                stored[tp] = record.offset  # where reading started: committed already
            route = self._by_topic.get(record.topic)
            if route is None:
                continue  # not ours (cannot happen with a subscription per topic)
            cls, subs = route
            state: RetryState | None = None
            if record.topic in self._retry_sources:
                try:
                    state = RetryState.read(record.headers)
                except ValueError as exc:
                    poison.setdefault(tp, []).append((record, DecodeError(str(exc), reason="bad-retry-headers")))
                    position[tp] = record.offset + 1
                    continue
                if state.due_ms > now_ms:
                    waits[tp] = (record.offset, (state.due_ms - now_ms) / 1000)
                    continue
                subs = [sub for sub in subs if sub.name in state.handlers]
                if not subs:
                    error = DecodeError(f"no handler named {', '.join(state.handlers)} (renamed while the event "
                                        "waited for a retry?)", reason="unknown-handler")
                    poison.setdefault(tp, []).append((record, error))
                    position[tp] = record.offset + 1
                    continue
            try:
                envelope, event = wire.decode(record, cls)
            except DecodeError as exc:
                poison.setdefault(tp, []).append((record, exc))
                position[tp] = record.offset + 1
                continue
            except TransportError as exc:
                self._log.warning("cannot fetch a writer schema for %s [%d] offset %d: %s; will retry",
                                  record.topic, record.partition, record.offset, exc)
                waits[tp] = (record.offset, None)
                continue
            position[tp] = record.offset + 1
            items = partitions.setdefault(tp, [])
            origin_topic = record.topic if state is None else state.origin[0]
            for sub in subs:
                key = idempotency_key(prefix, self.name, sub.name, envelope.correlation_id, envelope.event_id)
                item = _Item(record, envelope, event, sub, key, retry=state)
                gated = parks.get(sub.name)
                if gated is None:
                    gated = parks[sub.name] = bool(settings.retry_tiers) and (sub.retry or self.retry).ordered and (
                        sub.ordering or settings.ordering) != "unordered"
                if gated and record.key is not None:
                    item.park_key = park_key(prefix, group, sub.name, origin_topic, record.key)
                items.append(item)
        return partitions, poison, waits

    def _plan(
        self, fresh: dict[TopicPartition, list[_Item]]
    ) -> tuple[list[list[_Item]], dict[TopicPartition, list[_Item]], list[_Item], bool]:
        """This batch's chains, the events that wait in memory instead of running now, the late calls
        settled now, and whether a chain holds an event held over from an earlier batch.

        A chain holds the events that must run one after another: those of one handler and record
        key in a partition (``ordering="key"``), of one handler in a partition (``"partition"``), or
        one event alone (``"unordered"``); records without a key keep partition order. Events held
        over from earlier batches come first, in offset order. A chain whose first held event is not
        due yet waits whole, new events included, and so does a chain whose late call still runs.
        Late calls that have finished are returned, to be settled with this batch."""
        default = self.settings.ordering
        now = time.monotonic()
        chains: dict[object, list[_Item] | None] = {}  # None: the chain waits this batch
        held_back: dict[TopicPartition, list[_Item]] = {}
        order: list[list[_Item]] = []
        late: list[_Item] = []
        settled: set[object] = set()  # chains whose late call finished: their next event goes next
        for cid, item in list(self._late.items()):
            assert item.task is not None
            if not item.task.done():
                chains[cid] = None
                continue
            del self._late[cid]
            item.task.result()  # a bug of ours, not a handler's failure: let it surface
            item.task = None
            late.append(item)
            # Its chain waits this batch either way: the call's outcome (done, parked behind a
            # retry) becomes durable with this batch, and only then may the events behind it run.
            chains[cid] = None
            if item.outcome in _FINISHED:
                settled.add(cid)
        draining = self._draining
        again = False
        for tp, held in list(self._carried.items()):
            for item in held:
                cid = _chain_id(tp, item, item.sub.ordering or default)
                if cid in settled:  # the first event behind a call settled now goes next batch
                    settled.discard(cid)
                    item.not_before = 0.0
                    held_back.setdefault(tp, []).append(item)
                    continue
                if cid not in chains:
                    # The chain's first held event decides.
                    chain = chains[cid] = [] if item.not_before <= now and not draining else None
                    if chain is not None:
                        order.append(chain)
                    else:
                        held_back.setdefault(tp, []).append(item)
                        continue
                else:
                    chain = chains[cid]
                if chain is None:
                    item.not_before = _BEHIND
                    held_back.setdefault(tp, []).append(item)
                else:
                    chain.append(item._reset())
                    again = True
        for tp, items in fresh.items():
            for item in items:
                cid = _chain_id(tp, item, item.sub.ordering or default)
                if cid in settled:
                    settled.discard(cid)
                    item.not_before = 0.0
                    held_back.setdefault(tp, []).append(item)
                    continue
                if cid not in chains:
                    chain = chains[cid] = None if draining else []
                    if chain is not None:
                        order.append(chain)
                else:
                    chain = chains[cid]
                if chain is None:
                    item.not_before = _BEHIND
                    held_back.setdefault(tp, []).append(item)
                else:
                    chain.append(item)
        return order, held_back, late, again

    async def _run_chains(self, chains: list[list[_Item]]) -> None:
        """Run the chains, at most ``Settings.concurrency`` handler calls at a time: a few workers
        (not a task per event) each take the next chain and run it through; the first starts the
        others once a call waits on something.

        After ``Settings.slow_handler_ms`` the batch goes on: workers start nothing more, and a call
        still running finishes in the background as a late item that holds back its chain."""
        settings = self.settings
        if settings.concurrency == 1:
            for chain in chains:
                await self._run_chain(chain, None)
            return
        width = min(settings.concurrency - len(self._late), len(chains))
        if width <= 0:
            return  # every slot is taken by slow calls of earlier batches: these chains wait
        phase = _Phase()
        queue = iter(chains)  # shared: each worker's next() takes a chain no other worker has

        async def worker(slot: int) -> None:
            for chain in queue:
                await self._run_chain(chain, phase, slot)
                if phase.cutoff:
                    return

        # One worker first: handlers that wait on nothing (most) run through it without a task each
        # (64 tasks per batch cost about half a microsecond per event). The first call that waits on
        # something starts the others (``_Phase.grow``), so waiting calls still overlap up to the width.
        loop = asyncio.get_running_loop()
        budget = settings.slow_handler_ms / 1000
        deadline = loop.time() + budget
        tasks = [asyncio.create_task(worker(0))]
        if width > 1:
            grown = phase.grown = loop.create_future()
            await asyncio.wait((tasks[0], grown), timeout=budget, return_when=asyncio.FIRST_COMPLETED)
            phase.grown = None
            if grown.done() and not tasks[0].done():
                tasks += [asyncio.create_task(worker(slot)) for slot in range(1, width)]
            grown.cancel()
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        if not pending:
            for task in tasks:
                task.result()  # a bug of ours, not a handler's failure: let it surface
            return
        phase.cutoff = True
        default = settings.ordering
        for slot, task in enumerate(tasks):
            if task.done():
                task.result()
                continue
            item = phase.current.get(slot)
            if item is None:
                continue  # between two calls: it sees the cutoff and ends without starting one
            item.task = task
            self._late[_chain_id(_tp(item.record), item, item.sub.ordering or default)] = item
        if self._late:
            self._log.debug("%d handler calls outlived their batch; their keys wait for them", len(self._late))

    def _wait_of(self, item: _Item) -> float:
        """Seconds before an unfinished event runs again."""
        if item.outcome == _BUSY:
            return 0.2  # another process holds the claim; its lease or finish frees it soon
        if isinstance(item.error, _BreakerOpen):
            return max(0.01, item.error.retry_in)
        if item.error is not None:
            return item.delay
        return 0.0  # behind an unfinished event of its chain: it goes when that one does

    def _carry(self, held_back: dict[TopicPartition, list[_Item]], run: list[_Item],
               touched: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Keep the unfinished events for a later batch, apply backpressure, and return the offset to
        store for each touched partition (its lowest unfinished event, or past its last record) once
        the batch's outcomes are durable."""
        carried = self._carried
        for tp in touched:
            items = held_back.get(tp)
            if items:
                items.sort(key=_offset_of)
                carried[tp] = items
            else:
                carried.pop(tp, None)
        commits: dict[TopicPartition, int] = {}
        stored = self._stored
        running: dict[TopicPartition, int] = {}
        for item in self._late.values():  # a call still running is an unfinished event too
            tp = _tp(item.record)
            running[tp] = min(running.get(tp, item.record.offset), item.record.offset)
        for tp in touched:
            items = carried.get(tp)
            offset = items[0].record.offset if items else self._position.get(tp)
            if offset is not None and tp in running:
                offset = min(offset, running[tp])
            if offset is not None and offset > stored.get(tp, -1):
                commits[tp] = offset
        self._held_changed()
        buffered = self._buffered
        bound = self.settings.max_buffered
        if buffered >= bound:
            full = [tp for tp in carried if tp not in self._backpressured]
            if full:
                self._backpressured.update(full)
                self._require_transport().pause(full)
                self._log.warning("%d events wait in memory (bound %d): pausing %d partitions until they drain",
                                  buffered, bound, len(full))
        elif self._backpressured and buffered <= bound // 2:
            drained = [tp for tp in self._backpressured if tp not in self._resume_at]
            self._backpressured.clear()
            self._require_transport().resume(drained)
            self._log.info("%d events wait in memory: resuming %d partitions", buffered, len(drained))
        return commits

    def _back_off(self, fresh: dict[TopicPartition, list[_Item]],
                  poison: dict[TopicPartition, list[tuple[Record, DecodeError]]], run: list[_Item],
                  held_back: dict[TopicPartition, list[_Item]], touched: set[TopicPartition]) -> None:
        """A store or broker call failed: nothing of this batch happened. Its new records are fetched
        again after a backoff; events held over from earlier batches wait as long in memory."""
        first_new = {tp: items[0].record.offset for tp, items in fresh.items() if items}
        for tp, bad in poison.items():  # a dead letter not sent is a record not finished
            first_new[tp] = min(first_new.get(tp, bad[0][0].offset), bad[0][0].offset)
        for tp, offset in first_new.items():
            self._pause(tp, offset, None)
            self._position[tp] = offset
        wait = {tp: self._resume_at.get(tp, 0.0) for tp in touched}
        again: dict[TopicPartition, list[_Item]] = {}
        fresh_ids = {id(i) for items in fresh.values() for i in items}
        for item in run + [i for items in held_back.values() for i in items]:
            if id(item) in fresh_ids or item.orphan:
                continue
            tp = _tp(item.record)
            if tp not in wait or not wait[tp]:
                failures = self._failures.get(tp, 0) + 1
                self._failures[tp] = failures
                wait[tp] = time.monotonic() + min(self.settings.max_backoff_ms / 1000, 0.1 * 2 ** (failures - 1))
            item.not_before = max(item.not_before, wait[tp])
            item._reset()
            again.setdefault(tp, []).append(item)
        for tp in touched:
            items = again.get(tp)
            if items:
                items.sort(key=_offset_of)
                self._carried[tp] = items
            else:
                self._carried.pop(tp, None)
        self._held_changed()

    @staticmethod
    def _outcome_counts(items: list[_Item]) -> dict[tuple[str, str, str], int]:
        """Events per (handler, event type, outcome), for the metrics."""
        counts: dict[tuple[str, str, str], int] = {}
        for item in items:
            outcome = _OUTCOME_NAMES.get(item.outcome)
            if outcome is not None:
                key = (item.sub.name, item.envelope.event_type, outcome)
                counts[key] = counts.get(key, 0) + 1
        return counts

    def _dead_letters(self, run: list[_Item], poison: dict[TopicPartition, list[tuple[Record, DecodeError]]]
                      ) -> list[OutgoingRecord]:
        """Dead-letter records (and ``CompensationFailed`` events) for this batch's finished failures.

        An event that failed in a retry topic is dead-lettered as its original record: topic,
        partition, offset and headers as first consumed, so ``choreo dlq replay`` sends it back there."""
        out: list[OutgoingRecord] = []
        for tp, bad in poison.items():
            for record, exc in bad:
                failure = Failure(exc.reason, type(exc).__name__, str(exc))
                original = _origin(record)
                self._log.error(
                    "cannot process %s [%d] offset %d: %s: %s; sent to %s",
                    record.topic, record.partition, record.offset, exc.reason, exc, dead_letter_topic(original.topic),
                )
                out.append(dead_letter(original, failure, service=self.name))
                self.stats.dead_lettered.append((record.topic, record.partition, record.offset, exc.reason))
                if self._metrics is not None and self._metrics.enabled:
                    self._metrics.counted("", "undecodable", "dead_lettered")
        # A dead item always has a recorded attempt: without any, the per-item walk is skipped.
        for item in run if self._attempts else ():
            if item.outcome != _DEAD:
                continue
            assert item.error is not None
            attempts, since = self._attempts.get((_tp(item.record), item.record.offset, item.sub.name), (1, ""))
            failure = Failure.from_exception("handler-error", item.error, handler=item.sub.name,
                                             attempts=attempts, first_failure=since)
            rec = _origin(item.record, item.retry)
            with event_context(service=self.name, handler=item.sub.name, event_id=item.envelope.event_id,
                               saga_id=item.envelope.correlation_id, trace_id=trace_id_of(rec.headers)):
                self._log.error(
                    "handler %s gave up on %s [%d] offset %d (event %s) after %d attempt(s): %s: %s; sent to %s",
                    item.sub.name, rec.topic, rec.partition, rec.offset, item.envelope.event_id, attempts,
                    failure.error_type, failure.error, dead_letter_topic(rec.topic),
                )
            out.append(dead_letter(rec, failure, service=self.name))
            self.stats.dead_lettered.append((rec.topic, rec.partition, rec.offset, "handler-error"))
            if item.sub.compensation:
                assert self._wire is not None
                env = item.envelope
                out.append(self._wire.encode(
                    CompensationFailed(saga_id=env.correlation_id, service=self.name, handler=item.sub.name,
                                       error=f"{failure.error_type}: {failure.error}"[:1000]),
                    event_id=derive_event_id(env.event_id, f"{item.sub.name}/compensation-failed", 0),
                    correlation_id=env.correlation_id, causation_id=env.event_id, occurred_at=self._batch_time,
                ))
                # It belongs to the saga's trace: carry the failed event's trace context on.
                out[-1].headers.extend((k, v) for k, v in rec.headers if k in ("traceparent", "tracestate"))
        return out

    def _retry_records(self, items: list[_Item]) -> list[OutgoingRecord]:
        """Records for the retry topics: events whose handler waits long for its next attempt, and
        events parked behind an earlier event of their key. Original key, value and headers."""
        out: list[OutgoingRecord] = []
        for item in items:
            if item.outcome != _TO_RETRY and item.outcome != _PARKED:
                continue
            rec = item.record
            prior = item.retry
            origin = prior.origin if prior is not None else (rec.topic, rec.partition, rec.offset)
            if item.outcome == _TO_RETRY:
                attempts, since = self._attempts[(_tp(rec), rec.offset, item.sub.name)]
                tier = retry_tier(item.delay, self.settings.retry_tiers)
                error = f"{type(item.error).__name__}: {item.error}"
            else:
                attempts = prior.attempts if prior is not None else 0
                since = prior.first_failure if prior is not None else ""
                tier, error = 1, ""
            state = RetryState(attempts, item.due_ms, (item.sub.name,), since, origin,
                               parked=item.outcome == _PARKED, error=error)
            headers = without_retry_headers(rec.headers) if prior is not None else list(rec.headers)
            out.append(OutgoingRecord(retry_topic(origin[0], tier), rec.key, rec.value or b"",
                                      headers + state.headers()))
        return out

    async def _skip_stopped_sagas(self, items: list[_Item]) -> None:
        """Forward steps of compensating or timed-out sagas, and compensations of completed ones, do
        not run (one Redis call per batch)."""
        candidates = [i for i in items if i.claim is ClaimResult.CLAIMED]
        if not candidates:
            return
        try:
            statuses = await self._saga_statuses.statuses([i.envelope.correlation_id for i in candidates])
        except Exception as exc:  # the tracker's state is advisory: without it, steps run as usual
            self._log.warning("reading saga statuses failed, running steps unchecked: %s", exc)
            return
        for item, status in zip(candidates, statuses):
            # Forward steps stop once a saga compensates; nothing compensates a completed saga.
            if status in STOPPED_STATUSES if not item.sub.compensation else status == "completed":
                item.stopped_saga = status
                self._log.info("not running %s for saga %s: it is %s", item.sub.name,
                               item.envelope.correlation_id, status)

    async def _run_chain(self, items: list[_Item], phase: _Phase | None, slot: int = 0) -> None:
        """Run a chain's events one after another, stopping at the first that does not finish (or
        before the next one, once its batch went on without this worker)."""
        wire = self._wire
        tracing = self._tracing
        assert wire is not None and tracing is not None
        # Keys whose earlier event in this chain went to a retry topic or was parked, with the time
        # that event is due: the key's later events here are parked behind it.
        held: dict[str, int] = {}
        current = phase.current if phase is not None else None
        for item in items:
            if phase is not None and phase.cutoff:
                return
            if item.claim is ClaimResult.DONE:
                item.outcome = _SKIPPED
                continue
            if item.claim is ClaimResult.BUSY:
                first = item.copy_of
                if first is not None and first.outcome in _FINISHED and (
                        first.record.topic, first.record.partition) == (item.record.topic, item.record.partition):
                    # The copy's first delivery was handled earlier in this partition (done, sent on to a
                    # retry topic, parked or dead-lettered): this one is a duplicate.
                    item.outcome = _SKIPPED
                    continue
                # Held elsewhere (another process, or a copy on another partition): try again shortly.
                item.outcome = _BUSY
                return
            pk = item.park_key
            gate = item.gate.result if item.gate is not None else GateResult.FREE
            # The head of its key runs even behind a parked record of that key in this batch: in a
            # retry topic the head's latest record may come after its followers' records.
            if pk is not None and gate is not GateResult.HEAD and (gate is GateResult.PARKED or pk in held):
                head_due = held.get(pk) or (item.gate.head_due_ms if item.gate is not None else 0)
                item.outcome = _PARKED
                item.due_ms = _recheck_at(self._batch_ms, head_due)
                self.stats.parked += 1
                self._log.debug("event %s of handler %s parked behind an earlier event of key %r in retry",
                                item.envelope.event_id, item.sub.name, item.record.key)
                continue
            if item.stopped_saga is not None:
                item.outcome = _OK  # handled: done, committed, nothing emitted
                continue
            breaker = self._breakers.get(item.sub.name)
            if breaker is not None and not breaker.allow():
                # The dependency is down: wait for the probe without spending an attempt.
                item.outcome = _FAILED
                item.error = _BreakerOpen(breaker.retry_in())
                return
            env = item.envelope
            ctx = Context(
                env,
                service=self.name,
                handler=item.sub.name,
                idempotency_key=item.key,
                allowed=item.sub.emits,
                logger=self._log,
            )
            span = self._consumer_span(item) if tracing.enabled else None
            metrics = self._metrics if self._metrics is not None and self._metrics.enabled else None
            if metrics is not None:
                started = time.perf_counter()
                metrics.waited(item.sub.name, env.event_type,
                               time.time() - env.occurred_at_datetime().timestamp())
            trace_id = f"{span.get_span_context().trace_id:032x}" if span is not None else None
            # Every log line about this event, the handler's own included, names it.
            fields = enter_event(self.name, item.sub.name, env.event_id, env.correlation_id, trace_id)
            try:
                if current is not None:
                    current[slot] = item
                sub = item.sub
                call: Coroutine[Any, Any, None] = (
                    self._call_blocking(sub, item.event, ctx) if sub.blocking
                    else sub.handler(item.event, ctx))  # type: ignore[assignment]  # an async def (see Subscription.build)
                if span is None:
                    try:
                        waiting = call.send(None)  # most handlers finish here, waiting on nothing
                    except StopIteration:
                        pass
                    else:
                        await _Run(call, phase, waiting)
                else:
                    with tracing.activate(span):
                        await _Run(call, phase)
                if current is not None:
                    del current[slot]
                # A loop, not a comprehension: on Python 3.11 each comprehension is a function call.
                out = []
                for index, (emitted, emitted_key) in enumerate(ctx.emitted):
                    out.append(wire.encode(
                        emitted,
                        event_id=derive_event_id(env.event_id, item.sub.name, index),
                        correlation_id=env.correlation_id,
                        causation_id=env.event_id,
                        key=emitted_key,
                        occurred_at=self._batch_time,
                    ))
                item.out = out
                if span is not None:
                    item.spans = tracing.producer_spans(
                        item.out, span, [self._send_attributes(r, env) for r in item.out] if span.is_recording()
                        else [])
                    span.end()
                if metrics is not None:
                    metrics.handled(item.sub.name, env.event_type, "ok", time.perf_counter() - started)
            except Exception as exc:  # the handler's failure is the event's, not the service's
                if current is not None:
                    current.pop(slot, None)
                item.error = exc
                if breaker is not None:
                    # A handler that chose to dead-letter (or has a bug) reached its dependency fine.
                    breaker.success() if isinstance(exc, (DeadLetterNow, EmitError)) else breaker.failure()
                key = (_tp(item.record), item.record.offset, item.sub.name)
                prior = item.retry
                attempts, since = self._attempts.get(key) or (
                    (prior.attempts, prior.first_failure) if prior is not None else (0, ""))
                attempts += 1
                self._attempts[key] = (attempts, since or utc_now_iso())
                policy = item.sub.retry or self.retry
                self.stats.failed += 1
                gives_up = policy.gives_up(exc, attempts)
                if metrics is not None:
                    metrics.handled(item.sub.name, env.event_type, "dead_lettered" if gives_up else "failed",
                                    time.perf_counter() - started)
                    metrics.counted(item.sub.name, env.event_type, "failed")
                if gives_up:
                    item.outcome = _DEAD  # dead-lettered by _process; the partition moves on
                    if span is not None:
                        origin = item.retry.origin[0] if item.retry is not None else item.record.topic
                        Tracing.failed(span, exc, dead_letter_topic=dead_letter_topic(origin))
                        span.end()
                    continue
                self.stats.retried += 1
                if metrics is not None:
                    metrics.counted(item.sub.name, env.event_type, "retried")
                if isinstance(exc, RetryLater) and exc.delay_s is not None:
                    item.delay = exc.delay_s
                else:
                    item.delay = policy.delay(attempts)
                long_wait = item.delay > policy.in_process_max_s and bool(self._retry_sources)
                self._log.warning(
                    "handler %s failed on %s [%d] offset %d (event %s), attempt %d of %d: %s: %s; next attempt "
                    "in %.2f s%s",
                    item.sub.name, item.record.topic, item.record.partition, item.record.offset,
                    env.event_id, attempts, policy.max_attempts, type(exc).__name__, exc, item.delay,
                    " through a retry topic" if long_wait else "",
                    exc_info=not isinstance(exc, (ChoreoError, RetryLater)),
                )
                if span is not None:
                    Tracing.failed(span, exc, retry_in_s=item.delay, via="retry topic" if long_wait else "in place")
                    span.end()
                if long_wait:
                    # The partition moves on; the key's later events wait behind this one.
                    item.outcome = _TO_RETRY
                    item.due_ms = self._batch_ms + int(item.delay * 1000)
                    if pk is not None:
                        held[pk] = item.due_ms
                    continue
                item.outcome = _FAILED
                return
            finally:
                leave_event(fields)
            if breaker is not None:
                breaker.success()
            item.outcome = _OK

    async def _call_blocking(self, sub: Subscription, event: Event, ctx: Context) -> None:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.settings.handler_threads, thread_name_prefix=f"{self.name}-handler")
        # A copy of this task's context, so the handler's logs and spans know their event.
        context = contextvars.copy_context()
        result = await asyncio.get_running_loop().run_in_executor(self._threads, context.run, sub.handler, event, ctx)
        if inspect.isawaitable(result):  # a callable object whose __call__ is async
            await result

    def _consumer_span(self, item: _Item) -> Any:
        assert self._tracing is not None
        rec, env = item.record, item.envelope

        def attributes() -> dict[str, Any]:  # only for a sampled event
            prior = self._attempts.get((_tp(rec), rec.offset, item.sub.name))
            attempts = prior[0] if prior is not None else item.retry.attempts if item.retry is not None else 0
            found = {
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": rec.topic,
                "messaging.destination.partition.id": str(rec.partition),
                "messaging.kafka.offset": rec.offset,
                "messaging.message.id": env.event_id,
                "messaging.consumer.group.name": self.group,
                "choreo.saga.id": env.correlation_id,
                "choreo.service": self.name,
                "choreo.step": item.sub.name,
                "choreo.event.type": env.event_type,
                "choreo.attempt": attempts + 1,
                "choreo.compensation": item.sub.compensation,
            }
            if rec.key is not None:
                found["messaging.kafka.message.key"] = rec.key.decode(errors="replace")
            return found

        replayed = any(k == "choreo-replayed-at" for k, _ in rec.headers)
        return self._tracing.consumer_span(rec, attributes, saga_id=env.correlation_id, event_id=env.event_id,
                                           replayed=replayed)

    def _send_attributes(self, record: OutgoingRecord, env: Envelope) -> dict[str, Any]:
        return {
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": record.topic,
            "messaging.message.id": last_header(record.headers, "choreo-event-id") or "",
            "choreo.saga.id": env.correlation_id,
            "choreo.service": self.name,
            "choreo.event.type": last_header(record.headers, "choreo-event-type") or "",
        }

    # -- pausing and rewinding -----------------------------------------------------------------------------

    def _pause(self, tp: TopicPartition, offset: int, delay: float | None) -> None:
        """Rewind ``tp`` to ``offset`` and fetch it again after ``delay`` seconds (None: a backoff
        that grows with the partition's consecutive failures)."""
        if delay is None:
            failures = self._failures.get(tp, 0) + 1
            self._failures[tp] = failures
            delay = min(self.settings.max_backoff_ms / 1000, 0.1 * 2 ** (failures - 1))
        transport = self._require_transport()
        transport.seek(tp, offset)
        transport.pause([tp])
        self._resume_at[tp] = time.monotonic() + delay

    async def _claim(self, run: list[_Item], store: IdempotencyStore,
                     parking: ParkingLot) -> tuple[list[ClaimResult], bool | IdempotencyError]:
        """The batch's claims, and whether any of its events' keys has a parking list, asked at the
        same time: nearly always none has, and then the gate's own round trip is skipped. A failed
        question is returned, not raised, so the caller can give back the claims it got."""
        if not run:
            return [], False
        claiming = store.claim([i.key for i in run], self._owner, self.settings.claim_lease_ms)
        lists = [i.park_key for i in run if i.park_key is not None]
        if not lists:
            return await claiming, False
        claims, parked = await asyncio.gather(claiming, parking.any_parked(lists), return_exceptions=True)
        if isinstance(claims, BaseException):
            raise claims
        if isinstance(parked, BaseException) and not isinstance(parked, IdempotencyError):
            raise parked
        return claims, parked

    async def _release(self, items: list[_Item], store: IdempotencyStore) -> None:
        await self._give_back([i.key for i in items], store)

    async def _give_back(self, keys: list[str], store: IdempotencyStore) -> None:
        if not keys:
            return
        try:
            await store.finish([], keys, self._owner, self.settings.done_ttl_ms)
        except IdempotencyError as exc:
            self._log.warning("releasing claims failed (they expire by themselves): %s", exc)

    def _require_transport(self) -> Transport:  # noqa: D401
        if self._transport is None:
            raise ConfigurationError(f"service {self.name} is not started")
        return self._transport

    def _require_store(self) -> IdempotencyStore:
        if self._store is None:
            raise ConfigurationError(f"service {self.name} is not started")
        return self._store


def _tp(record: Record) -> TopicPartition:
    return (record.topic, record.partition)


def _offset_of(item: _Item) -> int:
    return item.record.offset


def _chain_id(tp: TopicPartition, item: _Item, ordering: str) -> object:
    """Events with the same id run one after another (see ``Service._plan``)."""
    if ordering == "unordered":
        return id(item)
    if ordering == "key" and item.record.key is not None:
        return (tp, item.sub.name, item.record.key)
    return (tp, item.sub.name)


def _origin(record: Record, state: RetryState | None = None) -> Record:
    """The record as first consumed, for a record read from a retry topic."""
    if state is None:
        if original_topic(record.topic) == record.topic:
            return record
        # A retry record whose own headers are broken: its original topic is still in its name.
        return Record(original_topic(record.topic), record.partition, record.offset, record.key, record.value,
                      without_retry_headers(record.headers), record.timestamp_ms)
    topic, partition, offset = state.origin
    return Record(topic, partition, offset, record.key, record.value, without_retry_headers(record.headers),
                  record.timestamp_ms)


def _recheck_at(now_ms: int, head_due_ms: int) -> int:
    """When a parked event looks again whether it heads its key: just after the head is due, within
    the first retry tier's range so it does not hold up the records behind it there for long."""
    recheck_ms = int(_retry.PARK_RECHECK_S * 1000)
    if not head_due_ms:
        return now_ms + recheck_ms
    return max(now_ms + recheck_ms // 10, min(head_due_ms + recheck_ms // 10, now_ms + 10 * recheck_ms))


@dataclass(slots=True)
class _Tail:
    """The tail of a batch (see ``Service._finish``): what it makes durable once its records are
    acknowledged, read off its items when it was sent."""

    touched: set[TopicPartition]  # read again if the tail fails
    keys: dict[str, _Item]  # its done items by idempotency key: a copy in the next batch is skipped
    spans: list[Any]
    records: int
    done: list[str]
    claimed: list[str]  # given back if the records are not acknowledged
    released: set[str]
    heads: list[tuple[str, str]]
    commits: dict[TopicPartition, int]
    ended: list[TopicPartition]  # partitions whose failure backoff starts over
    finished: list[tuple[TopicPartition, int, str]]  # attempts to forget
    counts: dict[tuple[str, str, str], int]
    skipped: int
    emitted: int
    task: asyncio.Future[bool] | None = None


class _Phase:
    """The handler phase of one batch: the item each worker runs now, and whether the batch has
    gone on without its workers (so they start nothing more)."""

    __slots__ = ("current", "cutoff", "grown")

    def __init__(self) -> None:
        self.current: dict[int, _Item] = {}
        self.cutoff = False
        self.grown: asyncio.Future[None] | None = None  # set once a handler call waits on something

    def grow(self) -> None:
        grown = self.grown
        if grown is not None and not grown.done():
            grown.set_result(None)


_NOT_STARTED: Any = object()


class _Run:
    """Awaits a handler's coroutine, telling the batch's phase (if any) when it first waits on
    something. ``first`` is what the coroutine yielded if the caller started it itself (``send``);
    from there on this passes every yield, value and exception through, as ``await`` would."""

    __slots__ = ("_coro", "_phase", "_first")

    def __init__(self, coro: Coroutine[Any, Any, None], phase: _Phase | None, first: Any = _NOT_STARTED) -> None:
        self._coro, self._phase, self._first = coro, phase, first

    def __await__(self) -> Generator[Any, Any, None]:
        coro, value = self._coro, self._first
        if value is _NOT_STARTED:
            try:
                value = coro.send(None)
            except StopIteration:
                return
        if self._phase is not None:
            self._phase.grow()
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = coro.send(sent)
                except StopIteration:
                    return


class _BreakerOpen(Exception):
    """Stands for the failure of an event whose handler's circuit breaker is open."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(f"circuit breaker open, probing in {retry_in:.1f} s")
        self.retry_in = retry_in
