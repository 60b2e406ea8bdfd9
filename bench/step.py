"""One saga step side by side (issue 7): choreo against hand-written confluent-kafka loops and FastStream.

    make bench-step             # = .venv/bin/python -m bench.step --rounds 3 --events 50000
    .venv/bin/python -m bench.step --events 2000 --rounds 1 --latency-seconds 2 --no-results   # a smoke run

Workload: a 4-partition input topic preloaded with ``--events`` events (key = saga id, one saga per
event, a ~200-byte Avro value), written by ``choreo.Publisher.publish_many`` in chunks of 5,000, so the
records are exactly what choreo writes (single-object Avro plus choreo headers). The variant consumes
each event, claims its idempotency key in Redis, emits one event to a 4-partition output topic and
commits. Each variant runs in its own process on fresh topics and a fresh Redis prefix per (variant,
round); rounds are interleaved and their order rotates, so a noisy neighbour hits every variant alike.

Variants:

* ``raw-limit``, ``raw-naive``: the confluent-kafka loops of ``bench/step_raw.py`` (batch + pipelined
  Redis + async commit per batch; one message, one Redis call and one synchronous commit at a time).
* ``choreo``: ``bench/step_app.py`` under ``choreo run``, default settings: Avro decode and encode,
  the claim/done protocol in Redis, derived event ids, headers, stored offsets.
* ``choreo-observed``: the same with tracing exported over OTLP/HTTP (to a sink in this process that
  drops it) and metrics served on a port.
* ``faststream-confluent``, ``faststream-aiokafka``: ``bench/step_faststream.py``, the same work as
  raw-naive (no Avro) written as a FastStream 0.7.8 app at its defaults, on its confluent-kafka and its
  aiokafka backend: one message per handler call, ``redis.asyncio``, an awaited ``broker.publish``,
  auto commit (ACK_FIRST). Its docstring lists those defaults.

The one-at-a-time variants (raw-naive and FastStream, 200-600 events/s on these 2 cores) handle the
first ``--slow-events`` (10,000) of the 50,000 preloaded and stop, so a round takes minutes, not a quarter
of an hour; their rate does not grow with the backlog (if anything a smaller one favours them: Tansu
reads a topic of one-record batches ever more slowly). The rest handle all 50,000.

Throughput = events / (end - start). Start: the first event received, as the raw loops report it; for
FastStream the handler's first call, which it reports the same way; for choreo the handler's first
call, which bench/step_app.py records (it follows the first batch's decode and Redis claim, a
millisecond or two after the receipt). End: the raw loops' last delivery report (the last ``flush()``),
FastStream's N-th ``publish`` returning (its ack); choreo's last ack cannot be seen from outside its
process, so its end is the moment this process's consumer of the output topic has seen an output for
every input: later than the ack by about one fetch (``fetch.wait.max.ms`` is 10 ms, which Tansu holds in
full). Each raw and FastStream run prints the same gap ("bench saw the last output N ms after the last
ack"), so its size is known; it counts against choreo. That consumer reads the output of every variant,
so all of them share the machine with it alike. The raw loops and FastStream exit by themselves after
``--events``; choreo is stopped with SIGTERM.

CPU s per 1,000 events: the variant process's user + system CPU (every thread) from start to end, per
1,000 events. Imports, the group join and the shutdown are excluded (raw and FastStream: ``getrusage``
at both ends; choreo: ``getrusage`` at the first call, ``/proc/<pid>/stat`` when the last output is
seen). Each run line also gives that CPU per second of the run ("N% of a core"): below 100% the process
was also waiting (broker, Redis, acks), not only computing.

One-hop latency, in every round after its throughput runs, in the same rotating order (p50 and p99 are
the medians over rounds of each run's): a fresh process on fresh topics; once it
answers (a probe every 0.2 s), this process publishes ``--latency-rate`` events/s for
``--latency-seconds`` with choreo's Publisher, noting the monotonic clock before each publish; latency =
the output's arrival at this process's consumer minus that (the publisher's linger, two broker hops and
two fetch waits included). p50 and p99 over all events. Tansu holds a fetch while nothing new is there,
for up to its fetch wait: 10 ms for raw, choreo and this consumer, but FastStream's default, 500 ms on
both backends, is most of its latency (the report says so under the table; at 20 events/s its one hop
was p50 ~140 ms, p99 ~270 ms against raw-naive's ~11/~28 ms at 200/s). At 200 events/s FastStream also
runs close to its own throughput on 2 shared cores, so some of its latency there is queueing.

Goals, printed last: choreo events/s >= 0.8 x raw-limit, choreo p99 <= 1.5 x raw-limit p99, and choreo
events/s >= 15 x the best FastStream backend (met or missed, with the ratio).

Correctness: each output names its input in ``choreo-causation-id``. After each run the output topic is
read to its end: lost = inputs without an output, duplicated = outputs beyond one per input, strays =
outputs for no input. Exit status 1 when a variant lost events. The ``step`` section of
``bench/results.json`` gets, per variant, events/s (median, min, max over rounds), p50 and p99 ms and CPU
s per 1,000 events (median); ``--no-results`` leaves the file alone (smoke runs), and so does
``--choreo-env CHOREO_X=V`` (a non-default setting for the choreo variants, to explore). ``--broker-from-env``
uses the broker of ``CHOREO_KAFKA`` and the Redis of ``CHOREO_REDIS``, starting the embedded dev stack
for what is not set (``make bench-step BROKER=kafka`` runs this under ``scripts/apache_kafka.py run``:
Apache Kafka and the dev stack's Redis); the figures then go to ``bench/results-kafka.json`` (see
``bench/common.py``), or to ``--results PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shlex
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from bench.common import EMBEDDED, broker, broker_kind, free_port, machine_lines, otlp_sink, results_path, write_meta
from bench.results import write_section
from bench.step_app import PAYLOAD_CHARS, StepDone, StepRequested
from bench.step_raw import CAUSATION_ID, clock, consume
from choreo import Publisher, Settings

VARIANTS = ("raw-limit", "raw-naive", "faststream-confluent", "faststream-aiokafka", "choreo", "choreo-observed")
RAW = ("raw-limit", "raw-naive")
FASTSTREAM = ("faststream-confluent", "faststream-aiokafka")
# Processes that stop by themselves after --events and report their own first receipt and last ack.
REPORTED = RAW + FASTSTREAM
# One message at a time: 200-600 events/s here, so they handle --slow-events of the backlog, not all of it.
ONE_AT_A_TIME = ("raw-naive", *FASTSTREAM)
BASELINE = "raw-limit"
TARGET = "choreo"
GOAL_RATIO = 0.8
GOAL_P99_RATIO = 1.5
GOAL_FASTSTREAM_RATIO = 15.0
NAME_WIDTH = max(map(len, VARIANTS))  # the variant column of every printed line
PARTITIONS = 4
PUBLISH_CHUNK = 5_000
SERVICE_GROUP = "step"  # bench/step_app.py's service name, hence its consumer group; the raw loops use it too
# Time allowed for a run beyond what the slowest plausible rate needs: FastStream, one message at a time,
# did 170-400 events/s on 2 shared cores; at 100/s, 50,000 events get 620 s.
RUN_TIMEOUT_BASE_S = 120.0
SLOWEST_RATE = 100.0
STOP_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 15.0  # without a new record
DRAIN_CAP_S = 300.0
REPO = Path(__file__).resolve().parent.parent
# librdkafka's informational lines (a client purging its queue at exit ...) go through logging, WARNING and up.
_LIBRDKAFKA_LOG = logging.getLogger("bench.step.librdkafka")
LOG_DIR = REPO / "bench" / "out"


# -- one run ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """Names of one (variant, round): fresh topics, consumer group and Redis prefix."""

    settings: Settings
    files: Path

    @property
    def tag(self) -> str:
        return self.settings.topic_prefix.rstrip(".")

    @property
    def input(self) -> str:
        return self.settings.topic_prefix + StepRequested.topic()

    @property
    def output(self) -> str:
        return self.settings.topic_prefix + StepDone.topic()

    @property
    def report(self) -> Path:
        return self.files / f"{self.tag}.json"

    @property
    def mark(self) -> Path:
        return self.files / f"{self.tag}.mark"


def _new_run(base: Settings, files: Path) -> _Run:
    tag = f"bs{uuid.uuid4().hex[:8]}"
    return _Run(Settings(kafka_bootstrap=base.kafka_bootstrap, redis_url=base.redis_url,
                         kafka_config=base.kafka_config, topic_prefix=f"{tag}.", redis_prefix=f"{tag}:",
                         topic_partitions=PARTITIONS, topic_replication=1), files)


def _create_topics(bootstrap: str, names: Sequence[str]) -> None:
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _LIBRDKAFKA_LOG}
    admin = AdminClient(config)  # kept in a name: its futures never resolve once it is collected
    futures = admin.create_topics([NewTopic(n, num_partitions=PARTITIONS, replication_factor=1) for n in names],
                                  operation_timeout=30)
    for name, future in futures.items():
        try:
            future.result(30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"creating topic {name} failed: {exc.args[0].str()}") from None


def _payload(seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choices(string.ascii_letters + string.digits, k=PAYLOAD_CHARS))


async def _preload(run: _Run, events: int, seed: int) -> set[bytes]:
    """Publish the input backlog the way choreo writes events; returns the input event ids."""
    sagas = [f"saga-{seed}-{i:06d}" for i in range(events)]
    payload = _payload(seed)
    batch = [StepRequested(saga_id=s, payload=payload) for s in sagas]
    ids: list[str] = []
    async with Publisher("bench", settings=run.settings) as publisher:
        for start in range(0, events, PUBLISH_CHUNK):
            ids += await publisher.publish_many(batch[start : start + PUBLISH_CHUNK],
                                                correlation_ids=sagas[start : start + PUBLISH_CHUNK])
    return {i.encode() for i in ids}


def _start(variant: str, run: _Run, events: int, observed_env: Mapping[str, str],
           choreo_env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    s = run.settings
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = open(LOG_DIR / f"step-{variant}.log", "w")
    # Nothing of this shell's CHOREO_*/OTEL_* may reach a variant: "default settings" means exactly that.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHOREO_", "OTEL_"))}
    if variant in REPORTED:
        module, name = (("bench.step_raw", variant) if variant in RAW
                        else ("bench.step_faststream", variant.removeprefix("faststream-")))
        argv = [sys.executable, "-m", module, name, "--kafka", s.kafka_bootstrap, "--redis", s.redis_url,
                "--input", run.input, "--output", run.output, "--group", s.topic_prefix + SERVICE_GROUP,
                "--redis-prefix", s.redis_prefix, "--events", str(events), "--report", str(run.report)]
    else:
        argv = [sys.executable, "-m", "choreo.cli", "--log-level", "WARNING", "run", "bench.step_app:service"]
        env |= {"CHOREO_KAFKA": s.kafka_bootstrap, "CHOREO_REDIS": s.redis_url, "CHOREO_TOPIC_PREFIX": s.topic_prefix,
                "CHOREO_REDIS_PREFIX": s.redis_prefix, "BENCH_STEP_MARK": str(run.mark)}
        if s.kafka_config:
            env["CHOREO_KAFKA_CONFIG"] = json.dumps(s.kafka_config)
        env |= choreo_env
        if variant == "choreo-observed":
            env |= {**observed_env, "CHOREO_METRICS_PORT": str(free_port())}
    with log:
        return subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes], *, exits_itself: bool = False) -> None:
    if exits_itself:
        # A raw loop or FastStream app given --events stops by itself; a SIGTERM during its interpreter's
        # shutdown (handlers reset to the default by then) would kill it mid-close.
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a live process (every thread), from ``/proc/<pid>/stat``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # After the command name, fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Observer:
    """Reads an output topic from its start (manual assignment: no group join) and notes, per input event
    id (the ``choreo-causation-id`` header), how many outputs answered it and when the first arrived."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"bench-observer-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False, "enable.partition.eof": True, "fetch.wait.max.ms": 10,
            "logger": _LIBRDKAFKA_LOG,
        })
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        self.counts: dict[bytes, int] = {}
        self.arrived: dict[bytes, float] = {}
        self.records = 0
        self.unnamed = 0
        self.last_new: float | None = None
        self._at_end: set[int] = set()

    def poll(self, timeout: float) -> None:
        messages = consume(self._consumer, 1_000, timeout)
        now = clock()
        for m in messages:
            err = m.error()
            partition: int = m.partition()  # type: ignore[assignment]  # set on every consumed message
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._at_end.add(partition)
                elif err.fatal():
                    raise KafkaException(err)
                continue
            self._at_end.discard(partition)
            self.records += 1
            cause: bytes | None = None
            headers: list[tuple[str, bytes]] = m.headers() or []  # type: ignore[assignment]  # a list when consumed
            for name, value in headers:
                if name == CAUSATION_ID:
                    cause = value
                    break
            if cause is None:
                self.unnamed += 1
                continue
            seen = self.counts.get(cause, 0)
            self.counts[cause] = seen + 1
            if not seen:
                self.arrived[cause] = now
                self.last_new = now

    def drain(self, idle: float, *, cap: float = DRAIN_CAP_S) -> None:
        """Read to the end of every partition; call once nothing writes to the topic any more. Gives up
        after ``idle`` seconds without a new record (or ``cap`` in all): a topic of many one-record
        batches (raw-naive, FastStream) reads slowly on Tansu, so a fixed time would miss outputs."""
        start = clock()
        # An end-of-partition seen before the last writes reached the broker would be stale: fetch again first.
        settle = start + 0.2
        last, seen = start, self.records
        while clock() < settle or len(self._at_end) < PARTITIONS:
            self.poll(0.05)
            now = clock()
            if self.records != seen:
                last, seen = now, self.records
            if now - last > idle or now - start > cap:
                break

    def answered(self, inputs: set[bytes], handled: int | None = None) -> tuple[int, int, int]:
        """Lost, duplicated and stray outputs for these inputs; with ``handled``, the variant was to
        handle only that many of them (any ones), and lost is how many of those have no output."""
        if handled is None:
            lost = sum(1 for i in inputs if i not in self.counts)
        else:
            lost = max(0, handled - sum(1 for i in self.counts if i in inputs))
        duplicated = sum(n - 1 for i, n in self.counts.items() if i in inputs)
        strays = sum(n for i, n in self.counts.items() if i not in inputs) + self.unnamed
        return lost, duplicated, strays

    def close(self) -> None:
        self._consumer.close()


