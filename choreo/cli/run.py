"""``choreo run MODULE:SERVICE``: one service in this process until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
from typing import Any

from choreo.cli._load import load
from choreo.errors import ConfigurationError
from choreo.service import Service


def register(commands: Any) -> None:
    p = commands.add_parser("run", help="run a service (its own consumer group) until SIGTERM/SIGINT")
    p.add_argument("target", metavar="MODULE:SERVICE", help="e.g. services.inventory:service")
    p.add_argument("--no-gc-tuning", dest="gc_tuning", action="store_false",
                   help="leave Python's cyclic garbage collector at its defaults (see README, Performance)")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    service = load(args.target, "service")
    if not isinstance(service, Service):
        raise ConfigurationError(f"{args.target} is a {type(service).__name__}, not a choreo.Service")
    asyncio.run(_run(service, gc_tuning=args.gc_tuning))
    return 0


#: Collections of the youngest generation after this many net allocations (CPython's default: 700).
GC_THRESHOLD = (100_000, 20, 10)


def tune_gc() -> None:
    """Take the start-up heap (modules, schemas, models: hundreds of thousands of objects) out of
    the cyclic collector's scans, and collect the young generation less often.

    A service allocates a few container objects per event, nearly all freed by reference counting;
    with the defaults the full collections that walk the whole heap cost ~10% of the CPU of a busy
    service (measured on bench/step.py). Cycles are still collected, only in bigger steps. This is
    the process's decision, so the command that owns the process makes it, not the library."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def _run(service: Service, *, gc_tuning: bool = True) -> None:
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            raise SystemExit(130)  # a second Ctrl-C: give up on a clean stop
        service.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    if gc_tuning:
        try:
            await service.start()  # its imports and clients belong to the heap frozen below
        except BaseException:
            await service.close()
            raise
        tune_gc()
    await service.run()
