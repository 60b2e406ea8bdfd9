"""Memory of one service draining a large backlog to the end: peak RSS, VmHWM, RSS along the way.

    make bench-backlog          # or: .venv/bin/python -m bench.backlog --events 1000000 --delay-ms 10

A fresh 4-partition topic is preloaded with ``--events`` small events over ``--keys`` record keys
(record key = correlation id = the key, ``seq`` counting up per key). The first ``--keys`` go through
``Publisher``, which creates the topic and registers the schema; the rest are encoded by choreo's own
``Wire`` and written by one raw producer with the settings' client config (hence the same records and
partitioner as ``Publisher``'s), so a million take seconds rather than minutes.

Then ONE service (``choreo run bench.backlog:service``) drains it in a subprocess. Its handler only
sleeps ``--delay-ms`` (0: not at all), so what is measured is choreo's own per-event cost (the Redis
claim and done, the commits), not a handler's. Progress is the sum of the consumer group's committed
offsets, polled every 0.5 s (the topic is fresh and written without transactions, so offsets count
records from 0); the child's VmRSS is read from ``/proc`` every 0.2 s until the committed offsets cover
every event. The million-event integration test samples only the first 20 s; this runs to the end.
Drain time counts from the child's start, so it includes the process start and the group join; the
rate counts from the first committed offset seen to the last, so it does not.

The embedded dev stack is started unless ``CHOREO_KAFKA`` and ``CHOREO_REDIS`` are both set; on such
a broker and Redis the run's topics, consumer group and Redis keys are deleted at the end. Other
``CHOREO_*`` variables reach the service (e.g. ``CHOREO_FETCH_BUFFER_KB`` to try another prefetch
budget) and are printed. Exit status 1 if the backlog was not drained within ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from bench.common import total_memory
from choreo import Context, Event, Publisher, Service, Settings
from choreo.schemas import parse_schema
from choreo.wire import Wire, new_event_id

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / "bench" / "out"
SERVICE_TARGET = "bench.backlog:service"
PRODUCER_NAME = "bench"
PARTITIONS = 4
DEFAULT_EVENTS = 1_000_000
DEFAULT_KEYS = 10_000
DEFAULT_CONCURRENCY = 64
DEFAULT_TIMEOUT_S = 900.0
RSS_EVERY_S = 0.2
OFFSETS_EVERY_S = 0.5
OFFSETS_TIMEOUT_S = 5.0
MARKS = (0.1, 0.5, 0.9)  # the summary's RSS-at-progress points
PROGRESS_LINES = 10  # a progress line per this many equal steps, so a long run shows it is alive
HEAD_CHUNK = 5_000
STOP_TIMEOUT_S = 60.0
# Variables the bench sets for the service itself; any other CHOREO_* is the caller's tuning.
_SET_FOR_SERVICE = frozenset({"CHOREO_KAFKA", "CHOREO_REDIS", "CHOREO_TOPIC_PREFIX", "CHOREO_REDIS_PREFIX",
                              "CHOREO_TOPIC_PARTITIONS", "CHOREO_CONCURRENCY"})


class BacklogStep(Event, schema=parse_schema({
    "type": "record", "name": "BacklogStep", "namespace": "bench", "version": 1,
    "fields": [{"name": "key", "type": "string"}, {"name": "seq", "type": "int"}],
})):
    key: str
    seq: int


# -- the service the child process runs ------------------------------------------------------------

# Read at import, in the child from the environment the parent gives it. Settings come from the
# environment only when the service starts, so the parent imports this module without connecting.
HANDLER_DELAY_S = float(os.environ.get("BACKLOG_DELAY_MS", "0")) / 1000.0
service = Service("backlog")


@service.on(BacklogStep)
async def handle(event: BacklogStep, ctx: Context) -> None:
    if HANDLER_DELAY_S > 0:
        await asyncio.sleep(HANDLER_DELAY_S)


# -- preloading --------------------------------------------------------------------------------------

def step(i: int, keys: int) -> BacklogStep:
    """Event ``i``: key ``i % keys`` and seq ``i // keys``, so each key's seqs count up in publish order."""
    return BacklogStep(key=f"k{i % keys:05d}", seq=i // keys)


async def _publish_head(settings: Settings, count: int, keys: int) -> None:
    async with Publisher(PRODUCER_NAME, settings=settings) as publisher:
        for start in range(0, count, HEAD_CHUNK):
            part = [step(i, keys) for i in range(start, min(start + HEAD_CHUNK, count))]
            await publisher.publish_many(part, correlation_ids=[s.key for s in part])


def _produce_rest(settings: Settings, first: int, count: int, keys: int) -> dict[int, int]:
    """Write events ``first`` .. ``first + count - 1``; returns each partition's end offset as delivered."""
    wire = Wire(PRODUCER_NAME, [BacklogStep], topic_prefix=settings.topic_prefix)
    # Idempotence keeps each partition in produce order through retries, so seqs stay ordered per key.
    producer = Producer({
        "bootstrap.servers": settings.kafka_bootstrap, **settings.kafka_config,
        "enable.idempotence": True, "acks": "all", "linger.ms": 20, "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 500_000, "message.timeout.ms": 60_000,
    })
    errors: list[KafkaError] = []
    ends: dict[int, int] = {}

    def delivered(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
            return
        partition, offset = msg.partition(), msg.offset()
        if partition is not None and offset is not None:
            ends[partition] = max(ends.get(partition, 0), offset + 1)

    for i in range(first, first + count):
        s = step(i, keys)
        r = wire.encode(s, event_id=new_event_id(), correlation_id=s.key, causation_id=None)
        headers: list[tuple[str, str | bytes | None]] = list(r.headers)
        while True:
            try:
                producer.produce(r.topic, r.value, r.key, headers=headers, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)  # the local queue is full: let deliveries drain
        if i % 10_000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if left or errors:
        raise RuntimeError(f"preload failed: {left} undelivered, errors: {errors[:3]}")
    return ends


def preload(settings: Settings, events: int, keys: int) -> dict[int, int]:
    """Write the backlog; returns the end offsets the raw producer's deliveries saw (empty if it wrote none).

    They are only printed, as a check. The broker's own would do, but Tansu's ListOffsets answers a high
    watermark far short of the end once batches hold many records (it looks like the last batch's base
    offset + 1).
    """
    head = min(keys, events)
    asyncio.run(_publish_head(settings, head, keys))
    return _produce_rest(settings, head, events - head, keys) if events > head else {}


# -- watching the child ------------------------------------------------------------------------------

class GroupOffsets:
    """The group's committed offsets, through one AdminClient for the whole run (the futures of one
    that has been collected never complete)."""

    def __init__(self, settings: Settings, group: str, topic: str) -> None:
        self.admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, **settings.kafka_config})
        self.group = group
        self.partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]

    def committed(self) -> dict[int, int] | None:
        """Committed offset by partition (absent: none yet), or None when the broker did not answer."""
        request = [ConsumerGroupTopicPartitions(self.group, self.partitions)]
        try:
            future = self.admin.list_consumer_group_offsets(request, request_timeout=OFFSETS_TIMEOUT_S)[self.group]
            answer = future.result(OFFSETS_TIMEOUT_S + 1)
        except (KafkaException, concurrent.futures.TimeoutError):
            return None  # e.g. the group's coordinator is not known yet: ask again next time
        return {tp.partition: tp.offset for tp in answer.topic_partitions or []
                if tp.error is None and tp.offset >= 0}


