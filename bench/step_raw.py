"""The raw confluent-kafka loops of ``bench.step``: ``raw-limit`` (hand-tuned) and ``raw-naive``.

    python -m bench.step_raw raw-limit --kafka HOST:PORT --redis URL --input TOPIC --output TOPIC \\
        --group GROUP --redis-prefix PREFIX [--events N] [--report FILE]

Both consume the input topic in a consumer group, claim each event's idempotency key in Redis with
``SET key 1 NX PX`` (an event whose key is already set is skipped), produce one output record per
event (the input's key, value and headers plus ``choreo-causation-id`` naming the input event: no
Avro work, which is what makes them the limit) and commit. They use choreo's client settings
(``choreo/transport/kafka.py`` with the default ``Settings``), so fetch waits and lingering are alike.

* ``raw-limit``: batches of up to 500, one pipelined Redis round trip per batch, produce every record,
  ``flush()`` (the batch's acks), then an asynchronous commit.
* ``raw-naive``: ``poll()`` one message, one Redis call, produce and ``flush()``, synchronous commit.

With ``--events N`` the loop stops after N events and writes a JSON report (first event received and
last ack on the monotonic clock, which is system-wide on Linux, CPU seconds at both, counts); with
``--events 0`` it runs until SIGTERM. Nothing from choreo is imported: this is the hand-written side.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

# Header values of a consumed record are bytes (or None); Any keeps the list acceptable to produce().
Headers = list[tuple[str, Any]]

EVENT_ID = "choreo-event-id"
CAUSATION_ID = "choreo-causation-id"
BATCH = 500
POLL_TIMEOUT_S = 0.1
LEASE_MS = 30_000

# choreo's defaults (Settings and KafkaTransport), so both sides fetch and linger alike.
CONSUMER_CONFIG: dict[str, Any] = {
    "auto.offset.reset": "earliest",
    "session.timeout.ms": 6_000,
    "heartbeat.interval.ms": 500,
    "fetch.wait.max.ms": 10,
    "queued.max.messages.kbytes": 16_384,
    "enable.partition.eof": False,
    "enable.auto.commit": False,
}
PRODUCER_CONFIG: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "message.timeout.ms": 30_000,
}


def clock() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def cpu_seconds() -> float:
    """User + system CPU of this process, every thread included (librdkafka's too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def consume(consumer: Consumer, max_records: int, timeout: float) -> list[Message]:
    """Up to ``max_records`` messages, returning as soon as any are there.

    ``consume(n, timeout)`` waits for all ``n`` or the whole timeout, which at a low rate adds the
    timeout to every hop; choreo's transport waits like this, and so does any tuned loop.
    """
    messages = consumer.consume(max_records, 0)
    if messages:
        return messages
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(max_records - 1, 0)]


def write_report(path: str | None, report: "Report") -> None:
    """The JSON report bench.step reads (none without ``--report``)."""
    if path:
        with open(path, "w") as f:
            json.dump(asdict(report), f)


@dataclass
class Report:
    variant: str
    consumed: int = 0
    produced: int = 0
    skipped: int = 0
    delivery_errors: int = 0
    first_received: float | None = None
    last_ack: float | None = None
    cpu_first: float | None = None
    cpu_last: float | None = None


class _Acks:
    """The delivery callback: counts failures; successes need no Python work beyond the call."""

    __slots__ = ("errors", "first_error")

    def __init__(self) -> None:
        self.errors = 0
        self.first_error: str | None = None

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors += 1
            self.first_error = self.first_error or err.str()


def _event_id(message: Message, headers: Headers) -> bytes:
    for name, value in headers:
        if name == EVENT_ID:
            return bytes(value)
    raise ValueError(f"{message.topic()} [{message.partition()}] @{message.offset()}: no {EVENT_ID} header")


