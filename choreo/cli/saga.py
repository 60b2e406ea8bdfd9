"""``choreo saga list`` and ``choreo saga show ID``: saga state as the tracker recorded it in Redis."""

from __future__ import annotations

import argparse
import asyncio
import re
from datetime import datetime, timezone
from typing import Any

from choreo.errors import ConfigurationError
from choreo.settings import Settings

_AGE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def register(commands: Any) -> None:
    p = commands.add_parser("saga", help="list sagas or show one saga's timeline")
    sub = p.add_subparsers(dest="saga_command", required=True, metavar="SUBCOMMAND")
    ls = sub.add_parser("list", help="sagas, newest first")
    ls.add_argument("--status", choices=["running", "completed", "compensating", "compensated",
                                         "compensation_failed", "timed_out"])
    ls.add_argument("--older-than", metavar="AGE", help="only sagas started at least AGE ago (e.g. 30s, 5m, 2h)")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=command)
    show = sub.add_parser("show", help="one saga's steps and events as a timeline")
    show.add_argument("saga_id", metavar="ID")
    show.set_defaults(func=command)
    verify = sub.add_parser("verify", help="compare what sagas did with the declared flow graph")
    verify.add_argument("system", metavar="MODULE:ATTR", help="the services and sagas, e.g. services.checkout:system")
    verify.add_argument("saga_id", metavar="ID", nargs="?", help="one saga (default: the latest --limit sagas)")
    verify.add_argument("--limit", type=int, default=1000)
    verify.set_defaults(func=command)


def _age(text: str | None) -> int | None:
    if text is None:
        return None
    match = _AGE.match(text.strip())
    if not match:
        raise ConfigurationError(f"--older-than {text!r}: expected a number and a unit, e.g. 90s, 5m, 2h")
    return int(float(match.group(1)) * _UNIT_MS[match.group(2)])


def _time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _span(start: int | None, end: int | None) -> str:
    if start is None or end is None:
        return ""
    return f"{end - start} ms"


def command(args: argparse.Namespace) -> int:
    return asyncio.run(_command(args))


async def _command(args: argparse.Namespace) -> int:
    from choreo.stores.redis import RedisSagaStore

    settings = Settings.from_env()
    store = RedisSagaStore(settings.redis_url, prefix=settings.redis_prefix)
    try:
        if args.saga_command == "list":
            sagas = await store.list(status=args.status, older_than_ms=_age(args.older_than), limit=args.limit)
            print(f"{'saga id':40} {'saga':12} {'status':20} {'started (UTC)':24} duration")
            for s in sagas:
                print(f"{s['id']:40} {s['saga']:12} {s['status']:20} {_time(s['started_at']):24} "
                      f"{_span(s['started_at'], s['ended_at']) or 'running'}")
            print(f"{len(sagas)} saga(s)")
            return 0
        if args.saga_command == "verify":
            return await _verify(args, store)
        state = await store.get(args.saga_id)
        if state is None:
            print(f"no saga {args.saga_id!r} under the Redis prefix {settings.redis_prefix!r}")
            return 1
        _show(state, settings.jaeger_url)
        return 0
    finally:
        await store.close()


async def _verify(args: argparse.Namespace, store: Any) -> int:
    from choreo.cli.graph import collect
    from choreo.cli._load import load
    from choreo.graph import FlowGraph
    from choreo.tracker import verify

    services: list[Any] = []
    sagas: list[Any] = []
    collect(load(args.system, "services and sagas"), args.system, services, sagas)
    graph = FlowGraph.build(services, sagas)
    if args.saga_id:
        state = await store.get(args.saga_id)
        if state is None:
            print(f"no saga {args.saga_id!r}")
            return 1
        states = [state]
    else:
        states = await store.list(limit=args.limit)
    bad = 0
    for state in states:
        problems = verify(state, graph)
        bad += bool(problems)
        for problem in problems:
            print(f"saga {state['id']}: {problem}")
    print(f"verified {len(states)} saga(s): {bad} departed from the graph")
    return 1 if bad else 0


def _show(state: dict[str, Any], jaeger_url: str) -> None:
    start = state["started_at"]
    print(f"saga {state['id']} ({state['saga']}): {state['status']}")
    print(f"  started {_time(start)}, ended {_time(state['ended_at'])}, deadline {_time(state['deadline_at'])}")
    parts = (state.get("trace") or "").split("-")
    if len(parts) == 4 and parts[3] == "00":
        print(f"  trace {parts[1]} (not sampled: OTEL_TRACES_SAMPLER left this saga out)")
    elif len(parts) == 4:
        print(f"  trace {parts[1]}  {jaeger_url.rstrip('/')}/trace/{parts[1]}")
    else:
        print("  trace: none recorded (the tracker runs without OTEL_EXPORTER_OTLP_ENDPOINT)")
    print("steps:")
    steps = sorted(state["steps"].items(), key=lambda kv: (kv[1]["started_at"] is None, kv[1]["started_at"] or 0))
    for step_id, step in steps:
        kind = "compensation" if step["compensation"] else "step"
        offset = f"+{step['started_at'] - start} ms" if step["started_at"] is not None else ""
        took = _span(step["started_at"], step["finished_at"])
        attempts = f", {step['attempts']} attempt(s)" if step["attempts"] > 1 else ""
        print(f"  {step['status']:12} {step_id:40} {kind:12} {offset:>10} {took:>9}{attempts}")
    print("events:")
    for event in state["events"]:
        late = "  (after the saga ended)" if event["id"] in state["late"] else ""
        print(f"  +{event['at'] - start:>6} ms  {event['type']:34} from {event['producer']:18} {event['id']}{late}")
