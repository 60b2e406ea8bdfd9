"""Service: a named consumer group whose handlers react to events and emit new ones.

The path of one batch (see DESIGN.md)::

    fetch batch -> decode (Avro by fingerprint) -> claim every idempotency key (one Redis call)
      -> run handlers (in order per partition, partitions concurrently)
      -> publish emitted events and wait for the broker's acks
      -> mark keys done / release failed claims (one Redis call)
      -> store offsets (committed asynchronously, periodically and on revoke/close)

An offset is stored only once its record's outcome is durable, so a crash at any point re-delivers
the record; the idempotency key then skips what already happened, and emitted event ids are derived
from the input id, so a re-emitted event is a duplicate that downstream services skip in turn.

Failures: a record that cannot be decoded stops its partition at that offset (logged with topic,
partition, offset and reason) until dead-letter topics take over; a handler that raises is retried
with exponential backoff while its partition waits, so per-partition order is never broken.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from choreo.context import Context
from choreo.errors import ChoreoError, ConfigurationError, DecodeError, IdempotencyError, TransportError
from choreo.events import Envelope, Event, utc_now_iso
from choreo.idempotency import ClaimResult, IdempotencyStore, idempotency_key
from choreo.routing import Handler, Subscription
from choreo.saga import STOPPED_STATUSES
from choreo.settings import Settings
from choreo.transport import OutgoingRecord, Record, TopicPartition, TopicSpec, Transport
from choreo.wire import Wire, derive_event_id

log = logging.getLogger("choreo.service")

H = TypeVar("H", bound=Handler)

_OK, _SKIPPED, _FAILED, _BUSY, _NOT_RUN = range(5)


@dataclass(slots=True)
class _Item:
    record: Record
    envelope: Envelope
    event: Event
    sub: Subscription
    key: str
    claim: ClaimResult = ClaimResult.BUSY
    outcome: int = _NOT_RUN
    out: list[OutgoingRecord] = field(default_factory=list)
    copy_of: _Item | None = None  # an earlier item of this batch with the same idempotency key
    stopped_saga: str | None = None  # the status of a saga whose forward steps no longer run


@dataclass(slots=True)
class ServiceStats:
    """Counters since start. ``halted`` keeps every partition stopped by a bad record, and why."""

    processed: int = 0
    skipped_duplicates: int = 0
    failed: int = 0
    emitted: int = 0
    batches: int = 0
    halted: dict[TopicPartition, str] = field(default_factory=dict)


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
    ) -> None:
        if not name or not all(c.isalnum() or c in "_-." for c in name):
            raise ConfigurationError(f"service name {name!r} must be non-empty letters, digits, '_', '-', '.'")
        self.name = name
        self._group = group or name
        self._settings = settings
        self._transport = transport
        self._store = idempotency
        self._subs: list[Subscription] = []
        self._by_type: dict[type[Event], list[Subscription]] = {}
        self._by_topic: dict[str, tuple[type[Event], list[Subscription]]] = {}
        self._wire: Wire | None = None
        self._owner = f"{name}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop_requested = False
        self._halted: dict[TopicPartition, str] = {}
        self._halted_at: dict[TopicPartition, int] = {}
        self._resume_at: dict[TopicPartition, float] = {}
        self._failures: dict[TopicPartition, int] = {}
        self.stats = ServiceStats()
        self._log = logging.getLogger(f"choreo.service.{name}")
        self._started = False
        self._batch_time = ""
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._skip_ended_sagas = skip_ended_sagas
        self._saga_statuses: Any = None

    # -- declaration --------------------------------------------------------------------------------

    def on(
        self,
        event_type: type[Event],
        *,
        emits: Sequence[type[Event]] = (),
        name: str | None = None,
        compensable: bool = True,
    ) -> Callable[[H], H]:
        """Register the decorated ``async def handler(event, ctx)`` for ``event_type``: a forward step.

        ``emits`` lists every event type the handler may emit; emitting another raises ``EmitError``.
        The handler's ``name`` (default: the function name) is part of its idempotency keys.
        ``compensable=False`` declares that the step needs no compensation when a later step fails
        (the flow-graph check otherwise asks for one).
        """

        def register(fn: H) -> H:
            self.add(Subscription.build(event_type, fn, emits=emits, name=name, compensable=compensable))
            return fn

        return register

    def compensate(
        self,
        event_type: type[Event],
        *,
        undoes: str | Callable[..., Any] | None = None,
        emits: Sequence[type[Event]] = (),
        name: str | None = None,
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
            self.add(Subscription.build(event_type, fn, emits=emits, name=name, compensation=True, undoes=target))
            return fn

        return register

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

            self._store = RedisIdempotencyStore(settings.redis_url)
        await self._store.ping()
        if self._skip_ended_sagas and self._saga_statuses is None:
            from choreo.stores.redis import RedisSagaStore

            self._saga_statuses = RedisSagaStore(settings.redis_url, prefix=settings.redis_prefix)
        await self._transport.connect()
        for hook in self._on_start:
            await hook()
        specs = [
            TopicSpec(t, settings.topic_partitions, settings.topic_replication)
            for t in sorted({*self.consumed_topics(), *self.emitted_topics()})
        ]
        await self._transport.ensure_topics(specs, create=settings.create_topics)
        types = {s.event_type for s in self._subs} | {t for s in self._subs for t in s.emits}
        self._wire = Wire(self.name, types, topic_prefix=settings.topic_prefix,
                          lookup=self._transport.lookup_schema)
        for emitted in sorted({t for s in self._subs for t in s.emits}, key=lambda t: t.event_type()):
            await self._transport.register_schema(emitted.avro_schema())
        self._by_topic = {settings.topic_prefix + t.topic(): (t, subs) for t, subs in self._by_type.items()}
        await self._transport.subscribe(
            self.consumed_topics(), self.group, on_assign=self._assigned, on_revoke=self._revoked
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

    async def poll_once(self, timeout: float = 0.1) -> int:
        """Fetch one batch and process it completely; returns the number of records fetched."""
        transport = self._require_transport()
        self._resume_due()
        records = await transport.fetch(self.settings.batch_size, timeout)
        if records:
            await self._process(records)
        return len(records)

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()
        if self._store is not None:
            await self._store.close()
        if self._saga_statuses is not None:
            await self._saga_statuses.close()
        for hook in self._on_stop:
            await hook()
        self._log.info("service %s stopped", self.name)

    # -- rebalance ---------------------------------------------------------------------------------------

    def _assigned(self, partitions: Sequence[TopicPartition]) -> None:
        # A fresh assignment starts unpaused at the committed offset: forget local pauses.
        for tp in partitions:
            self._halted.pop(tp, None)
            self._halted_at.pop(tp, None)
            self._resume_at.pop(tp, None)
            self._failures.pop(tp, None)
        self._log.info("assigned %s", sorted(partitions))

    def _revoked(self, partitions: Sequence[TopicPartition]) -> None:
        for tp in partitions:
            self._halted.pop(tp, None)
            self._halted_at.pop(tp, None)
            self._resume_at.pop(tp, None)
        self._log.info("revoked %s", sorted(partitions))

    def _resume_due(self) -> None:
        if not self._resume_at:
            return
        now = time.monotonic()
        due = [tp for tp, at in self._resume_at.items() if at <= now]
        for tp in due:
            del self._resume_at[tp]
        if due:
            self._require_transport().resume(due)

    # -- the batch pipeline ----------------------------------------------------------------------------

    async def _process(self, records: list[Record]) -> None:
        transport = self._require_transport()
        store = self._require_store()
        wire = self._wire
        assert wire is not None
        settings = self.settings
        prefix = settings.redis_prefix
        self.stats.batches += 1
        # One timestamp per batch for every emitted event: isoformat per event is measurable, and a
        # batch is processed within milliseconds.
        self._batch_time = utc_now_iso()

        # Decode, grouped by partition in offset order. A record that cannot be decoded halts its
        # partition right there; the records after it are fetched again once it is dealt with.
        partitions: dict[TopicPartition, list[_Item]] = {}
        ends: dict[TopicPartition, int] = {}
        blocked: set[TopicPartition] = set()
        for record in records:
            tp = (record.topic, record.partition)
            if tp in blocked or tp in self._resume_at:
                continue
            halted_at = self._halted_at.get(tp)
            if halted_at is not None and record.offset >= halted_at:
                # Resumed for the retry of an earlier record: stop again at the undecodable one.
                transport.seek(tp, halted_at)
                transport.pause([tp])
                blocked.add(tp)
                continue
            route = self._by_topic.get(record.topic)
            if route is None:
                continue  # not ours (cannot happen with a subscription per topic)
            cls, subs = route
            try:
                envelope, event = wire.decode(record, cls)
            except DecodeError as exc:
                self._halt(tp, record, exc)
                blocked.add(tp)
                continue
            items = partitions.setdefault(tp, [])
            for sub in subs:
                key = idempotency_key(prefix, self.name, sub.name, envelope.correlation_id, envelope.event_id)
                items.append(_Item(record, envelope, event, sub, key))
            ends[tp] = record.offset
        if not partitions:
            return

        all_items = [item for items in partitions.values() for item in items]
        try:
            claims = await store.claim([i.key for i in all_items], self._owner, settings.claim_lease_ms)
        except IdempotencyError as exc:
            self._log.error("%s; pausing %d partitions", exc, len(partitions))
            self._rewind_all(partitions, transport)
            return
        claimed_here: dict[str, _Item] = {}
        for item, claim in zip(all_items, claims):
            if claim is ClaimResult.CLAIMED:
                first = claimed_here.get(item.key)
                if first is None:
                    claimed_here[item.key] = item
                else:
                    # A second copy of an event in this batch (the store grants our own claim again).
                    item.copy_of = first
                    claim = ClaimResult.BUSY
            item.claim = claim

        if self._saga_statuses is not None:
            await self._skip_stopped_sagas(all_items)

        await asyncio.gather(*(self._run_partition(items) for items in partitions.values()))

        outgoing = [r for item in all_items if item.outcome == _OK for r in item.out]
        try:
            await transport.send(outgoing)
        except TransportError as exc:
            self._log.error("publishing %d emitted events failed: %s; the batch will be retried", len(outgoing), exc)
            await self._release([i for i in all_items if i.claim is ClaimResult.CLAIMED], store)
            self._rewind_all(partitions, transport)
            return

        done = [i.key for i in all_items if i.outcome == _OK]
        released = [i.key for i in all_items if i.claim is ClaimResult.CLAIMED and i.outcome != _OK]
        try:
            await store.finish(done, released, self._owner, settings.done_ttl_ms)
        except IdempotencyError as exc:
            # The emitted events are out; the claims expire, and the re-run emits the same ids.
            self._log.error("%s; the batch will be retried", exc)
            self._rewind_all(partitions, transport)
            return

        commits: dict[TopicPartition, int] = {}
        for tp, items in partitions.items():
            stop_offset = None
            for item in items:
                if item.outcome in (_OK, _SKIPPED):
                    continue
                stop_offset = item.record.offset
                break
            if stop_offset is None:
                commits[tp] = ends[tp] + 1
                self._failures.pop(tp, None)
            else:
                if stop_offset > items[0].record.offset:
                    commits[tp] = stop_offset
                failed = next(i for i in items if i.record.offset == stop_offset and i.outcome != _OK)
                self._retry_later(tp, stop_offset, transport, busy=failed.outcome == _BUSY)
        transport.commit(commits)
        self.stats.processed += sum(1 for i in all_items if i.outcome == _OK)
        self.stats.skipped_duplicates += sum(1 for i in all_items if i.outcome == _SKIPPED)
        self.stats.emitted += len(outgoing)

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

    async def _run_partition(self, items: list[_Item]) -> None:
        wire = self._wire
        assert wire is not None
        for item in items:
            if item.claim is ClaimResult.DONE:
                item.outcome = _SKIPPED
                continue
            if item.claim is ClaimResult.BUSY:
                first = item.copy_of
                if first is not None and first.outcome == _OK and (first.record.topic, first.record.partition) == (
                    item.record.topic, item.record.partition):
                    # The copy's first delivery ran earlier in this partition: it is a duplicate.
                    item.outcome = _SKIPPED
                    continue
                # Held elsewhere (another process, or a copy on another partition): try again shortly.
                item.outcome = _BUSY
                return
            if item.stopped_saga is not None:
                item.outcome = _OK  # handled: done, committed, nothing emitted
                continue
            env = item.envelope
            ctx = Context(
                env,
                service=self.name,
                handler=item.sub.name,
                idempotency_key=item.key,
                allowed=item.sub.emits,
                logger=self._log,
            )
            try:
                await item.sub.handler(item.event, ctx)
                item.out = [
                    wire.encode(
                        event,
                        event_id=derive_event_id(env.event_id, item.sub.name, index),
                        correlation_id=env.correlation_id,
                        causation_id=env.event_id,
                        key=key,
                        occurred_at=self._batch_time,
                    )
                    for index, (event, key) in enumerate(ctx.emitted)
                ]
            except Exception as exc:  # the handler's failure is the event's, not the service's
                item.outcome = _FAILED
                self.stats.failed += 1
                self._log.error(
                    "handler %s failed on %s [%d] offset %d (event %s): %s: %s",
                    item.sub.name, item.record.topic, item.record.partition, item.record.offset,
                    env.event_id, type(exc).__name__, exc,
                    exc_info=not isinstance(exc, ChoreoError),
                )
                return
            item.outcome = _OK

    # -- pausing and rewinding -----------------------------------------------------------------------------

    def _halt(self, tp: TopicPartition, record: Record, exc: DecodeError) -> None:
        reason = f"{exc.reason}: {exc}"
        self._halted[tp] = self.stats.halted[tp] = f"offset {record.offset}: {reason}"
        self._halted_at[tp] = record.offset
        self._log.error(
            "cannot process %s [%d] offset %d: %s. Partition %s [%d] is stopped at this offset "
            "(nothing after it is processed) until the record is dealt with and the service restarted.",
            record.topic, record.partition, record.offset, reason, record.topic, record.partition,
        )
        transport = self._require_transport()
        transport.seek(tp, record.offset)
        transport.pause([tp])

    def _retry_later(self, tp: TopicPartition, offset: int, transport: Transport, *, busy: bool = False) -> None:
        if busy:
            delay = 0.2  # another process holds the claim; its lease or its finish frees it soon
        else:
            failures = self._failures.get(tp, 0) + 1
            self._failures[tp] = failures
            delay = min(self.settings.max_backoff_ms / 1000, 0.1 * 2 ** (failures - 1))
        transport.seek(tp, offset)
        transport.pause([tp])
        self._resume_at[tp] = time.monotonic() + delay

    def _rewind_all(self, partitions: dict[TopicPartition, list[_Item]], transport: Transport) -> None:
        for tp, items in partitions.items():
            self._retry_later(tp, items[0].record.offset, transport)

    async def _release(self, items: list[_Item], store: IdempotencyStore) -> None:
        try:
            await store.finish([], [i.key for i in items], self._owner, self.settings.done_ttl_ms)
        except IdempotencyError as exc:
            self._log.warning("releasing claims failed (they expire by themselves): %s", exc)

    def _require_transport(self) -> Transport:
        if self._transport is None:
            raise ConfigurationError(f"service {self.name} is not started")
        return self._transport

    def _require_store(self) -> IdempotencyStore:
        if self._store is None:
            raise ConfigurationError(f"service {self.name} is not started")
        return self._store