@dataclass(frozen=True)
class Throughput:
    variant: str
    events: int
    seconds: float
    cpu_seconds: float | None
    lost: int
    duplicated: int
    strays: int
    #: Raw loops and FastStream: how long after their last ack this process saw the last output (what choreo's
    #: end includes).
    seen_later_ms: float | None
    exit_code: int | None

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_s_per_1000(self) -> float | None:
        return self.cpu_seconds / self.events * 1000 if self.cpu_seconds is not None and self.events else None


def measure_throughput(base: Settings, variant: str, events: int, seed: int, files: Path,
                       observed_env: Mapping[str, str], choreo_env: Mapping[str, str],
                       handled: int | None = None) -> Throughput:
    """One run: ``events`` preloaded; the variant handles ``handled`` of them (default: all) and stops."""
    run = _new_run(base, files)
    inputs = asyncio.run(_preload(run, events, seed))
    _create_topics(run.settings.kafka_bootstrap, [run.output])
    observer = _Observer(run.settings.kafka_bootstrap, run.output)
    preloaded, events = events, min(handled or events, events)
    proc = _start(variant, run, events, observed_env, choreo_env)
    cpu_end: float | None = None
    finished = False
    try:
        deadline = clock() + RUN_TIMEOUT_BASE_S + events / SLOWEST_RATE
        while len(observer.counts) < events:
            if proc.poll() is not None:
                break  # finished (a raw loop, FastStream) or died; the drain below reads what it wrote
            if clock() > deadline:
                print(f"  {variant}: timed out with {len(observer.counts)} of {events} outputs", file=sys.stderr)
                break
            observer.poll(0.05)
        # choreo's end: its process is still running (idle) now, so its CPU count stops here too.
        seen_end = observer.last_new
        if variant not in REPORTED:
            cpu_end = _proc_cpu(proc.pid)
        finished = True
    finally:
        _stop(proc, exits_itself=finished and variant in REPORTED)
    observer.drain(DRAIN_TIMEOUT_S)
    if variant in REPORTED:
        seen_end = observer.last_new  # it may exit before this process has read its last outputs
    observer.close()
    lost, duplicated, strays = observer.answered(inputs, events if events < preloaded else None)

    seconds, cpu, later = 0.0, None, None
    if variant in REPORTED:
        report = json.loads(run.report.read_text()) if run.report.exists() else {}
        first, last = report.get("first_received"), report.get("last_ack")
        if first is not None and last is not None:
            seconds = last - first
            cpu = report["cpu_last"] - report["cpu_first"]
            later = (seen_end - last) * 1000 if seen_end is not None else None
    elif run.mark.exists() and seen_end is not None:
        first_call, cpu_first = (float(v) for v in run.mark.read_text().split())
        seconds = seen_end - first_call
        cpu = cpu_end - cpu_first if cpu_end is not None else None
    if not seconds:
        print(f"  {variant}: no timing (exit code {proc.returncode}); see {LOG_DIR / f'step-{variant}.log'}",
              file=sys.stderr)
    return Throughput(variant, events, seconds, cpu, lost, duplicated, strays, later, proc.returncode)


