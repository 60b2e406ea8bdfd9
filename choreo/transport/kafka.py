"""Kafka adapter on confluent-kafka (librdkafka).

Offsets use librdkafka's "store, then auto-commit" mode: ``enable.auto.offset.store=false`` means only
offsets that choreo stored (after a record's outcome is durable) are ever committed, and librdkafka
commits them periodically, on revocation and on close. The producer is idempotent with ``acks=all``;
a background thread serves its delivery callbacks so an ``await send(...)`` never blocks the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

try:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition as _TP
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("choreo's Kafka transport needs 'confluent-kafka': pip install choreo") from exc

from choreo.errors import ChoreoError, ConfigurationError, PublishError, TransportError
from choreo.settings import Settings
from choreo.schemas import AvroSchema, parse_schema
from choreo.transport import SCHEMA_TOPIC, OutgoingRecord, RebalanceListener, Record, TopicPartition, TopicSpec

log = logging.getLogger("choreo.kafka")


class _Acks:
    """Counts delivery reports of one ``send`` call and wakes the awaiting coroutine once, at the end.

    Reports come from the flushing thread, and rarely from the loop's (a full local queue), so the
    count is an ``itertools.count``, whose ``next`` is atomic: no lock per record. An error is
    appended before its report is counted, so the report counted last sees every error."""

    __slots__ = ("_counted", "_count", "_errors", "_future", "_loop", "_on_stuck")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, on_stuck: Callable[[], None]) -> None:
        self._counted = itertools.count(1)
        self._count = count
        self._errors: list[str] = []
        self._loop = loop
        self._future: asyncio.Future[None] = loop.create_future()
        self._on_stuck = on_stuck

    def __call__(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err.str()}")
            if err.fatal() or err.code() == KafkaError._MSG_TIMED_OUT:
                self._on_stuck()
        if next(self._counted) == self._count:
            self._loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if self._future.done():
            return
        if self._errors:
            more = f" (and {len(self._errors) - 1} more)" if len(self._errors) > 1 else ""
            self._future.set_exception(PublishError(f"broker did not acknowledge: {self._errors[0]}{more}"))
        else:
            self._future.set_result(None)


class KafkaTransport:
    """``Transport`` over one confluent-kafka producer and (once subscribed) one consumer."""

    def __init__(self, settings: Settings, *, client_id: str = "choreo") -> None:
        self._settings = settings
        self._client_id = client_id
        self._connected = False
        common: dict[str, Any] = {
            "bootstrap.servers": settings.kafka_bootstrap,
            "client.id": client_id,
            "error_cb": self._on_error,
            # librdkafka's own log lines go through Python logging instead of straight to stderr.
            "logger": self._librdkafka_logger(client_id),
            **settings.kafka_config,
        }
        self._common = common
        self._producer_config = {
            **common,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": settings.linger_ms,
            # An idempotent producer whose broker lost its producer state may never deliver again
            # (see STACK.md): bound the wait, so the send fails and the producer is replaced.
            "message.timeout.ms": settings.kafka_config.get("message.timeout.ms", 30_000),
        }
        self._producer = Producer(self._producer_config)
        self._producer_stuck = False
        self._consumer: Consumer | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{client_id}-fetch")
        self._waiting: Future[list[Any]] | None = None
        self._stop_polling = threading.Event()
        self._kick = threading.Event()
        self._poller = threading.Thread(target=self._poll_producer, name=f"{client_id}-acks", daemon=True)
        self._poller.start()
        self._admin: AdminClient | None = None
        self._on_assign: RebalanceListener | None = None
        self._on_revoke: RebalanceListener | None = None
        self._closed = False
        self._registered: set[int] = set()
        self._cooperative = "cooperative" in str(settings.kafka_config.get("partition.assignment.strategy", ""))
        self._schemas: dict[int, AvroSchema] = {}
        self._schema_misses: dict[int, float] = {}
        self._last_schema_read = 0.0

    # -- connection and topics -------------------------------------------------------------------

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient({k: v for k, v in self._common.items()})
        return self._admin

    async def connect(self, timeout: float = 10.0) -> None:
        admin = self._admin_client()
        try:
            await asyncio.to_thread(admin.list_topics, timeout=timeout)
        except KafkaException as exc:
            raise TransportError(
                f"cannot reach Kafka at {self._settings.kafka_bootstrap}: {exc.args[0].str() if exc.args else exc}"
            ) from None
        self._connected = True

    async def list_topics(self) -> dict[str, int]:
        meta = await asyncio.to_thread(self._admin_client().list_topics, timeout=10)
        return {name: len(t.partitions) for name, t in meta.topics.items() if not t.error}

    async def ensure_topics(self, specs: Sequence[TopicSpec], *, create: bool) -> None:
        existing = await self.list_topics()
        missing = [s for s in specs if s.name not in existing]
        if not missing:
            return
        if not create:
            names = ", ".join(s.name for s in missing)
            raise ConfigurationError(
                f"topics missing on {self._settings.kafka_bootstrap}: {names} "
                "(create them, or allow creation with create_topics=True / CHOREO_CREATE_TOPICS=true)"
            )
        futures = self._admin_client().create_topics(
            [NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication) for s in missing],
            operation_timeout=30,
        )
        for name, future in futures.items():
            try:
                await asyncio.wrap_future(future)
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise TransportError(f"creating topic {name} failed: {error.str()}") from None
        # Metadata propagates asynchronously in Kafka; wait until every new topic is visible.
        for _ in range(100):
            existing = await self.list_topics()
            if all(s.name in existing for s in missing):
                return
            await asyncio.sleep(0.1)
        raise TransportError(f"created topics did not appear: {[s.name for s in missing]}")

    # -- consuming ----------------------------------------------------------------------------------

    async def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        *,
        on_assign: RebalanceListener | None = None,
        on_revoke: RebalanceListener | None = None,
    ) -> None:
        s = self._settings
        self._on_assign, self._on_revoke = on_assign, on_revoke
        self._consumer = Consumer(
            {
                **self._common,
                "group.id": group,
                "enable.auto.commit": True,
                "enable.auto.offset.store": False,
                "auto.commit.interval.ms": s.commit_interval_ms,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": s.session_timeout_ms,
                "heartbeat.interval.ms": s.heartbeat_interval_ms,
                "fetch.wait.max.ms": s.fetch_wait_ms,
                "enable.partition.eof": False,
                # Prefetching stops at this many kilobytes, so a backlog of millions costs no memory.
                "queued.max.messages.kbytes": s.fetch_buffer_kb,
            }
        )
        self._consumer.subscribe(
            list(topics), on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
        )

    def _assigned(self, consumer: Consumer, partitions: list[_TP]) -> None:
        # librdkafka remembers a partition's pause flag across revoke and assign; a partition handed
        # (back) to us must start delivering from its committed offset, as the Transport contract says.
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if partitions:
            consumer.resume(partitions)
        if self._on_assign:
            self._on_assign([(p.topic, p.partition) for p in partitions])

    def _revoked(self, consumer: Consumer, partitions: list[_TP]) -> None:
        if self._on_revoke:
            self._on_revoke([(p.topic, p.partition) for p in partitions])
        # Stored offsets are committed by librdkafka's auto-commit on revoke; commit them now too,
        # so a partition is never handed over with finished work uncommitted.
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("commit on revoke failed: %s", exc.args[0].str())

    def _lost(self, consumer: Consumer, partitions: list[_TP]) -> None:
        # Partitions lost (session expired) may already belong to another member: commit nothing.
        if self._on_revoke:
            self._on_revoke([(p.topic, p.partition) for p in partitions])

    async def fetch(self, max_records: int, timeout: float) -> list[Record]:
        consumer = self._require_consumer()
        # What librdkafka has already fetched is taken here, without the hop to the fetch thread and
        # back (half a millisecond per batch on bench/step.py); only a fetch that must wait goes
        # there, so the loop never blocks. Not while a wait of a cancelled fetch still runs there:
        # one thread consumes at a time.
        messages: list[Any] = (consumer.consume(max_records, 0)
                               if self._waiting is None or self._waiting.done() else [])
        if not messages:
            self._waiting = self._executor.submit(_consume, consumer, max_records, timeout)
            messages = await asyncio.wrap_future(self._waiting)
        records: list[Record] = []
        append = records.append
        for m in messages:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise TransportError(f"fatal consumer error: {err.str()}")
                log.warning("consumer error on %s [%s]: %s", m.topic(), m.partition(), err.str())
                continue
            append(Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                          m.headers() or [], m.timestamp()[1]))
        return records

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        consumer = self._require_consumer()
        try:
            consumer.store_offsets(offsets=[_TP(t, p, o) for (t, p), o in offsets.items()])
        except KafkaException as exc:
            # A partition revoked in the meantime cannot store offsets; its new owner re-runs the
            # records, and idempotency keys make that harmless.
            log.info("storing offsets failed (partition revoked?): %s", exc.args[0].str())

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._require_consumer().seek(_TP(partition[0], partition[1], offset))

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        tps = [_TP(t, p) for t, p in partitions]
        if tps:
            self._require_consumer().pause(tps)

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        tps = [_TP(t, p) for t, p in partitions]
        if tps:
            self._require_consumer().resume(tps)

    def assignment(self) -> list[TopicPartition]:
        if self._consumer is None:
            return []
        return [(p.topic, p.partition) for p in self._consumer.assignment()]

    def lag(self) -> dict[TopicPartition, int]:
        if self._consumer is None:
            return {}
        out: dict[TopicPartition, int] = {}
        try:
            positions = self._consumer.position(self._consumer.assignment())
        except KafkaException:
            return out
        for tp in positions:
            try:
                # The watermark the last fetch response carried: no request to the broker.
                low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if high >= 0:
                out[(tp.topic, tp.partition)] = max(0, high - (tp.offset if tp.offset >= 0 else max(low, 0)))
        return out

    def _require_consumer(self) -> Consumer:
        if self._consumer is None:
            raise TransportError("the transport is not subscribed")
        return self._consumer

    # -- schema topic -------------------------------------------------------------------------------

    @property
    def _schema_topic(self) -> str:
        return self._settings.topic_prefix + SCHEMA_TOPIC

    async def register_schema(self, schema: AvroSchema) -> None:
        if schema.fingerprint in self._registered:
            return
        # One partition keeps the registry a single ordered log; creation is idempotent.
        await self.ensure_topics([TopicSpec(self._schema_topic, 1, self._settings.topic_replication)], create=True)
        record = OutgoingRecord(
            self._schema_topic, f"{schema.fingerprint:016x}".encode(), json.dumps(schema.raw).encode()
        )
        await self.send([record])
        self._registered.add(schema.fingerprint)
        self._schemas[schema.fingerprint] = schema

    def lookup_schema(self, fingerprint: int) -> AvroSchema | None:
        if fingerprint in self._schemas:
            return self._schemas[fingerprint]
        # An unknown fingerprint stays unknown for a while, and the set of them is bounded: a flood of
        # garbage must neither re-read the topic per record nor grow memory.
        if time.monotonic() - self._schema_misses.get(fingerprint, -1e9) < 5.0:
            return None
        self._read_schema_topic()
        if fingerprint not in self._schemas:
            if len(self._schema_misses) >= 10_000:
                self._schema_misses.clear()
            self._schema_misses[fingerprint] = time.monotonic()
        return self._schemas.get(fingerprint)

    def _read_schema_topic(self, timeout: float = 10.0) -> None:
        # Reads are spaced at least 0.2 s apart: a flood of records with distinct unknown fingerprints
        # slows down instead of re-reading the topic back to back.
        wait = self._last_schema_read + 0.2 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            records = self.read_all_blocking(self._schema_topic, timeout)
        finally:
            self._last_schema_read = time.monotonic()
        for record in records:
            try:
                schema = parse_schema((record.value or b"").decode())
            except (ChoreoError, UnicodeDecodeError) as exc:
                log.warning("skipping a bad record in %s at offset %s: %s", self._schema_topic, record.offset, exc)
                continue
            self._schemas[schema.fingerprint] = schema

    async def read_all(self, topic: str, timeout: float = 30.0) -> list[Record]:
        """Every record of ``topic`` (all partitions, from the beginning), without joining a group."""
        return await asyncio.to_thread(self.read_all_blocking, topic, timeout)

    def read_all_blocking(self, topic: str, timeout: float = 30.0) -> list[Record]:
        meta = self._admin_client().list_topics(topic, timeout=10)
        info = meta.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            return []
        reader = Consumer({
            **self._common,
            "group.id": f"{self._client_id}-reader",  # required by the client; never joined or committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        })
        records: list[Record] = []
        pending = set(info.partitions)
        try:
            reader.assign([_TP(topic, p, OFFSET_BEGINNING) for p in sorted(pending)])
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                msg = reader.poll(0.2)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(msg.partition())
                    elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        break
                    else:
                        log.warning("reading %s: %s", topic, err.str())
                    continue
                headers: Any = msg.headers() or []  # a list of (str, bytes | None) on consumed messages
                records.append(Record(msg.topic(), msg.partition(), msg.offset(),  # type: ignore[arg-type]
                                      msg.key(), msg.value(), headers, msg.timestamp()[1]))
        finally:
            reader.close()
        if pending:
            raise TransportError(f"reading {topic} timed out after {timeout:.0f} s (partitions {sorted(pending)})")
        return records

    async def delete_records(self, topic: str, before: dict[int, int]) -> None:
        """Delete the records of ``topic`` below ``before[partition]`` (Kafka's DeleteRecords)."""
        admin = self._admin_client()
        futures = admin.delete_records([_TP(topic, p, o) for p, o in sorted(before.items())])
        try:
            for future in futures.values():
                await asyncio.wrap_future(future)
        except KafkaException as exc:
            raise TransportError(f"deleting records of {topic} failed: {exc.args[0].str()}") from None

    # -- producing ----------------------------------------------------------------------------------

    def send(self, records: Sequence[OutgoingRecord]) -> asyncio.Future[None]:
        if self._closed:
            raise TransportError("cannot send: the transport is closed")
        if self._producer_stuck:
            self._replace_producer()
        loop = asyncio.get_running_loop()
        acks = _Acks(loop, len(records), self._stuck)
        if not records:
            acks._future.set_result(None)
            return acks._future
        produce = self._producer.produce
        for r in records:
            while True:
                try:
                    produce(r.topic, r.value, r.key, headers=r.headers, on_delivery=acks)  # type: ignore[arg-type]
                    break
                except BufferError:
                    self._producer.poll(0.01)  # local queue full: let deliveries drain
                except KafkaException as exc:
                    acks(exc.args[0], _Named(r.topic))
                    break
        self._kick.set()
        return acks._future

    def _stuck(self) -> None:
        self._producer_stuck = True

    def _replace_producer(self) -> None:
        """A fresh idempotent producer (new producer id) after a fatal error or timed-out deliveries.

        Every record of the old one has failed (or is about to), so its batch is re-sent by the caller;
        re-sent events keep their ids, and idempotency keys make the copies harmless."""
        log.warning("replacing the Kafka producer after a fatal error or timed-out deliveries")
        self._producer_stuck = False
        old, self._producer = self._producer, Producer(self._producer_config)
        old.purge()  # fail what is still queued or in flight: those sends raise PublishError
        old.poll(0)  # deliver those failures (the poller thread serves only the new producer)

    def _poll_producer(self) -> None:
        # A send hands over whole batches, and its caller waits for their acks: flushing sends
        # them at once instead of after linger.ms (librdkafka ignores linger while a flush runs),
        # yet as full batches, since every record of the send is queued before the kick.
        # linger.ms still gathers the records of sends made while a flush is under way.
        while not self._stop_polling.is_set():
            if self._kick.wait(0.05):
                self._kick.clear()
                self._producer.flush(0.1)  # bounded, so close() is not held up; serves the acks too
            else:
                self._producer.poll(0)

    def _librdkafka_logger(self, client_id: str) -> logging.Logger:
        logger = logging.getLogger(f"choreo.librdkafka.{client_id}")
        # Until the broker has answered once, connection failures are summed up by connect()'s one
        # error naming the address; librdkafka would otherwise log every reconnect attempt.
        logger.addFilter(lambda record: self._connected or record.levelno >= logging.CRITICAL)
        return logger

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            log.error("fatal Kafka error: %s", error.str())
            self._producer_stuck = True
        elif self._connected:
            log.warning("Kafka: %s", error.str())
        else:
            log.debug("Kafka (not connected yet): %s", error.str())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await asyncio.get_running_loop().run_in_executor(self._executor, consumer.close)
        await asyncio.to_thread(self._producer.flush, 10)
        self._stop_polling.set()
        await asyncio.to_thread(self._poller.join)
        self._executor.shutdown(wait=False)
        # Dropping the last references destroys the librdkafka handles and closes their connections.
        self._admin = None
        del self._producer


def _consume(consumer: Consumer, max_records: int, timeout: float) -> list[Any]:
    """Up to ``max_records`` messages, returning as soon as any are there.

    ``Consumer.consume(n, timeout)`` waits for all ``n`` or the whole timeout, which would add the
    timeout to every hop's latency at low rates; waiting with ``poll`` for the first message does not.
    """
    messages = consumer.consume(max_records, 0)
    if messages:
        return messages
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(max_records - 1, 0)] if max_records > 1 else [first]


class _Named:
    """Stands in for a Message in a delivery report for a record that never reached the queue."""

    def __init__(self, topic: str) -> None:
        self._topic = topic

    def topic(self) -> str:
        return self._topic
