"""The FastStream variants of ``bench.step``: ``faststream-confluent`` and ``faststream-aiokafka``.

    python -m bench.step_faststream confluent --kafka HOST:PORT --redis URL --input TOPIC --output TOPIC \\
        --group GROUP --redis-prefix PREFIX [--events N] [--report FILE]

The same step as ``bench/step_raw.py``'s loops, written as a FastStream user writes it: a ``KafkaBroker``
(``faststream.confluent`` over confluent-kafka, ``faststream.kafka`` over aiokafka) in a ``FastStream``
app, one ``@broker.subscriber`` in a consumer group, and a handler that takes the message (bytes body,
headers, key), claims the event's idempotency key with ``SET key 1 NX PX`` over ``redis.asyncio``
(skipping an event whose key is already set) and awaits ``broker.publish`` of the input's value, key
and headers plus ``choreo-causation-id`` naming the input event. No Avro work, as in the raw loops:
the work is raw-naive's, one message at a time, and the difference is what the framework costs.

FastStream 0.7.8's defaults, all kept:

* Offsets: the default ack policy is ``AckPolicy.ACK_FIRST``, which FastStream implements on both
  backends as the client's own auto commit (``enable_auto_commit=True``, every 5 s): a message counts as
  done once it is handed out, before the handler runs (at most once on a crash). Stopping commits the
  last positions (confluent: a synchronous ``commit()`` before ``close()``; aiokafka: ``stop()``).
* Fetch wait: ``fetch_max_wait_ms=500`` on both (``fetch.wait.max.ms`` for librdkafka; raw and choreo
  use 10). Tansu holds a fetch while there is nothing new, for up to that wait, so an event that
  arrives meanwhile waits for it: the latency run shows that cost (at 20 events/s one hop took p50
  ~140 ms, p99 ~270 ms on both backends, against ~11 and ~28 ms for raw-naive).
* Consuming one message: confluent, ``Consumer.poll(0.1)`` run in a one-thread executor per message;
  aiokafka, ``AIOKafkaConsumer.getone()`` from its background fetcher.
* Publishing: ``await broker.publish(...)`` waits for the broker's ack on both (``no_confirm=False``):
  confluent, ``produce()`` plus a future that the delivery callback resolves (a background task calls
  ``Producer.poll(0.1)`` over and over in an anyio worker thread); aiokafka, the future of ``send()``.
  ``linger_ms=0`` and ``enable_idempotence=False`` on both; ``acks`` is ``all`` on confluent and
  aiokafka's own default ``1`` on aiokafka. FastStream adds a ``correlation_id`` header (a fresh uuid4)
  and an empty ``content-type`` header to every record; header values go out as UTF-8 text (choreo's
  headers are text).
* Handler arguments: FastStream decodes every body before the call (no content type: it tries JSON,
  which an Avro value fails at once) and validates the ``bytes`` parameter. ``msg: KafkaMessage`` (the
  only way to the headers and key) is a FastDepends ``Context`` field, whose synchronous ``use`` the
  installed fast-depends (3.0.9) runs through ``anyio.to_thread``: a worker-thread round trip per message.
* Logging: the broker's per-message lines ("Received", "Processed") go at DEBUG (``log_level=``),
  which its INFO logger drops, because the choreo variants run under ``choreo run --log-level
  WARNING``; at the default they are two INFO lines per message.
* Group timing: ``session_timeout_ms=10000, heartbeat_interval_ms=3000`` (FastStream's names on both
  backends; librdkafka gets them as ``session.timeout.ms``/``heartbeat.interval.ms``). On Tansu the
  process gets its first event ~5.7 s after it starts, against ~3.7 s at choreo's 6,000/500 ms; the
  join is outside the clock, so these stay at their defaults too.

No deviation from the defaults beyond the subscription itself (topic, ``group_id`` and
``auto_offset_reset="earliest"``: the input is preloaded before the app starts, and FastStream's default
``latest`` would skip it all) and the level of the per-message log lines above.

With ``--events N`` the app stops after N events and writes the JSON report of ``bench/step_raw.py``
(first event received at the handler's first call and last ack after the N-th publish returned, on
the same monotonic clock; CPU seconds at both from ``getrusage``; counts); with ``--events 0`` it runs
until SIGTERM or SIGINT (FastStream's own handlers). Nothing from choreo is imported.
"""

# No ``from __future__ import annotations``: FastDepends reads the handler's annotations when it is
# decorated, and the backend's ``KafkaMessage`` is a local of ``_app``.

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from operator import attrgetter, methodcaller
from typing import Any

import redis.asyncio as aioredis
from faststream import FastStream

from bench.step_raw import CAUSATION_ID, EVENT_ID, LEASE_MS, Report, clock, cpu_seconds, write_report

BACKENDS = ("confluent", "aiokafka")


def _app(args: argparse.Namespace) -> tuple[FastStream, Report, aioredis.Redis]:
    # Only the chosen backend is imported. ``msg.raw_message`` is the client's own record, and the key is
    # the one thing read from it: a method of confluent_kafka.Message, an attribute of aiokafka's.
    key_of: Callable[[Any], bytes | None]
    if args.backend == "confluent":
        from faststream.confluent import KafkaBroker
        from faststream.confluent.annotations import KafkaMessage

        key_of = methodcaller("key")
    else:
        from faststream.kafka import KafkaBroker  # type: ignore[assignment]
        from faststream.kafka.annotations import KafkaMessage  # type: ignore[assignment]

        key_of = attrgetter("key")

    # Its per-message lines at DEBUG, below its logger's INFO: quiet, as choreo runs at WARNING.
    broker = KafkaBroker(args.kafka, log_level=logging.DEBUG)
    app = FastStream(broker)
    r = aioredis.Redis.from_url(args.redis)
    report = Report(f"faststream-{args.backend}")
    events, prefix, output = args.events, args.redis_prefix, args.output

    @broker.subscriber(args.input, group_id=args.group, auto_offset_reset="earliest")
    async def step(body: bytes, msg: KafkaMessage) -> None:
        if report.first_received is None:
            report.first_received, report.cpu_first = clock(), cpu_seconds()
        try:
            event_id = msg.headers[EVENT_ID]
            if await r.set(prefix + event_id, 1, nx=True, px=LEASE_MS):
                try:
                    await broker.publish(body, topic=output, key=key_of(msg.raw_message),
                                         headers={**msg.headers, CAUSATION_ID: event_id})
                except Exception:
                    report.delivery_errors += 1
                    raise
                report.last_ack = clock()
                report.produced += 1
            else:
                report.skipped += 1
        finally:
            # A failed event counts too (FastStream logs it and moves on): the run must still end.
            report.consumed += 1
            if events and report.consumed == events:
                report.cpu_last = cpu_seconds()
                app.exit()

    return app, report, r


async def _run(args: argparse.Namespace) -> Report:
    app, report, r = _app(args)
    try:
        await app.run()
    finally:
        await r.aclose()
    if report.cpu_last is None:
        report.cpu_last = cpu_seconds()  # stopped by a signal: the count ends with the run
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("backend", choices=BACKENDS)
    parser.add_argument("--kafka", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--redis-prefix", required=True)
    parser.add_argument("--events", type=int, default=0, help="stop after this many events (0: at SIGTERM)")
    parser.add_argument("--report", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)

    report = asyncio.run(_run(args))
    if report.delivery_errors:
        print(f"publish failed for {report.delivery_errors} records", file=sys.stderr, flush=True)
    write_report(args.report, report)
    return 1 if report.delivery_errors else 0


if __name__ == "__main__":
    sys.exit(main())