def _run_line(r: Throughput) -> str:
    # CPU per second of the run: how much of one core the process kept busy (below 1: it was also waiting).
    busy = f" ({r.cpu_seconds / r.seconds:.0%} of a core)" if r.cpu_seconds is not None and r.seconds else ""
    extra = [f"{r.strays} strays"] if r.strays else []
    if r.seen_later_ms is not None:
        extra.append(f"bench saw the last output {r.seen_later_ms:.0f} ms after the last ack")
    if r.exit_code:
        extra.append(f"exit code {r.exit_code}")
    return ", ".join([f"{r.events} events in {r.seconds:.2f} s = {r.events_per_s:,.0f} events/s",
                      f"cpu {_num(r.cpu_s_per_1000, '.3f')} s/1000{busy}", f"{r.lost} lost",
                      f"{r.duplicated} duplicated", *extra])


# -- one-hop latency ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    variant: str
    samples_ms: tuple[float, ...]
    sent: int
    lost: int
    duplicated: int

    def percentile(self, q: int) -> float | None:
        if not self.samples_ms:
            return None
        if len(self.samples_ms) == 1:
            return self.samples_ms[0]
        return statistics.quantiles(self.samples_ms, n=100, method="inclusive")[q - 1]


async def _paced(run: _Run, observer: _Observer, proc: subprocess.Popen[bytes], rate: float,
                 seconds: float) -> dict[bytes, float]:
    """Publish at ``rate`` for ``seconds`` once the variant answers; the send time of each event id."""
    payload = _payload(0)
    async with Publisher("bench-latency", settings=run.settings) as publisher:
        # Group join and start-up are not latency: probe until one event has come back.
        deadline = clock() + RUN_TIMEOUT_BASE_S
        probe = 0
        while not observer.counts:
            if proc.poll() is not None:
                raise RuntimeError(f"the variant exited ({proc.returncode}) before answering a probe")
            if clock() > deadline:
                raise RuntimeError("no probe answered")
            saga = f"probe-{probe}"
            await publisher.publish(StepRequested(saga_id=saga, payload=payload), correlation_id=saga)
            probe += 1
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)

        sent: dict[bytes, float] = {}
        tasks: list[asyncio.Task[str]] = []
        start = clock()
        for i in range(round(rate * seconds)):
            delay = start + i / rate - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            saga, event_id = f"lat-{i:06d}", str(uuid.uuid4())
            sent[event_id.encode()] = clock()
            tasks.append(asyncio.create_task(publisher.publish(
                StepRequested(saga_id=saga, payload=payload), correlation_id=saga, event_id=event_id)))
        await asyncio.gather(*tasks)
    return sent


