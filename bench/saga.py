"""The checkout saga end to end: sagas/s under a backlog, and saga duration p50/p99 at a low rate.

    make bench-saga           # or: .venv/bin/python -m bench.saga --orders 2000 --rate 50 --seconds 10

Five services and the saga tracker run as separate processes (``choreo run``), started once and warmed
up with one saga, so every consumer group has joined before anything is measured.

Throughput, ``--rounds`` times: N orders are placed at once (the same N orders each round, new saga ids);
sagas/s = N / (last saga end - first saga start), from the tracker's records. Latency, once after the
rounds: orders are placed at ``--rate`` for ``--seconds``; a saga's duration is from its OrderPlaced to
its end event (both occurred-at times). About a third of the sagas fail and compensate.

The ``saga`` section of ``bench/results.json`` gets sagas/s (median, min, max over rounds), p50, p99
and max ms, the parameters, and the saga outcomes over every throughput round; ``meta.saga`` the
header lines. ``--broker-from-env`` uses ``CHOREO_KAFKA``/``CHOREO_REDIS`` (see bench/common.py), and
then writes ``bench/results-<broker>.json`` unless ``--results`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import broker, broker_kind, machine_lines, results_path, write_meta
from bench.results import write_section
from choreo import Publisher, Settings
from choreo.stores.redis import RedisSagaStore
from services.demo import PROCESSES, make_orders, start_services

LOG_DIR = Path(__file__).resolve().parent / "out"
WARM_UP_TIMEOUT_S = 120.0
ROUND_TIMEOUT_S = 600.0
LATENCY_TIMEOUT_S = 120.0
# How often the bench looks for ended sagas: it shares the cores with the services it measures.
POLL_S = 0.2


@dataclass(frozen=True)
class Round:
    orders: int
    seconds: float
    outcomes: dict[str, int]

    @property
    def sagas_per_s(self) -> float:
        return self.orders / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Latency:
    rate: float
    seconds: float
    durations_ms: tuple[float, ...]

    def percentile(self, q: int) -> float:
        if len(self.durations_ms) == 1:
            return self.durations_ms[0]
        return statistics.quantiles(self.durations_ms, n=100, method="inclusive")[q - 1]


class _Sagas:
    """Waits for sagas to end, and notices a service that died instead of waiting for the timeout."""

    def __init__(self, settings: Settings, procs: Sequence[subprocess.Popen[bytes]]) -> None:
        self.store = RedisSagaStore(settings.redis_url, prefix=settings.redis_prefix)
        self.procs = dict(zip(PROCESSES, procs))

    async def ended(self, ids: Sequence[str], timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        done: dict[str, dict[str, Any]] = {}
        while True:
            # Only the sagas not yet seen ended are read again: fewer Redis calls beside the services.
            for saga_id in [i for i in ids if i not in done]:
                state = await self.store.get(saga_id)
                if state is not None and state["ended_at"] is not None:
                    done[saga_id] = state
            if len(done) == len(ids):
                return [done[i] for i in ids]
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SystemExit(f"{name} exited with {proc.returncode}; see {LOG_DIR / (name + '.log')}")
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out after {timeout:.0f} s: {len(done)} of {len(ids)} sagas ended")
            await asyncio.sleep(POLL_S)

    async def close(self) -> None:
        await self.store.close()


async def measure(base: Settings, orders: int, rounds: int, rate: float, seconds: float) -> tuple[list[Round], Latency]:
    run = uuid.uuid4().hex[:6]
    settings = Settings(kafka_bootstrap=base.kafka_bootstrap, redis_url=base.redis_url, kafka_config=base.kafka_config,
                        topic_prefix=f"b{run}.", redis_prefix=f"b{run}:")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    procs = start_services(settings, LOG_DIR)
    sagas = _Sagas(settings, procs)
    try:
        async with Publisher("bench", settings=settings) as publisher:
            [warm] = make_orders(1, seed=1)
            warm = warm.model_copy(update={"order_id": "warm-up"})
            await publisher.publish(warm, correlation_id=warm.order_id)
            await sagas.ended([warm.order_id], WARM_UP_TIMEOUT_S)

            results: list[Round] = []
            for round_no in range(rounds):
                batch = [o.model_copy(update={"order_id": f"tp{round_no}-{o.order_id}"})
                         for o in make_orders(orders, seed=2)]
                await publisher.publish_many(batch, correlation_ids=[o.order_id for o in batch])
                states = await sagas.ended([o.order_id for o in batch], ROUND_TIMEOUT_S)
                span_ms = max(int(s["ended_at"]) for s in states) - min(int(s["started_at"]) for s in states)
                outcomes: dict[str, int] = {}
                for s in states:
                    outcomes[str(s["status"])] = outcomes.get(str(s["status"]), 0) + 1
                result = Round(orders, span_ms / 1000, dict(sorted(outcomes.items())))
                results.append(result)
                print(f"  round {round_no + 1}: {orders} sagas placed at once ended in {result.seconds:.2f} s = "
                      f"{result.sagas_per_s:.0f} sagas/s ({_outcomes(result.outcomes)})", flush=True)

            paced = [o.model_copy(update={"order_id": f"lat-{o.order_id}"})
                     for o in make_orders(round(rate * seconds), seed=3)]
            started = time.monotonic()
            for i, order in enumerate(paced):
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
                await publisher.publish(order, correlation_id=order.order_id)
            states = await sagas.ended([o.order_id for o in paced], LATENCY_TIMEOUT_S)
            latency = Latency(rate, seconds, tuple(sorted(float(int(s["ended_at"]) - int(s["started_at"]))
                                                          for s in states)))
            print(f"  latency: {len(paced)} sagas at {rate:g} sagas/s for {seconds:g} s: p50 "
                  f"{latency.percentile(50):.0f} ms, p99 {latency.percentile(99):.0f} ms, "
                  f"max {max(latency.durations_ms):.0f} ms", flush=True)
            return results, latency
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        await sagas.close()


def _outcomes(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{status} {n}" for status, n in outcomes.items())


def summed(rounds: Sequence[Round]) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in rounds:
        for status, n in r.outcomes.items():
            total[status] = total.get(status, 0) + n
    return dict(sorted(total.items()))


def print_report(rounds: Sequence[Round], latency: Latency) -> None:
    rates = [r.sagas_per_s for r in rounds]
    print(f"\ncheckout saga: 5 services + the saga tracker, each its own process; {len(rounds)} round(s) of "
          f"{rounds[0].orders} orders placed at once, median sagas/s (min-max); saga duration at "
          f"{latency.rate:g} sagas/s for {latency.seconds:g} s ({len(latency.durations_ms)} sagas)")
    header = f"{'sagas/s':>8}  {'(min-max)':>13}  {'p50 ms':>7}  {'p99 ms':>7}  {'max ms':>7}  outcomes (all rounds)"
    print(header)
    print("-" * len(header))
    print(f"{statistics.median(rates):>8,.0f}  {f'({min(rates):,.0f}-{max(rates):,.0f})':>13}  "
          f"{latency.percentile(50):>7.0f}  {latency.percentile(99):>7.0f}  {max(latency.durations_ms):>7.0f}  "
          f"{_outcomes(summed(rounds))}")


def results(rounds: Sequence[Round], latency: Latency) -> dict[str, object]:
    rates = [r.sagas_per_s for r in rounds]
    return {
        "sagas_per_s": {"median": round(statistics.median(rates)), "min": round(min(rates)), "max": round(max(rates))},
        "p50_ms": round(latency.percentile(50), 1), "p99_ms": round(latency.percentile(99), 1),
        "max_ms": round(max(latency.durations_ms), 1),
        "orders": rounds[0].orders, "rounds": len(rounds), "rate": latency.rate, "seconds": latency.seconds,
        "outcomes": summed(rounds),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--orders", type=int, default=2000, help="orders placed at once per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds")
    parser.add_argument("--rate", type=float, default=50.0, help="sagas/s of the latency run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    parser.add_argument("--broker-from-env", action="store_true",
                        help="use CHOREO_KAFKA and CHOREO_REDIS when set, the embedded dev stack for the rest")
    parser.add_argument("--results", type=Path, default=None,
                        help="results file (default: bench/results.json on the embedded Tansu, "
                             "bench/results-<broker>.json on another broker)")
    parser.add_argument("--no-results", action="store_true", help="write no results file (smoke runs)")
    args = parser.parse_args(argv)
    if args.orders < 1 or args.rounds < 1 or args.rate <= 0 or args.seconds <= 0 or args.rate * args.seconds < 1:
        parser.error("--orders, --rounds, --rate and --seconds must be positive, and --rate x --seconds at least 1")
    path: Path = args.results or results_path(broker_kind(args.broker_from_env))

    with broker(args.broker_from_env) as b:
        lines = machine_lines("bench.saga", sys.argv[1:] if argv is None else argv, b.description)
        for line in lines:
            print(line)
        rounds, latency = asyncio.run(measure(b.settings, args.orders, args.rounds, args.rate, args.seconds))
    print_report(rounds, latency)
    if not args.no_results:
        write_section("saga", results(rounds, latency), path=path)
        write_meta(path, "bench.saga", lines)
        print(f"wrote section 'saga' of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