def vm_kb(pid: int, name: str) -> int | None:
    """A ``/proc/<pid>/status`` memory figure (``VmRSS``, ``VmHWM``) in kB; None once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return None  # a zombie has a status file but no memory lines


@dataclass
class Drain:
    total: int
    progress: int = 0
    elapsed_s: float = 0.0
    first_commit: tuple[float, int] | None = None  # seconds after the child's start, events committed
    drained: bool = False
    child_exit: int | None = None  # set when the child stopped on its own
    peak_rss_kb: int = 0
    hwm_kb: int | None = None
    rss_at: dict[float, int] = field(default_factory=dict)  # progress fraction -> VmRSS kB
    committed: dict[int, int] = field(default_factory=dict)  # partition -> committed offset
    samples: int = 0

    @property
    def events_per_s(self) -> float | None:
        """Events committed per second between the first committed offset seen and the last."""
        if self.first_commit is None:
            return None
        t0, done0 = self.first_commit
        return (self.progress - done0) / (self.elapsed_s - t0) if self.elapsed_s > t0 else None


def watch(child: subprocess.Popen[bytes], offsets: GroupOffsets, total: int, timeout_s: float,
          started: float) -> Drain:
    """Sample the child's memory and the group's progress until every event is committed."""
    drain = Drain(total=total)
    lines_due = [k / PROGRESS_LINES for k in range(1, PROGRESS_LINES + 1)]
    rss_kb = 0
    next_offsets = started
    next_rss = time.monotonic()
    while True:
        now = time.monotonic()
        drain.elapsed_s = now - started
        if (code := child.poll()) is not None:
            drain.child_exit = code
            return drain
        sampled = vm_kb(child.pid, "VmRSS")
        if sampled is not None:
            rss_kb = sampled
            drain.peak_rss_kb = max(drain.peak_rss_kb, rss_kb)
            drain.samples += 1
        if now >= next_offsets:
            next_offsets = now + OFFSETS_EVERY_S
            committed = offsets.committed()
            if committed is not None:
                # A fresh topic written without transactions has dense offsets from 0: offset = records.
                drain.committed = committed
                drain.progress = sum(committed.values())
            if drain.progress and drain.first_commit is None:
                drain.first_commit = (drain.elapsed_s, drain.progress)
            fraction = drain.progress / drain.total
            for mark in MARKS:
                if fraction >= mark and mark not in drain.rss_at:
                    drain.rss_at[mark] = rss_kb
            while lines_due and fraction >= lines_due[0]:
                print(f"  {lines_due.pop(0):4.0%} committed after {drain.elapsed_s:6.1f} s, "
                      f"VmRSS {rss_kb / 1024:6.1f} MB", flush=True)
            if drain.progress >= drain.total:
                drain.drained = True
                drain.hwm_kb = vm_kb(child.pid, "VmHWM")
                return drain
        if drain.elapsed_s > timeout_s:
            drain.hwm_kb = vm_kb(child.pid, "VmHWM")
            return drain
        next_rss += RSS_EVERY_S
        time.sleep(max(0.0, next_rss - time.monotonic()))


def stop(child: subprocess.Popen[bytes]) -> tuple[int | None, float]:
    """SIGTERM the child and wait: its exit status (None if it had to be killed) and how long it took."""
    stopping = time.monotonic()
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        code: int | None = child.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        code = None
    return code, time.monotonic() - stopping


# -- the run -----------------------------------------------------------------------------------------

@contextmanager
def _broker() -> Iterator[tuple[dict[str, str], str]]:
    """Connection settings to override the environment's (none when it has them), and their description."""
    if os.environ.get("CHOREO_KAFKA") and os.environ.get("CHOREO_REDIS"):
        yield {}, f"from the environment: {os.environ['CHOREO_KAFKA']}, {os.environ['CHOREO_REDIS']}"
        return
    from choreo.devstack import start_dev_stack

    with start_dev_stack() as stack:
        yield {"kafka_bootstrap": stack.kafka_bootstrap, "redis_url": stack.redis_url}, \
            "embedded dev stack (Tansu + Redis)"


