"""``choreo publish TYPE JSON``: publish one event, validated against its model, and wait for the ack."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import pydantic

from choreo.cli._load import load
from choreo.errors import ConfigurationError
from choreo.events import Event
from choreo.publisher import Publisher


def register(commands: Any) -> None:
    p = commands.add_parser("publish", help="publish one event and wait for the broker's acknowledgement")
    p.add_argument("event_type", metavar="MODULE:EVENT", help="e.g. services.events:OrderPlaced")
    p.add_argument("fields", metavar="JSON", help="the event's fields as a JSON object")
    p.add_argument("--correlation-id", help="join an existing saga (default: start a new one)")
    p.add_argument("--event-id", help="a fixed event id, so re-running the command is idempotent")
    p.add_argument("--key", help="Kafka key (default: the correlation id)")
    p.add_argument("--producer", default="cli", help="the producer name written to the headers")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    cls = load(args.event_type, "event type")
    if not (isinstance(cls, type) and issubclass(cls, Event)):
        raise ConfigurationError(f"{args.event_type} is not a choreo Event class")
    try:
        fields = json.loads(args.fields)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"JSON fields: {exc}") from None
    try:
        event = cls.model_validate(fields)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(event)'}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"{cls.__name__} fields are invalid: {problems}") from None
    event_id = asyncio.run(_publish(args, event))
    print(f"published {cls.event_type()} {event_id} to {cls.topic()}")
    return 0


async def _publish(args: argparse.Namespace, event: Event) -> str:
    async with Publisher(args.producer) as publisher:
        return await publisher.publish(
            event, correlation_id=args.correlation_id, event_id=args.event_id, key=args.key
        )