def measure_latency(base: Settings, variant: str, rate: float, seconds: float, files: Path,
                    observed_env: Mapping[str, str], choreo_env: Mapping[str, str]) -> Latency:
    run = _new_run(base, files)
    _create_topics(run.settings.kafka_bootstrap, [run.input, run.output])
    observer = _Observer(run.settings.kafka_bootstrap, run.output)
    stopping = threading.Event()

    def observe() -> None:
        while not stopping.is_set():
            observer.poll(0.05)

    thread = threading.Thread(target=observe, name="observer", daemon=True)
    thread.start()
    proc = _start(variant, run, 0, observed_env, choreo_env)
    try:
        sent = asyncio.run(_paced(run, observer, proc, rate, seconds))
        deadline = clock() + 30
        while any(i not in observer.counts for i in sent) and clock() < deadline and proc.poll() is None:
            stopping.wait(0.1)
    finally:
        _stop(proc)
        stopping.set()
        thread.join()
    observer.drain(DRAIN_TIMEOUT_S)
    observer.close()
    lost, duplicated, _ = observer.answered(set(sent))
    samples = tuple(sorted((observer.arrived[i] - t) * 1000 for i, t in sent.items() if i in observer.arrived))
    return Latency(variant, samples, len(sent), lost, duplicated)


