"""Publishing events from outside handlers: a web endpoint starting a saga, a script, the shell."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from choreo.errors import ConfigurationError
from choreo.events import Event
from choreo.settings import Settings
from choreo.tracing import Tracing
from choreo.transport import TopicSpec, Transport
from choreo.wire import Wire, new_event_id

T = TypeVar("T")


class Publisher:
    """Publishes domain events; ``publish`` returns once the broker has acknowledged the event.

    A published event starts a new saga unless ``correlation_id`` is given: its correlation id is
    then its own event id, and it is also the Kafka key. Use as ``async with Publisher("web") as p``.
    """

    def __init__(self, name: str, *, settings: Settings | None = None, transport: Transport | None = None,
                 tracing: Tracing | None = None) -> None:
        self.name = name
        self._settings = settings
        self._transport = transport
        self._tracing = tracing
        self._wire: Wire | None = None
        self._ready_topics: set[str] = set()
        self._registered: set[type[Event]] = set()

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    async def start(self) -> None:
        if self._transport is None:
            from choreo.transport.kafka import KafkaTransport

            self._transport = KafkaTransport(self.settings, client_id=self.name)
        await self._transport.connect()
        if self._tracing is None:
            self._tracing = Tracing.from_env(self.name)
        self._wire = Wire(self.name, topic_prefix=self.settings.topic_prefix, lookup=self._transport.lookup_schema)

    async def publish(
        self,
        event: Event,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        event_id: str | None = None,
        key: str | None = None,
    ) -> str:
        """Publish ``event`` and wait for the broker's ack; returns its event id.

        Pass ``event_id`` to make a retried call idempotent downstream (the same id is skipped).
        Raises ``PublishError`` if the broker does not acknowledge it.
        """
        return (await self.publish_many([event], correlation_id=correlation_id, causation_id=causation_id,
                                         event_ids=[event_id] if event_id else None, key=key))[0]

    async def publish_many(
        self,
        events: Sequence[Event],
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        event_ids: Sequence[str] | None = None,
        key: str | None = None,
        correlation_ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Publish several events in one round of acks.

        Each starts its own saga (its correlation id is its event id) unless ``correlation_id`` puts
        them all in one saga, or ``correlation_ids`` gives each its own saga id (e.g. the order id).
        """
        transport = await self._ensure_started()
        for name, values in (("event_ids", event_ids), ("correlation_ids", correlation_ids)):
            if values is not None and len(values) != len(events):
                raise ConfigurationError(f"publish_many: {name} must have one entry per event")
        if correlation_id is not None and correlation_ids is not None:
            raise ConfigurationError("publish_many: give correlation_id or correlation_ids, not both")
        ids = list(event_ids) if event_ids is not None else [new_event_id() for _ in events]
        sagas = list(correlation_ids) if correlation_ids is not None else [correlation_id or i for i in ids]
        assert self._wire is not None
        await self._ensure_topics(transport, {self.settings.topic_prefix + type(e).topic() for e in events})
        await self._register(transport, {type(e) for e in events})
        records = [
            self._wire.encode(e, event_id=i, correlation_id=saga, causation_id=causation_id, key=key)
            for e, i, saga in zip(events, ids, sagas)
        ]
        tracing = self._tracing
        if tracing is None or not tracing.enabled:
            await transport.send(records)
            return ids
        # Each publish opens its saga's trace (or continues the caller's current one).
        spans = tracing.producer_spans(records, None, [
            {"messaging.system": "kafka", "messaging.operation.type": "send", "messaging.operation.name": "send",
             "messaging.destination.name": r.topic, "messaging.message.id": i, "choreo.saga.id": saga,
             "choreo.service": self.name, "choreo.event.type": type(e).event_type()}
            for r, e, i, saga in zip(records, events, ids, sagas)
        ])
        try:
            await transport.send(records)
        except BaseException as exc:
            Tracing.end_all(spans, exc)
            raise
        Tracing.end_all(spans)
        return ids

    async def _ensure_started(self) -> Transport:
        if self._wire is None:
            await self.start()
        assert self._transport is not None
        return self._transport

    async def _ensure_topics(self, transport: Transport, topics: set[str]) -> None:
        missing = topics - self._ready_topics
        if missing:
            s = self.settings
            await transport.ensure_topics(
                [TopicSpec(t, s.topic_partitions, s.topic_replication) for t in sorted(missing)], create=s.create_topics
            )
            self._ready_topics |= missing

    async def _register(self, transport: Transport, types: set[type[Event]]) -> None:
        # Every schema is on the schema topic before the first event written with it.
        for cls in sorted(types - self._registered, key=lambda t: t.event_type()):
            await transport.register_schema(cls.avro_schema())
            self._registered.add(cls)

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()
        if self._tracing is not None:
            await self._tracing.close()

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class BlockingPublisher:
    """``Publisher`` for synchronous code: runs one in a private event-loop thread."""

    def __init__(self, name: str, *, settings: Settings | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{name}-publisher", daemon=True)
        self._thread.start()
        self._publisher = Publisher(name, settings=settings)
        self._call(self._publisher.start())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def publish(self, event: Event, **kwargs: Any) -> str:
        """See ``Publisher.publish``; blocks until the broker acknowledges the event."""
        return self._call(self._publisher.publish(event, **kwargs))

    def publish_many(self, events: Sequence[Event], **kwargs: Any) -> list[str]:
        return self._call(self._publisher.publish_many(events, **kwargs))

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._publisher.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def __enter__(self) -> BlockingPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