def _cleanup(settings: Settings, offsets: GroupOffsets) -> None:
    """Drop what the run left on a broker and Redis that outlive it: topics, group, claim keys."""
    import redis

    admin = offsets.admin
    topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(settings.topic_prefix)]
    for future in [*admin.delete_topics(topics, operation_timeout=30).values(),
                   *admin.delete_consumer_groups([offsets.group], request_timeout=30).values()]:
        try:
            future.result(60)
        except KafkaException as exc:
            print(f"cleanup: {exc}", file=sys.stderr)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{settings.redis_prefix}*", count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


def machine_lines(argv: Sequence[str], broker: str) -> list[str]:
    memory = total_memory()
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    try:
        # The figures depend on which service.py ran: name the commit and whether the tree was dirty.
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                check=False, cwd=ROOT).stdout.strip() or "?"
    except OSError:
        commit = "?"
    python = os.path.relpath(sys.executable)
    return [
        f"command: {shlex.join([sys.executable if python.startswith('..') else python, '-m', 'bench.backlog', *argv])}",
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"machine: {os.cpu_count()} cores, {memory} memory, load average {load} at start, "
        f"Python {sys.version.split()[0]}, commit {commit}",
        f"broker: {broker}",
    ]


def _mb(kb: int | None) -> str:
    return "?" if kb is None else f"{kb / 1024:.1f} MB"