# -- report ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    variant: str
    runs: tuple[Throughput, ...]
    latencies: tuple[Latency, ...]

    @property
    def rates(self) -> list[float]:
        return [r.events_per_s for r in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_s_per_1000(self) -> float | None:
        values = [c for r in self.runs if (c := r.cpu_s_per_1000) is not None]
        return statistics.median(values) if values else None

    @property
    def lost(self) -> int:
        return sum(r.lost for r in self.runs) + sum(lat.lost for lat in self.latencies)

    @property
    def duplicated(self) -> int:
        return sum(r.duplicated for r in self.runs) + sum(lat.duplicated for lat in self.latencies)

    @property
    def strays(self) -> int:
        return sum(r.strays for r in self.runs)

    def p(self, q: int) -> float | None:
        """The median over rounds of each latency run's ``q``-th percentile."""
        values = [v for lat in self.latencies if (v := lat.percentile(q)) is not None]
        return statistics.median(values) if values else None


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(summaries: Sequence[Summary], *, events: int, rounds: int, latency: str, slow: int = 0,
                 tansu: bool = True) -> None:
    base = next((s.median for s in summaries if s.variant == BASELINE), None)
    header = (f"{'variant':<{NAME_WIDTH}}  {'events/s':>8}  {'(min-max)':>15}  {'x raw-limit':>11}  {'p50 ms':>7}  "
              f"{'p99 ms':>7}  {'cpu s/1000':>10}  {'lost':>5}  {'dup':>4}")
    print(f"\none saga step: {events} events preloaded on {PARTITIONS} partitions, {rounds} round(s), median "
          f"events/s (min-max); one-hop latency {latency}")
    if slow and slow < events:
        print(f"({', '.join(ONE_AT_A_TIME)} handle {slow} of the {events} and stop: one message at a time, "
              "all of them would take minutes per run)")
    print(header)
    print("-" * len(header))
    for s in summaries:
        ratio = f"{s.median / base:.2f}" if base else "-"
        spread = f"({min(s.rates):,.0f}-{max(s.rates):,.0f})"
        print(f"{s.variant:<{NAME_WIDTH}}  {s.median:>8,.0f}  {spread:>15}  {ratio:>11}  {_num(s.p(50), '.1f'):>7}  "
              f"{_num(s.p(99), '.1f'):>7}  {_num(s.cpu_s_per_1000, '.3f'):>10}  {s.lost:>5}  {s.duplicated:>4}")
    if any(s.variant in FASTSTREAM for s in summaries):
        # Only Tansu holds a fetch for its whole wait; Apache Kafka answers once a record arrives.
        print("faststream-*: at FastStream's default fetch wait, 500 ms (raw, choreo: 10 ms)"
              + (", which Tansu holds while nothing new is there: most of their p50/p99" if tansu else ""))


def goal_lines(summaries: Sequence[Summary]) -> list[str]:
    by = {s.variant: s for s in summaries}
    base, target = by.get(BASELINE), by.get(TARGET)
    rate_head = f"goal: {TARGET} events/s >= {GOAL_RATIO} x {BASELINE}"
    p99_head = f"goal: {TARGET} p99 <= {GOAL_P99_RATIO} x {BASELINE} p99"
    if base is None or target is None:
        why = f"not measured (needs {BASELINE} and {TARGET})"
        lines = [f"{rate_head}: {why}", f"{p99_head}: {why}"]
    else:
        ratio = target.median / base.median if base.median else 0.0
        lines = [f"{rate_head}: {'met' if ratio >= GOAL_RATIO else 'missed'} ({ratio:.2f} x: "
                 f"{target.median:,.0f} vs {base.median:,.0f} events/s)"]
        base_p99, target_p99 = base.p(99), target.p(99)
        if base_p99 is None or target_p99 is None or not base_p99:
            lines.append(f"{p99_head}: not measured (--latency-seconds 0)")
        else:
            p_ratio = target_p99 / base_p99
            lines.append(f"{p99_head}: {'met' if p_ratio <= GOAL_P99_RATIO else 'missed'} ({p_ratio:.2f} x: "
                         f"{target_p99:.1f} vs {base_p99:.1f} ms)")
    fs_head = f"goal: {TARGET} events/s >= {GOAL_FASTSTREAM_RATIO:g} x the best FastStream backend"
    measured = [by[v] for v in FASTSTREAM if v in by]
    if target is None or not measured:
        lines.append(f"{fs_head}: not measured (needs {TARGET} and {' or '.join(FASTSTREAM)})")
    else:
        best = max(measured, key=lambda s: s.median)
        fs_ratio = target.median / best.median if best.median else 0.0
        lines.append(f"{fs_head}: {'met' if fs_ratio >= GOAL_FASTSTREAM_RATIO else 'missed'} ({fs_ratio:.1f} x: "
                     f"{target.median:,.0f} vs {best.variant} {best.median:,.0f} events/s)")
    return lines


def results(summaries: Sequence[Summary]) -> dict[str, object]:
    def maybe(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    return {s.variant: {
        "events_per_s": {"median": round(s.median), "min": round(min(s.rates)), "max": round(max(s.rates))},
        "p50_ms": maybe(s.p(50), 1), "p99_ms": maybe(s.p(99), 1), "cpu_s_per_1000": maybe(s.cpu_s_per_1000, 3),
        "events": s.runs[0].events,  # handled per run, of the backlog preloaded (see --slow-events)
    } for s in summaries}


def _variants(value: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(VARIANTS)}, got {value!r}")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--variants", type=_variants, default=list(VARIANTS),
                        help=f"comma-separated (default: {','.join(VARIANTS)})")
    parser.add_argument("--events", type=int, default=50_000, help="events preloaded per throughput run")
    parser.add_argument("--slow-events", type=int, default=10_000,
                        help="how many of the preloaded events the one-at-a-time variants (raw-naive, FastStream) "
                             "handle before they stop (0: all)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds, interleaved")
    parser.add_argument("--latency-rate", type=float, default=200.0, help="events/s of the latency run")
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="length of the latency run (0: none)")
    parser.add_argument("--choreo-env", action="append", default=[], metavar="CHOREO_NAME=VALUE",
                        help="a setting for the choreo variants (repeatable), to explore; implies --no-results")
    parser.add_argument("--no-results", action="store_true", help="do not write the results file")
    parser.add_argument("--results", type=Path, default=None,
                        help="the results file (default: bench/results.json on the embedded Tansu, "
                             "bench/results-<CHOREO_BROKER>.json on a broker from the environment)")
    parser.add_argument("--broker-from-env", action="store_true",
                        help="use CHOREO_KAFKA and CHOREO_REDIS when both are set")
    args = parser.parse_args(argv)
    if args.slow_events < 0:
        parser.error("--slow-events must not be negative")
    if args.events < 1 or args.rounds < 1 or args.latency_rate <= 0 or args.latency_seconds < 0:
        parser.error("--events, --rounds and --latency-rate must be positive, --latency-seconds not negative")
    choreo_env: dict[str, str] = {}
    for item in args.choreo_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("CHOREO_"):
            parser.error(f"--choreo-env: expected CHOREO_NAME=VALUE, got {item!r}")
        choreo_env[name] = value

    results_file: Path = args.results or results_path(broker_kind(args.broker_from_env))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    variants: list[str] = args.variants
    runs: dict[str, list[Throughput]] = {v: [] for v in variants}
    latencies: dict[str, list[Latency]] = {v: [] for v in variants}
    with otlp_sink() as observed_env, broker(args.broker_from_env) as on, \
        tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        base, files = on.settings, Path(tmp)
        header = machine_lines("bench.step", sys.argv[1:] if argv is None else argv, on.description)
        for line in header:
            print(line)
        if choreo_env:
            shown = shlex.join(f"{k}={v}" for k, v in choreo_env.items())
            print(f"choreo variants NOT at default settings: {shown}")
        for round_no in range(args.rounds):
            # Interleaved, and each round starts with the next variant: no variant always runs first.
            shift = round_no % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                result = measure_throughput(base, variant, args.events, round_no, files, observed_env,
                                            choreo_env, args.slow_events if variant in ONE_AT_A_TIME else None)
                runs[variant].append(result)
                print(f"  round {round_no + 1}, {variant:<{NAME_WIDTH}}: {_run_line(result)}", flush=True)
            # Latency in every round too, in the same rotation: on Apache Kafka the broker's tail
            # latency grew with the topics of the runs before, which must not favour whichever ran first.
            for variant in (variants[shift:] + variants[:shift]) if args.latency_seconds else []:
                lat = measure_latency(base, variant, args.latency_rate, args.latency_seconds, files, observed_env,
                                      choreo_env)
                latencies[variant].append(lat)
                print(f"  round {round_no + 1}, latency, {variant:<{NAME_WIDTH}}: {len(lat.samples_ms)} of "
                      f"{lat.sent} events, p50 {_num(lat.percentile(50), '.1f')} ms, p99 "
                      f"{_num(lat.percentile(99), '.1f')} ms, max {_num(max(lat.samples_ms, default=None), '.1f')} "
                      f"ms, {lat.lost} lost, {lat.duplicated} duplicated", flush=True)

    summaries = [Summary(v, tuple(runs[v]), tuple(latencies[v])) for v in variants]
    latency = (f"at {args.latency_rate:.0f} events/s for {args.latency_seconds:g} s" if args.latency_seconds
               else "not measured")
    print_report(summaries, events=args.events, rounds=args.rounds, latency=latency, slow=args.slow_events,
                 tansu=on.kind == EMBEDDED)
    for line in goal_lines(summaries):
        print(line)
    # Figures of non-default settings must not stand in the results as choreo's.
    if not args.no_results and not choreo_env:
        path = write_section("step", results(summaries), path=results_file)
        write_meta(results_file, "bench.step", header)
        print(f"wrote section 'step' of {path}")
    lost = [f"{s.variant} lost {s.lost}" for s in summaries if s.lost]
    strays = [f"{s.variant} wrote {s.strays} outputs for no input" for s in summaries if s.strays]
    for line in lost + strays:
        print(f"error: {line}", file=sys.stderr)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
