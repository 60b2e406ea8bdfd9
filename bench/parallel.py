"""Key-ordered parallel processing (issue 6): events/s by ``Settings.concurrency``, and whether key order held.

    make bench-parallel         # or: .venv/bin/python -m bench.parallel --concurrency 1,64 --rounds 3

For each concurrency and round, a fresh 4-partition topic is preloaded with events spread over
``--keys`` record keys (record key = correlation id = the key; ``seq`` counts up over the whole
run, so each key's publish order is known). One ``Service`` in this process consumes it with
``ordering="key"``; its handler sleeps 10 ms (simulated I/O) and notes the key and seq.
Throughput = events / (last handler finished - first handler started), so the group join is
excluded. An order violation is an event handled after a later event of its key; lost and
duplicated events are counted too and must be 0.

The ``parallel`` section of ``bench/results.json`` gets ``events_per_s`` (median over rounds) and
``order_violations`` (over all rounds) per concurrency; everything else is only printed.
``--broker-from-env`` uses ``CHOREO_KAFKA``/``CHOREO_REDIS`` when set and the embedded dev stack for
the rest (see bench/common.py); on another broker than the embedded Tansu the figures go to
``bench/results-<broker>.json`` unless ``--results`` names a file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import broker, broker_kind, machine_lines, results_path, write_meta
from bench.results import write_section
from choreo import Context, Event, Publisher, Service, Settings
from choreo.schemas import parse_schema

DEFAULT_CONCURRENCY = (1, 16, 64, 256)
# Each run should take a few seconds once handlers overlap: about 0.1 s of sleep per event per slot.
DEFAULT_EVENTS = {1: 600, 16: 6_000, 64: 20_000, 256: 40_000}
MIN_EVENTS = 20
PARTITIONS = 4
HANDLER_SLEEP_S = 0.010
PUBLISH_CHUNK = 5_000
GOAL_CONCURRENCY = 64
GOAL_RATIO = 30.0
# Time to wait for a run beyond what the slowest plausible rate (one event at a time) needs.
RUN_TIMEOUT_BASE_S = 120.0


class KeyedStep(Event, schema=parse_schema({
    "type": "record", "name": "KeyedStep", "namespace": "bench", "version": 1,
    "fields": [{"name": "key", "type": "string"}, {"name": "seq", "type": "int"}],
})):
    key: str
    seq: int


@dataclass
class _Recorder:
    """What the handler saw, checked against the publish order as it happens."""

    expected: int
    last_seq: dict[str, int] = field(default_factory=dict)
    in_flight_by_key: dict[str, int] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)
    violations: int = 0
    overlaps: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    first_start: float | None = None
    last_end: float = 0.0
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    def started(self, key: str, seq: int) -> None:
        now = time.perf_counter()
        if self.first_start is None:
            self.first_start = now
        if seq < self.last_seq.get(key, -1):
            self.violations += 1
        else:
            self.last_seq[key] = seq
        # Two events of one key in the handler at once: ordered by start, but not one after another.
        if self.in_flight_by_key.get(key, 0):
            self.overlaps += 1
        self.in_flight_by_key[key] = self.in_flight_by_key.get(key, 0) + 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self.seen[seq] = self.seen.get(seq, 0) + 1

    def finished(self, key: str) -> None:
        self.last_end = time.perf_counter()
        self.in_flight -= 1
        self.in_flight_by_key[key] -= 1
        if len(self.seen) == self.expected:
            self.complete.set()


@dataclass(frozen=True)
class RunResult:
    concurrency: int
    events: int
    seconds: float
    order_violations: int
    lost: int
    duplicated: int
    key_overlaps: int
    peak_in_flight: int

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def make_events(count: int, keys: int, seed: int) -> tuple[list[KeyedStep], list[str]]:
    """``count`` events on random keys (reproducible by ``seed``), in seq order, and their keys."""
    rng = random.Random(seed)
    events = [KeyedStep(key=f"k{rng.randrange(keys):05d}", seq=seq) for seq in range(count)]
    return events, [e.key for e in events]


async def measure(base: Settings, concurrency: int, count: int, keys: int, seed: int) -> RunResult:
    run = uuid.uuid4().hex[:8]
    settings = Settings(kafka_bootstrap=base.kafka_bootstrap, redis_url=base.redis_url, kafka_config=base.kafka_config,
                        topic_prefix=f"bp{run}.", redis_prefix=f"bp{run}:", topic_partitions=PARTITIONS,
                        topic_replication=1, concurrency=concurrency, ordering="key")
    events, correlation_ids = make_events(count, keys, seed)
    async with Publisher("bench", settings=settings) as publisher:
        for start in range(0, count, PUBLISH_CHUNK):
            await publisher.publish_many(events[start : start + PUBLISH_CHUNK],
                                         correlation_ids=correlation_ids[start : start + PUBLISH_CHUNK])

    recorder = _Recorder(expected=count)
    service = Service("parallel", settings=settings)

    @service.on(KeyedStep)
    async def handle(event: KeyedStep, ctx: Context) -> None:
        recorder.started(event.key, event.seq)
        try:
            await asyncio.sleep(HANDLER_SLEEP_S)
        finally:
            recorder.finished(event.key)

    task = asyncio.create_task(service.run())
    waiter = asyncio.create_task(recorder.complete.wait())
    try:
        await asyncio.wait({task, waiter}, timeout=RUN_TIMEOUT_BASE_S + count * HANDLER_SLEEP_S,
                           return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # the service died: its error is the answer
            raise RuntimeError("the service stopped before handling every event")
        if not waiter.done():
            print(f"  timed out: {len(recorder.seen)} of {count} events handled", file=sys.stderr, flush=True)
    finally:
        waiter.cancel()
        service.stop()
        await task
    elapsed = recorder.last_end - recorder.first_start if recorder.first_start is not None else 0.0
    return RunResult(
        concurrency=concurrency, events=count, seconds=elapsed, order_violations=recorder.violations,
        lost=count - len(recorder.seen), duplicated=sum(n - 1 for n in recorder.seen.values()),
        key_overlaps=recorder.overlaps, peak_in_flight=recorder.peak_in_flight,
    )


@dataclass(frozen=True)
class Summary:
    concurrency: int
    runs: tuple[RunResult, ...]

    @property
    def median(self) -> float:
        return statistics.median(r.events_per_s for r in self.runs)

    @property
    def order_violations(self) -> int:
        return sum(r.order_violations for r in self.runs)

    @property
    def lost(self) -> int:
        return sum(r.lost for r in self.runs)

    @property
    def duplicated(self) -> int:
        return sum(r.duplicated for r in self.runs)


def events_for(concurrency: int, *, override: int | None, scale: float) -> int:
    if override is not None:
        return override
    nearest = min(DEFAULT_EVENTS, key=lambda c: abs(c - concurrency))
    # Past the largest default the CPU, not the concurrency, bounds the rate: more events only take longer.
    base = DEFAULT_EVENTS.get(concurrency, min(DEFAULT_EVENTS[nearest] * concurrency // nearest,
                                               max(DEFAULT_EVENTS.values())))
    return max(MIN_EVENTS, round(base * scale))


def goal_line(summaries: Sequence[Summary]) -> str:
    by_c = {s.concurrency: s for s in summaries}
    head = f"goal: {GOAL_CONCURRENCY} >= {GOAL_RATIO:.0f}x of 1"
    if 1 not in by_c or GOAL_CONCURRENCY not in by_c:
        return f"{head}: not measured (needs concurrency 1 and {GOAL_CONCURRENCY})"
    goal = by_c[GOAL_CONCURRENCY]
    ratio = goal.median / by_c[1].median if by_c[1].median else 0.0
    problems = [f"{n} {what}" for n, what in ((goal.order_violations, "order violations"), (goal.lost, "lost"),
                                               (goal.duplicated, "duplicated")) if n]
    met = ratio >= GOAL_RATIO and not problems
    return f"{head}: {'met' if met else 'missed'} ({', '.join([f'{ratio:.1f}x', *problems])})"


def print_report(summaries: Sequence[Summary], *, keys: int, rounds: int) -> None:
    base = next((s.median for s in summaries if s.concurrency == 1), None)
    header = (f"{'concurrency':>11}  {'events':>7}  {'events/s':>9}  {'min-max':>13}  {'x of 1':>7}  "
              f"{'order viol':>10}  {'lost':>5}  {'dup':>5}  {'key overlaps':>12}  {'peak in flight':>14}")
    print(f"\nkey-ordered parallel processing: {PARTITIONS} partitions, {keys} keys, handler sleeps "
          f"{HANDLER_SLEEP_S * 1000:.0f} ms, {rounds} round(s), median events/s")
    print(header)
    print("-" * len(header))
    for s in summaries:
        rates = [r.events_per_s for r in s.runs]
        ratio = f"{s.median / base:.2f}" if base else "-"
        print(f"{s.concurrency:>11}  {s.runs[0].events:>7}  {s.median:>9.0f}  "
              f"{f'{min(rates):.0f}-{max(rates):.0f}':>13}  {ratio:>7}  {s.order_violations:>10}  {s.lost:>5}  "
              f"{s.duplicated:>5}  {sum(r.key_overlaps for r in s.runs):>12}  "
              f"{max(r.peak_in_flight for r in s.runs):>14}")
    print("(key overlaps: an event started while an earlier one of its key was still in the handler; "
          "peak in flight: most handler calls at once)")


def _concurrencies(value: str) -> list[int]:
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {value!r}")
    return levels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--concurrency", type=_concurrencies, default=list(DEFAULT_CONCURRENCY),
                        help="comma-separated Settings.concurrency values (default: 1,16,64,256)")
    parser.add_argument("--events", type=int, default=None,
                        help=f"events per run at every concurrency (default by concurrency: {DEFAULT_EVENTS})")
    parser.add_argument("--events-scale", type=float, default=1.0,
                        help="multiply the default event counts, e.g. 0.2 for a quick run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--keys", type=int, default=1000, help="distinct record keys")
    parser.add_argument("--broker-from-env", action="store_true",
                        help="use CHOREO_KAFKA and CHOREO_REDIS when set, the embedded dev stack for the rest")
    parser.add_argument("--results", type=Path, default=None,
                        help="results file (default: bench/results.json on the embedded Tansu, "
                             "bench/results-<broker>.json on another broker)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.keys < 1 or (args.events is not None and args.events < 1) or args.events_scale <= 0:
        parser.error("--rounds, --keys, --events and --events-scale must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path: Path = args.results or results_path(broker_kind(args.broker_from_env))

    runs: dict[int, list[RunResult]] = {c: [] for c in args.concurrency}
    with broker(args.broker_from_env) as b:
        base = b.settings
        lines = machine_lines("bench.parallel", sys.argv[1:] if argv is None else argv, b.description)
        for line in lines:
            print(line)
        for round_no in range(args.rounds):
            for concurrency in args.concurrency:  # interleaved: a noisy machine affects every level alike
                count = events_for(concurrency, override=args.events, scale=args.events_scale)
                result = asyncio.run(measure(base, concurrency, count, args.keys, seed=round_no))
                runs[concurrency].append(result)
                print(f"  round {round_no + 1}, concurrency {concurrency:>4}: {count} events in "
                      f"{result.seconds:.2f} s = {result.events_per_s:.0f} events/s, "
                      f"{result.order_violations} order violations, {result.lost} lost, "
                      f"{result.duplicated} duplicated", flush=True)

    summaries = [Summary(c, tuple(runs[c])) for c in args.concurrency]
    print_report(summaries, keys=args.keys, rounds=args.rounds)
    print(goal_line(summaries))
    write_section("parallel", {
        str(s.concurrency): {"events_per_s": round(s.median), "order_violations": s.order_violations}
        for s in summaries
    }, path=path)
    write_meta(path, "bench.parallel", lines)
    print(f"wrote section 'parallel' of {path}")
    broken = any(s.order_violations or s.lost or s.duplicated for s in summaries)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