def _check(message: Message) -> bool:
    err = message.error()
    if err is None:
        return True
    if err.fatal():
        raise KafkaException(err)
    print(f"consumer error: {err.str()}", file=sys.stderr, flush=True)
    return False


def run_limit(consumer: Consumer, producer: Producer, r: redis.Redis, output: str, prefix: bytes, events: int,
              stopping: threading.Event) -> Report:
    report = Report("raw-limit")
    produce = producer.produce
    while not stopping.is_set() and not (events and report.consumed >= events):
        messages = consume(consumer, BATCH, POLL_TIMEOUT_S)
        if not messages:
            continue
        if report.first_received is None:
            report.first_received, report.cpu_first = clock(), cpu_seconds()
        pipe = r.pipeline(transaction=False)
        batch: list[tuple[Message, Headers, bytes]] = []
        for m in messages:
            if not _check(m):
                continue
            headers: Headers = m.headers() or []  # type: ignore[assignment]  # a list when consumed
            event_id = _event_id(m, headers)
            pipe.set(prefix + event_id, b"1", nx=True, px=LEASE_MS)
            batch.append((m, headers, event_id))
        for (m, headers, event_id), claimed in zip(batch, pipe.execute()):
            if not claimed:
                report.skipped += 1
                continue
            headers.append((CAUSATION_ID, event_id))
            produce(output, m.value(), m.key(), headers=headers)
            report.produced += 1
        producer.poll(0)
        producer.flush()
        report.last_ack = clock()
        # Every record of the batch is acknowledged (or failed, counted): its offsets may go.
        consumer.commit(asynchronous=True)
        report.consumed += len(batch)
    report.cpu_last = cpu_seconds()
    return report


def run_naive(consumer: Consumer, producer: Producer, r: redis.Redis, output: str, prefix: bytes, events: int,
              stopping: threading.Event) -> Report:
    report = Report("raw-naive")
    while not stopping.is_set() and not (events and report.consumed >= events):
        m = consumer.poll(POLL_TIMEOUT_S)
        if m is None or not _check(m):
            continue
        if report.first_received is None:
            report.first_received, report.cpu_first = clock(), cpu_seconds()
        headers: Headers = m.headers() or []  # type: ignore[assignment]  # a list when consumed
        event_id = _event_id(m, headers)
        if r.set(prefix + event_id, b"1", nx=True, px=LEASE_MS):
            headers.append((CAUSATION_ID, event_id))
            producer.produce(output, m.value(), m.key(), headers=headers)
            producer.flush()
            report.last_ack = clock()
            report.produced += 1
        else:
            report.skipped += 1
        consumer.commit(message=m, asynchronous=False)
        report.consumed += 1
    report.cpu_last = cpu_seconds()
    return report


LOOPS = {"raw-limit": run_limit, "raw-naive": run_naive}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("variant", choices=sorted(LOOPS))
    parser.add_argument("--kafka", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--redis-prefix", required=True)
    parser.add_argument("--events", type=int, default=0, help="stop after this many events (0: at SIGTERM)")
    parser.add_argument("--report", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    acks = _Acks()
    common = {"bootstrap.servers": args.kafka, "client.id": args.variant}
    producer = Producer({**common, **PRODUCER_CONFIG, "on_delivery": acks})
    consumer = Consumer({**common, **CONSUMER_CONFIG, "group.id": args.group})
    r = redis.Redis.from_url(args.redis)
    consumer.subscribe([args.input])
    try:
        report = LOOPS[args.variant](consumer, producer, r, args.output, args.redis_prefix.encode(), args.events,
                                     stopping)
    finally:
        producer.flush(30)
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                raise
        consumer.close()
        r.close()
    report.delivery_errors = acks.errors
    if acks.first_error:
        print(f"delivery failed for {acks.errors} records, first: {acks.first_error}", file=sys.stderr, flush=True)
    write_report(args.report, report)
    return 1 if acks.errors else 0


if __name__ == "__main__":
    sys.exit(main())
