"""``choreo dev``: the embedded broker (Tansu) and Redis, until Ctrl-C."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    p = commands.add_parser("dev", help="run a local Kafka-protocol broker and Redis (no Docker) until Ctrl-C")
    p.add_argument("--kafka-port", type=int, default=9092)
    p.add_argument("--redis-port", type=int, default=6379)
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from choreo.devstack import run_dev_stack_forever

    return run_dev_stack_forever(args.kafka_port, args.redis_port)