def print_summary(drain: Drain, stopped: tuple[int | None, float] | None) -> None:
    committed = f"committed offsets {[drain.committed.get(p, 0) for p in range(PARTITIONS)]}"
    if drain.drained:
        first = f"first commit seen after {drain.first_commit[0]:.1f} s" if drain.first_commit else "no commit seen"
        print(f"drained: {drain.total} events in {drain.elapsed_s:.1f} s from the service's start ({first}; "
              f"{committed})")
        rate = drain.events_per_s
        print(f"rate: {'n/a' if rate is None else f'{rate:.0f}'} events/s from the first commit seen to the last, "
              f"{drain.total / drain.elapsed_s:.0f} events/s including the start")
    else:
        print(f"NOT drained: {drain.progress} of {drain.total} events committed after {drain.elapsed_s:.1f} s "
              f"({committed})")
    print(f"peak VmRSS: {_mb(drain.peak_rss_kb)} ({drain.samples} samples, every {RSS_EVERY_S} s), "
          f"VmHWM: {_mb(drain.hwm_kb)}")
    print("VmRSS at " + ", ".join(f"{m:.0%}: {_mb(drain.rss_at.get(m))}" for m in MARKS) + " committed")
    if stopped is not None:
        code, seconds = stopped
        print(f"stopped on SIGTERM in {seconds:.1f} s, "
              + ("killed: no exit" if code is None else f"exit status {code}"))


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    run_id = uuid.uuid4().hex[:8]
    with _broker() as (connection, broker):
        settings = Settings.from_env(None, **connection, topic_prefix=f"bb{run_id}.", redis_prefix=f"bb{run_id}:",
                                     topic_partitions=PARTITIONS)
        for line in machine_lines(argv, broker):
            print(line)
        # Returning drops the run's Kafka clients before the dev stack stops, so they do not log its going.
        return measure(settings, args, run_id, own_stack=bool(connection))


def measure(settings: Settings, args: argparse.Namespace, run_id: str, *, own_stack: bool) -> int:
    tuning = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("CHOREO_") and k not in _SET_FOR_SERVICE)
    print(f"events: {args.events} over {min(args.keys, args.events)} keys, {PARTITIONS} partitions; "
          f"one service, concurrency {args.concurrency}, handler delay {args.delay_ms:g} ms"
          + (f"; service env also has {' '.join(tuning)}" if tuning else ""), flush=True)

    started = time.monotonic()
    ends = preload(settings, args.events, args.keys)
    print(f"preloaded in {time.monotonic() - started:.1f} s (end offsets as delivered: "
          f"{[ends.get(p, '?') for p in range(PARTITIONS)]})", flush=True)
    offsets = GroupOffsets(settings, settings.topic_prefix + service.name, settings.topic_prefix + BacklogStep.topic())

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"backlog-{run_id}.log"
    env = dict(os.environ, CHOREO_KAFKA=settings.kafka_bootstrap, CHOREO_REDIS=settings.redis_url,
               CHOREO_TOPIC_PREFIX=settings.topic_prefix, CHOREO_REDIS_PREFIX=settings.redis_prefix,
               CHOREO_TOPIC_PARTITIONS=str(PARTITIONS), CHOREO_CONCURRENCY=str(args.concurrency),
               BACKLOG_DELAY_MS=str(args.delay_ms), PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "choreo.cli", "--log-level", "WARNING", "run", SERVICE_TARGET],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            drain = watch(child, offsets, args.events, args.timeout, time.monotonic())
        finally:
            stopped = stop(child) if child.poll() is None else None
    print_summary(drain, stopped)
    if drain.child_exit is not None:
        print(f"the service exited with status {drain.child_exit}; its log ({log_path}) ends:", file=sys.stderr)
        print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
    elif not drain.drained:
        print(f"service log: {log_path}", file=sys.stderr)
    if not own_stack:  # the dev stack takes everything with it when it stops
        _cleanup(settings, offsets)
    return 0 if drain.drained else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS)
    parser.add_argument("--keys", type=int, default=DEFAULT_KEYS, help="distinct record keys")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="the service's Settings.concurrency (CHOREO_CONCURRENCY)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="what the handler sleeps per event")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds the service gets to drain the backlog")
    args = parser.parse_args(argv)
    if args.events < 1 or args.keys < 1 or args.concurrency < 1 or args.delay_ms < 0 or args.timeout <= 0:
        parser.error("--events, --keys, --concurrency and --timeout must be positive, --delay-ms not negative")
    return run(args, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
