"""``choreo graph [check] TARGET...``: the choreography graph of services and sagas.

A TARGET is ``module:attribute`` naming a Service, a Saga, or a list of them (e.g.
``services.checkout:system``). ``check`` exits 1 and names the path of every problem found.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from choreo.cli._load import load
from choreo.errors import ConfigurationError
from choreo.graph import FlowGraph
from choreo.saga import Saga
from choreo.service import Service


def register(commands: Any) -> None:
    p = commands.add_parser("graph", help="check or draw the choreography graph (Mermaid, Graphviz DOT)")
    p.add_argument("targets", nargs="+", metavar="[check] MODULE:ATTR",
                   help="'check' to validate; then services, sagas or lists of them")
    p.add_argument("--format", choices=["text", "mermaid", "dot"], default="text")
    p.add_argument("-o", "--output", type=Path, help="write the drawing to this file instead of stdout")
    p.set_defaults(func=command)


def collect(obj: Any, where: str, services: list[Service], sagas: list[Saga]) -> None:
    if isinstance(obj, Service):
        services.append(obj)
    elif isinstance(obj, Saga):
        sagas.append(obj)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        for item in obj:
            collect(item, where, services, sagas)
    else:
        raise ConfigurationError(f"{where} is a {type(obj).__name__}, not a Service, a Saga or a list of them")


def command(args: argparse.Namespace) -> int:
    targets = list(args.targets)
    checking = targets[0] == "check"
    if checking:
        targets = targets[1:]
    if not targets:
        raise ConfigurationError("name at least one MODULE:ATTR holding services or sagas")
    services: list[Service] = []
    sagas: list[Saga] = []
    for target in targets:
        collect(load(target, "services or sagas"), target, services, sagas)
    graph = FlowGraph.build(services, sagas)
    if checking:
        problems = graph.check()
        for problem in problems:
            print(f"error: {problem}")
        if problems:
            print(f"graph check failed: {len(problems)} problem(s)")
            return 1
        print(f"graph check passed: {len(graph.steps)} handlers in {len(services)} services, {len(sagas)} saga(s)")
        return 0
    if args.format == "mermaid":
        text = graph.to_mermaid()
    elif args.format == "dot":
        text = graph.to_dot()
    else:
        lines = ["topological order (forward steps, then compensations):"]
        for number, step in enumerate(graph.topological_order(), 1):
            kind = "compensation" if step.compensation else "step"
            undoes = f", undoes {step.service}.{step.undoes}" if step.undoes else ""
            emits = ", ".join(sorted(e.__name__ for e in step.emits)) or "-"
            lines.append(f"{number:3}. {step.id:40} {kind}{undoes}: {step.consumes.__name__} -> {emits}")
        text = "\n".join(lines) + "\n"
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
