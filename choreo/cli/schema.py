"""``choreo schema check``: every schema valid, every model matching, no incompatible change vs git."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from choreo.cli._load import load
from choreo.errors import ChoreoError


def register(commands: Any) -> None:
    p = commands.add_parser("schema", help="schema tools")
    sub = p.add_subparsers(dest="schema_command", required=True, metavar="SUBCOMMAND")
    check = sub.add_parser("check", help="validate schemas and models; fail on an incompatible change")
    check.add_argument("--dir", default="schemas", type=Path, help="schema directory (default: schemas)")
    check.add_argument("--ref", default="HEAD", help="git revision to compare against (default: HEAD)")
    check.add_argument(
        "--models", action="append", default=[], metavar="MODULE",
        help="import MODULE so its Event classes are checked against their schemas (repeatable)",
    )
    check.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from choreo.schemas import check_directory

    problems = []
    for module in args.models:
        try:
            load(f"{module}:__name__", "models")  # binding checks each Event against its schema
        except ChoreoError as exc:
            problems.append(f"{module}: {exc}")
    if not args.dir.is_dir():
        problems.append(f"{args.dir}: no such schema directory")
    else:
        problems.extend(check_directory(args.dir, git_ref=args.ref))
    for problem in problems:
        print(f"error: {problem}")
    if problems:
        print(f"schema check failed: {len(problems)} problem(s)")
        return 1
    print(f"schema check passed: {args.dir}")
    return 0
