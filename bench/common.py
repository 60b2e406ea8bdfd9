"""What every bench shares: which broker it runs on, where its figures go, and the header it prints.

A bench with ``--broker-from-env`` uses the servers named by ``CHOREO_KAFKA``/``CHOREO_REDIS`` and
starts the embedded dev stack only for what is not named. ``make bench BROKER=kafka`` runs each bench
under ``scripts/apache_kafka.py run``, which sets ``CHOREO_KAFKA`` and ``CHOREO_BROKER=kafka`` but no
Redis: the bench then talks to Apache Kafka and to the dev stack's Redis (what ``tests/conftest.py``
does under ``make test-kafka``).

Figures from one broker never overwrite another's: the embedded Tansu writes ``bench/results.json``,
any other broker ``bench/results-<kind>.json`` (``results-kafka.json`` for Apache Kafka).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.results import RESULTS, write_section
from choreo import Settings

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = "tansu"
# An external broker that does not say what it is (CHOREO_BROKER unset) is not assumed to be Tansu.
UNNAMED = "external"
_KIND = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_NAMES = {"tansu": "Tansu", "kafka": "Apache Kafka"}


@dataclass(frozen=True)
class Broker:
    settings: Settings
    kind: str  # "tansu" (embedded), "kafka" (scripts/apache_kafka.py), or CHOREO_BROKER's value
    description: str  # for the "broker:" header line


def broker_kind(from_env: bool) -> str:
    """The kind of broker :func:`broker` will use, known before it starts (to pick the results file)."""
    if not (from_env and os.environ.get("CHOREO_KAFKA")):
        return EMBEDDED
    kind = os.environ.get("CHOREO_BROKER") or UNNAMED
    if not _KIND.match(kind):
        # It becomes part of a file name: refuse rather than write somewhere surprising.
        raise SystemExit(f"CHOREO_BROKER={kind!r}: expected a short lower-case name such as tansu or kafka")
    return kind


def results_path(kind: str) -> Path:
    """Where a bench on a broker of ``kind`` writes by default."""
    return RESULTS if kind == EMBEDDED else RESULTS.with_name(f"results-{kind}.json")


@contextmanager
def broker(from_env: bool) -> Iterator[Broker]:
    """The broker and Redis to run on; the dev stack is started (and stopped after) for what the
    environment does not name, or for both without ``from_env``."""
    kafka = os.environ.get("CHOREO_KAFKA") if from_env else None
    redis = os.environ.get("CHOREO_REDIS") if from_env else None
    kind = broker_kind(from_env)
    name = _NAMES.get(kind, f"{kind} broker")
    if kafka and redis:
        settings = Settings.from_env()
        yield Broker(settings, kind, f"{name} at {settings.kafka_bootstrap}, Redis at {settings.redis_url} "
                                     "(from the environment)")
        return
    from choreo.devstack import start_dev_stack

    with start_dev_stack() as stack:
        if kafka:
            # The stack's Tansu idles: only its Redis is used.
            settings = Settings.from_env(redis_url=stack.redis_url)
            yield Broker(settings, kind, f"{name} at {kafka} (CHOREO_KAFKA), Redis of the embedded dev stack")
        elif redis:
            settings = Settings.from_env(kafka_bootstrap=stack.kafka_bootstrap)
            yield Broker(settings, kind, f"embedded Tansu, Redis at {redis} (CHOREO_REDIS)")
        else:
            settings = Settings(kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url)
            why = " (CHOREO_KAFKA not set)" if from_env else ""
            yield Broker(settings, kind, f"embedded dev stack (Tansu + Redis){why}")


def total_memory() -> str:
    """The machine's memory, e.g. ``23.5 GiB`` (``?`` where /proc/meminfo cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "?"


def machine_lines(module: str, argv: Sequence[str], broker: str) -> list[str]:
    """``command:``, ``machine:``, ``date:`` and ``broker:`` lines: what a figure was measured on."""
    memory = total_memory()
    try:
        # The figures depend on the code that ran: name the commit and whether the tree was dirty, not
        # counting the results files, which the benches before this one in `make bench` have just written.
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False, cwd=REPO).stdout.strip() or "?"
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)bench/results*"], capture_output=True, text=True, check=False,
                                 cwd=REPO).stdout.strip()
        commit += "-dirty" if changed else ""
    except OSError:
        commit = "?"
    python = os.path.relpath(sys.executable)  # .venv/bin/python when it is below the working directory
    return [
        f"command: {shlex.join([sys.executable if python.startswith('..') else python, '-m', module, *argv])}",
        f"machine: {os.cpu_count()} cores, {memory} memory, Python {sys.version.split()[0]}, commit {commit}",
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"broker: {broker}",
    ]


def write_meta(path: Path, module: str, lines: Sequence[str]) -> Path:
    """Record ``lines`` (from :func:`machine_lines`) under ``meta.<bench>`` of the results file, so the
    chart can say when and on what each section was measured; other benches' entries are kept."""
    meta: dict[str, object] = {}
    if path.exists():
        existing = json.loads(path.read_text()).get("meta", {})
        if isinstance(existing, dict):
            meta = existing
    entry = {}
    for line in lines:
        key, sep, value = line.partition(": ")
        if not sep:
            raise ValueError(f"meta line without 'key: value': {line!r}")
        entry[key] = value
    meta[module.rsplit(".", 1)[-1]] = entry
    return write_section("meta", meta, path=path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def otlp_sink() -> Iterator[dict[str, str]]:
    """A running :class:`OtlpSink` on a free port, for as long as the block runs; yields the ``OTEL_*``
    variables that point an OTLP/HTTP exporter at it."""
    sink = ThreadingHTTPServer(("127.0.0.1", 0), OtlpSink)
    threading.Thread(target=sink.serve_forever, name="otlp-sink", daemon=True).start()
    try:
        yield {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}",
               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    finally:
        sink.shutdown()
        sink.server_close()


class OtlpSink(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and drops them: the cost measured is the services', not a backend's."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return None
