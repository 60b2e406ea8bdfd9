"""choreo's own cost per event, without a broker: for checking a CPU cut on a noisy machine.

    python -m bench.cpu                  # main-thread CPU µs per event, median of --rounds
    python -m bench.cpu --callgrind      # instructions per event under valgrind: repeatable

The step of ``bench.step`` (``bench/step_app.py``'s handler: decode, claim, gate, handle, encode,
done) runs in this process on the in-memory transport, with the dev stack's real Redis for the
claims and the parking lists, so what is measured is choreo's Python and its Redis client, not a
broker's. Variants, side by side:

* ``choreo``: default settings, tracing and metrics off.
* ``choreo-observed``: tracing and metrics exported over OTLP/HTTP to a sink in this process that
  drops them (what ``bench.step``'s choreo-observed does).

``--callgrind`` runs each variant twice under ``valgrind --tool=callgrind`` (valgrind is on these
machines), once handling ``--events`` events and once handling none after the same start-up and
preload, and divides the difference by ``--events``: the count moved by 0.06% between two runs of
the same code here, while times moved by 20%. It takes about a minute per variant. Nothing is
written to ``bench/results.json``: this is a tool for changes to choreo, not one of issue 7's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time

from bench.common import broker, machine_lines, otlp_sink
from bench.step_app import PAYLOAD_CHARS, StepDone, StepRequested, step
from choreo import Publisher, Service, Settings
from choreo.cli.run import tune_gc
from choreo.metrics import Metrics
from choreo.stores.redis import RedisIdempotencyStore, RedisParkingLot
from choreo.tracing import Tracing
from choreo.transport.memory import MemoryBroker, MemoryTransport

VARIANTS = ("choreo", "choreo-observed")
PAYLOAD = "p" * PAYLOAD_CHARS
PUBLISH_CHUNK = 5_000
_COLLECTED = re.compile(r"Collected : (\d+)")


async def run_once(variant: str, events: int, handle: bool, redis_url: str) -> float:
    """Preload ``events``, then (if ``handle``) handle them all; main-thread CPU seconds of handling."""
    if variant != "choreo-observed":
        return await _measure(Tracing.off(), Metrics.off(), events, handle, redis_url)
    with otlp_sink() as env:
        # The OTLP exporters read their endpoint from the process environment, as in a deployment.
        os.environ.update(env)
        try:
            return await _measure(Tracing.from_env("step"), Metrics.from_settings("step", 0), events, handle,
                                  redis_url)
        finally:
            for name in env:
                os.environ.pop(name, None)


async def _measure(tracing: Tracing, metrics: Metrics, events: int, handle: bool, redis_url: str) -> float:
    config = Settings(topic_prefix=f"cpu-{os.getpid()}.", topic_partitions=4, redis_url=redis_url,
                      redis_prefix=f"cpu-{os.getpid()}-{time.monotonic_ns()}:")
    memory = MemoryBroker()
    async with Publisher("bench", settings=config, transport=MemoryTransport(memory)) as publisher:
        sagas = [f"saga-{i:06d}" for i in range(events)]
        for start in range(0, events, PUBLISH_CHUNK):
            chunk = sagas[start:start + PUBLISH_CHUNK]
            await publisher.publish_many([StepRequested(saga_id=s, payload=PAYLOAD) for s in chunk],
                                         correlation_ids=chunk)
    store = RedisIdempotencyStore(redis_url)
    service = Service("step", settings=config, transport=MemoryTransport(memory), idempotency=store,
                      parking=RedisParkingLot(store.redis, redis_url), tracing=tracing, metrics=metrics)
    service.on(StepRequested, emits=[StepDone])(step)  # bench.step's handler
    try:
        await service.start()
        tune_gc()  # as `choreo run` does, so the figure is a deployed service's
        cpu = time.thread_time()
        while handle and service.stats.processed < events:
            await service.poll_once(0.01)
        return time.thread_time() - cpu
    finally:
        await service.close()


def _instructions(variant: str, events: int, handle: bool, redis_url: str) -> int:
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m", "bench.cpu",
            "--child", variant, "--events", str(events), "--redis", redis_url] + ([] if handle else ["--no-handle"])
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONHASHSEED": "0"})
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"valgrind run failed ({' '.join(argv)}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--events", type=int, default=None,
                        help="events per run (default 20,000; 3,000 with --callgrind)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, without --callgrind")
    parser.add_argument("--callgrind", action="store_true", help="count instructions under valgrind")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one measured run, under valgrind
    parser.add_argument("--no-handle", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(run_once(args.child, args.events, not args.no_handle, args.redis))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown or 'none given'}; choose from {', '.join(VARIANTS)}")
    events = args.events if args.events is not None else (3_000 if args.callgrind else 20_000)
    if events < 1 or args.rounds < 1:
        parser.error("--events and --rounds must be at least 1")
    with broker(False) as b:
        for line in machine_lines("bench.cpu", sys.argv[1:] if argv is None else argv, b.description):
            print(line)
        redis_url = b.settings.redis_url
        per_event: dict[str, float] = {}
        if args.callgrind:
            for variant in variants:
                idle = _instructions(variant, events, False, redis_url)
                busy = _instructions(variant, events, True, redis_url)
                per_event[variant] = (busy - idle) / events
                print(f"  {variant:16s}: {busy:,} - {idle:,} instructions over {events} events")
            unit = "instructions per event"
        else:
            runs: dict[str, list[float]] = {v: [] for v in variants}
            for round_ in range(args.rounds):
                for variant in variants[round_ % len(variants):] + variants[:round_ % len(variants)]:
                    cpu = asyncio.run(run_once(variant, events, True, redis_url))
                    runs[variant].append(cpu / events * 1e6)
                    print(f"  round {round_ + 1}, {variant:16s}: {runs[variant][-1]:.1f} us of main-thread CPU per event")
            per_event = {v: statistics.median(r) for v, r in runs.items()}
            unit = f"main-thread CPU us per event, median of {args.rounds}"
    base = per_event.get("choreo")
    print(f"\nchoreo's own cost, {events} events on the memory transport and Redis: {unit}")
    print(f"{'variant':18s}{'per event':>16s}{'x choreo':>10s}")
    print("-" * 44)
    for variant, value in per_event.items():
        ratio = f"{value / base:10.2f}" if base else f"{'-':>10s}"
        print(f"{variant:18s}{value:16,.1f}{ratio}")


if __name__ == "__main__":
    main()
