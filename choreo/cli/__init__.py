"""The ``choreo`` command line: thin wrappers over the public API.

    choreo run MODULE:SERVICE        run one service until SIGTERM/SIGINT
    choreo publish TYPE JSON         publish one event and wait for the broker's ack
    choreo dev                       run the embedded broker and Redis until Ctrl-C
    choreo schema check              validate schemas and models, and compatibility against git
    choreo graph [check] TARGET...   check or draw the choreography graph
    choreo saga list | show ID       saga state recorded by the saga tracker
    choreo dlq list | show | replay | purge   dead-letter topics
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from choreo.errors import ChoreoError
from choreo.logs import configure_logging
from choreo.settings import Settings

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _parser() -> argparse.ArgumentParser:
    from choreo.cli import dev, dlq, graph, publish, run, saga, schema

    parser = argparse.ArgumentParser(prog="choreo", description="Event-driven choreography over Kafka.")
    parser.add_argument("--log-level", type=str.upper, choices=_LEVELS, default=None, metavar="LEVEL",
                        help="DEBUG, INFO, WARNING or ERROR (default: CHOREO_LOG_LEVEL, else INFO); "
                             "CHOREO_LOG_FORMAT=json logs one JSON object per line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (run, publish, dev, schema, graph, saga, dlq):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(Settings.from_env(), level=args.log_level)
        return int(args.func(args))
    except ChoreoError as exc:
        print(f"choreo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
