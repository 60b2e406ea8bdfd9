"""``choreo run MODULE:SERVICE``: one service in this process until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from choreo.cli._load import load
from choreo.errors import ConfigurationError
from choreo.service import Service


def register(commands: Any) -> None:
    p = commands.add_parser("run", help="run a service (its own consumer group) until SIGTERM/SIGINT")
    p.add_argument("target", metavar="MODULE:SERVICE", help="e.g. services.inventory:service")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    service = load(args.target, "service")
    if not isinstance(service, Service):
        raise ConfigurationError(f"{args.target} is a {type(service).__name__}, not a choreo.Service")
    asyncio.run(_run(service))
    return 0


async def _run(service: Service) -> None:
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
    await service.run()
