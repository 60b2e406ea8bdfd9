#!/usr/bin/env python3
"""Run a real single-node KRaft Apache Kafka broker for `make test-kafka`.

The broker's jars come from Maven Central through scripts/kafka/pom.xml and are cached outside
the repo, so no Kafka code or binary is committed and nothing is installed globally.

    apache_kafka.py fetch
    apache_kafka.py start --state-dir DIR      # prints 127.0.0.1:PORT, also in DIR/bootstrap
    apache_kafka.py stop --state-dir DIR
    apache_kafka.py run --state-dir DIR -- CMD ...

Environment:
    CHOREO_CACHE                 cache root (default ~/.cache/choreo)
    CHOREO_KAFKA_VERSION         broker version (default below)
    CHOREO_KAFKA_START_TIMEOUT   seconds to wait for the broker to be ready (default 90)
    CHOREO_KAFKA_HEAP            JVM -Xmx (default 512m)

Exit codes: 0 ok, 1 failure, 2 Java or Maven missing (or too old).
`run` exits with the command's code (128+N if it died of signal N).

Python 3.11, standard library only. confluent_kafka is used as a readiness probe if importable.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_VERSION = "4.4.0"
MIN_JAVA = 17
REPO_ROOT = Path(__file__).resolve().parent.parent
POM = REPO_ROOT / "scripts" / "kafka" / "pom.xml"
MARKER = ".complete"
BROKER_MAIN = "kafka.Kafka"

# Faster start-up on a small shared machine: C1 only and the serial collector cut JIT and GC
# threads, which is where a 2-core box spends its first seconds. Throughput is irrelevant here.
JVM_FLAGS = [
    "-Xms64m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-Djava.awt.headless=true",
    # Kafka stops itself from its own shutdown hook; log4j's racing hook would drop those lines.
    "-Dlog4j2.shutdownHookEnabled=false",
]

# Kafka's defaults assume a 3-node production cluster. Internal topics must be RF 1 here (a higher
# factor can never be met, so groups and transactions would never work), and one partition each is
# plenty: 50 would only add logs to create and load before the first group or transaction can start.
BROKER_PROPERTIES = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "num.partitions": "1",
    "auto.create.topics.enable": "true",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "share.coordinator.state.topic.num.partitions": "1",
    # Without this every first join of a group waits 3 s for more members that never come.
    "group.initial.rebalance.delay.ms": "0",
    # Fewer idle threads on a 2-core machine shared with the tests (the defaults are higher).
    "num.network.threads": "2",
    "num.io.threads": "4",
    "num.recovery.threads.per.data.dir": "1",
}

# The broker's stdout is the only log we keep: one file that `start` can show when it fails.
LOG4J2_PROPERTIES = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
# Each client and server config object dumps every setting at INFO: most of the log, none of the use.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
"""


class Fatal(Exception):
    """An error to print without a traceback; code 2 means a missing prerequisite."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def log(message: str) -> None:
    # stdout is reserved for the bootstrap address so `$(apache_kafka.py start ...)` works.
    print(f"apache_kafka: {message}", file=sys.stderr, flush=True)


def kafka_version() -> str:
    return os.environ.get("CHOREO_KAFKA_VERSION") or DEFAULT_VERSION


def cache_root() -> Path:
    root = os.environ.get("CHOREO_CACHE") or str(Path.home() / ".cache" / "choreo")
    return Path(root).expanduser()


def install_dir(version: str) -> Path:
    return cache_root() / f"kafka-{version}"


def libs_dir(version: str) -> Path:
    return install_dir(version) / "libs"


def is_fetched(version: str) -> bool:
    return (install_dir(version) / MARKER).is_file() and libs_dir(version).is_dir()


# --- prerequisites -------------------------------------------------------------------------------


def require_java() -> str:
    java = shutil.which("java")
    if not java:
        raise Fatal(f"Java {MIN_JAVA}+ is required for make test-kafka: java not found on PATH", 2)
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30
        ).stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Fatal(f"Java {MIN_JAVA}+ is required for make test-kafka: {java} -version failed: {exc}", 2)
    # `java -version` prints e.g. `openjdk version "17.0.15"` or, for Java 8, `"1.8.0_392"`.
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        raise Fatal(f"Java {MIN_JAVA}+ is required for make test-kafka: cannot read the version of {java}:\n{out}", 2)
    major = int(match.group(1))
    if major == 1 and match.group(2):
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise Fatal(f"Java {MIN_JAVA}+ is required for make test-kafka: {java} is Java {major}", 2)
    return java


def require_mvn() -> str:
    mvn = shutil.which("mvn")
    if not mvn:
        raise Fatal(
            "Maven is required to fetch the Kafka broker jars for make test-kafka: mvn not found on PATH", 2
        )
    return mvn


# --- fetch ---------------------------------------------------------------------------------------


def fetch(version: str) -> Path:
    require_java()
    target = libs_dir(version)
    if is_fetched(version):
        return target
    mvn = require_mvn()
    if not POM.is_file():
        raise Fatal(f"{POM} is missing")
    home = install_dir(version)
    home.mkdir(parents=True, exist_ok=True)
    # Copy into a private folder and rename it into place, so an interrupted or concurrent fetch
    # never leaves a half-filled libs/ that a later start would trust.
    staging = Path(tempfile.mkdtemp(prefix="libs.partial-", dir=home))
    cmd = [
        mvn, "-B", "-q",
        "-f", str(POM),
        # Keeps Maven's downloads inside the cache folder rather than ~/.m2.
        f"-Dmaven.repo.local={cache_root() / 'maven-repo'}",
        f"-Dkafka.version={version}",
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
    ]
    log(f"fetching Apache Kafka {version} jars with Maven into {target}")
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=POM.parent)
    jars = sorted(p.name for p in staging.glob("*.jar"))
    if proc.returncode != 0 or not any(j.startswith(f"kafka_2.13-{version}") for j in jars):
        shutil.rmtree(staging, ignore_errors=True)
        output = (proc.stdout + proc.stderr).strip().splitlines()
        tail = "\n".join(output[-40:]) or "(no output)"
        raise Fatal(
            f"mvn could not fetch org.apache.kafka:kafka_2.13:{version} (exit {proc.returncode}).\n"
            f"command: {' '.join(cmd)}\n{tail}"
        )
    if target.exists():
        # Another fetch won the race, or a previous one died before writing the marker.
        if is_fetched(version):
            shutil.rmtree(staging, ignore_errors=True)
            return target
        shutil.rmtree(target)
    staging.rename(target)
    (home / MARKER).write_text("\n".join(jars) + "\n")
    log(f"fetched {len(jars)} jars in {time.monotonic() - started:.1f}s")
    return target


# --- process helpers -----------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    # Reap it first if it is our own child (the `run` case), otherwise a zombie looks alive.
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def is_our_broker(pid: int, state_dir: Path) -> bool:
    """True if pid is a Kafka broker started from state_dir, so a recycled pid is never killed."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        # No /proc (not Linux): trust the pid file, which only we write.
        return pid_alive(pid)
    args = [a.decode(errors="replace") for a in argv]
    return BROKER_MAIN in args and str(state_dir / "server.properties") in args


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def read_pid(state_dir: Path) -> int | None:
    try:
        return int((state_dir / "broker.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no broker log)"
    return "\n".join(text[-lines:]) or "(the broker log is empty)"


def free_ports(count: int) -> list[int]:
    # Hold every socket until all are bound so the OS cannot hand out the same port twice.
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# Run in a child interpreter: librdkafka clients created and destroyed in quick succession made
# this script itself segfault in about 1 of 3 starts, which left the broker orphaned.
# Exit 0: metadata answered and the group coordinator is loaded; 3: confluent_kafka missing.
PROBE = r"""
import os, sys, time
try:
    from confluent_kafka import ConsumerGroupTopicPartitions
    from confluent_kafka.admin import AdminClient
except ImportError:
    sys.exit(3)
bootstrap, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
# log_level 0 hides librdkafka's complaints while the broker settles; they are expected.
admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
while time.monotonic() < deadline:
    try:
        if admin.list_topics(timeout=3).brokers:
            break
    except Exception:
        pass
    time.sleep(0.2)
else:
    os._exit(1)
# Left to the first test's consumer, __consumer_offsets is auto-created mid-join and librdkafka
# asks for the coordinator again only ~3 s later. Looking up a group's offsets creates and loads
# the topic now; the group itself is never joined, so it does not exist afterwards.
group = "choreo-apache-kafka-warmup"
while time.monotonic() < deadline:
    try:
        admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)], request_timeout=5)[group].result()
        break
    except Exception:
        time.sleep(0.2)
# os._exit skips destroying the client at interpreter exit, which is where the crashes were.
os._exit(0)
"""


def probe_clients(bootstrap: str, seconds: float) -> str:
    """'ready', 'no-client' (confluent_kafka not importable), 'crashed' or 'not-ready'."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", PROBE, bootstrap, f"{max(seconds, 1):.1f}"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=max(seconds, 1) + 15,
        )
    except subprocess.TimeoutExpired:
        return "not-ready"
    return {0: "ready", 3: "no-client"}.get(proc.returncode, "crashed" if proc.returncode < 0 else "not-ready")


# --- start / stop --------------------------------------------------------------------------------


def write_config(state_dir: Path, port: int, controller_port: int) -> Path:
    props = dict(BROKER_PROPERTIES)
    props.update(
        {
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
            "log.dirs": str(state_dir / "data"),
        }
    )
    path = state_dir / "server.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    (state_dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)
    return path


def format_storage(java: str, libs: Path, config: Path, state_dir: Path) -> None:
    # A KRaft cluster id is 16 random bytes in unpadded base64url, which is what random-uuid prints.
    cluster_id = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
    cmd = [
        java, *JVM_FLAGS, "-Xmx256m",
        f"-Dlog4j2.configurationFile={state_dir / 'log4j2.properties'}",
        "-cp", f"{libs}/*",
        "kafka.tools.StorageTool", "format",
        "-t", cluster_id, "-c", str(config),
        # Kafka 4.x needs the initial controller set written at format time (KIP-853 dynamic quorum).
        "--standalone",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=state_dir)
    if proc.returncode != 0:
        raise Fatal(f"formatting the broker storage failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")


def launch(java: str, libs: Path, config: Path, state_dir: Path) -> int:
    heap = os.environ.get("CHOREO_KAFKA_HEAP") or "512m"
    cmd = [
        java, f"-Xmx{heap}", *JVM_FLAGS,
        f"-Dlog4j2.configurationFile={state_dir / 'log4j2.properties'}",
        f"-Dkafka.logs.dir={state_dir}",
        "-cp", f"{libs}/*",
        BROKER_MAIN, str(config),
    ]
    with open(state_dir / "broker.log", "wb") as out:
        # A new session keeps the terminal's Ctrl-C away from the broker: `run` must stop it only
        # after the test command has finished its own teardown against it.
        proc = subprocess.Popen(
            cmd, cwd=state_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (state_dir / "broker.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def wait_ready(pid: int, port: int, state_dir: Path, deadline: float) -> str | None:
    """Return None when ready, else why not ("bind" if the port was taken under us)."""
    bootstrap = f"127.0.0.1:{port}"
    logfile = state_dir / "broker.log"
    crashes = 0
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            text = log_tail(logfile, 400)
            return "bind" if "BindException" in text or "Address already in use" in text else "exited"
        # The port opens before the broker is registered and unfenced; "Kafka Server started" is
        # logged only after that, and a metadata answer proves clients can really use it.
        if "Kafka Server started" in log_tail(logfile, 400) and port_accepts(port):
            result = probe_clients(bootstrap, deadline - time.monotonic())
            if result == "ready" or result == "no-client":
                return None
            if result == "crashed":
                crashes += 1
                if crashes >= 2:
                    log("the confluent_kafka readiness probe keeps crashing; trusting the broker log and port")
                    return None
            continue
        time.sleep(0.2)
    return "timeout"


def stop(state_dir: Path, grace: float = 20.0) -> None:
    pid = read_pid(state_dir)
    pidfile = state_dir / "broker.pid"
    if pid is None:
        return
    if not pid_alive(pid) or not is_our_broker(pid, state_dir):
        pidfile.unlink(missing_ok=True)
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    if pid_alive(pid):
        log(f"broker (pid {pid}) ignored SIGTERM for {grace:.0f}s; sending SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    (state_dir / "bootstrap").unlink(missing_ok=True)


def start(state_dir: Path, version: str, replace_leftover: bool = False) -> str:
    java = require_java()
    libs = fetch(version)
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    pid = read_pid(state_dir)
    if pid is not None and pid_alive(pid) and is_our_broker(pid, state_dir):
        if not replace_leftover:
            raise Fatal(f"a broker from {state_dir} is already running (pid {pid}); stop it first")
        runner = _read_int(state_dir / "runner.pid")
        if runner is not None and runner != os.getpid() and pid_alive(runner):
            # Not a leftover: another `run` is using it right now. Stopping it would fail that run.
            raise Fatal(f"another run (pid {runner}) is using the broker in {state_dir}; "
                        "give this run its own --state-dir (KAFKA_STATE=...)")
        log(f"stopping a broker left over from an earlier run (pid {pid})")
        stop(state_dir)
    timeout = float(os.environ.get("CHOREO_KAFKA_START_TIMEOUT") or 90)
    deadline = time.monotonic() + timeout
    began = time.monotonic()
    # Another process can take a free port between our check and the broker's bind; retry then.
    for attempt in range(3):
        # Each start is a fresh, empty cluster: tests must not see an earlier run's topics.
        shutil.rmtree(state_dir / "data", ignore_errors=True)
        port, controller_port = free_ports(2)
        config = write_config(state_dir, port, controller_port)
        format_storage(java, libs, config, state_dir)
        pid = launch(java, libs, config, state_dir)
        try:
            why = wait_ready(pid, port, state_dir, deadline)
        except BaseException:
            # Ctrl-C while waiting: the broker is in its own session and would outlive us.
            stop(state_dir, grace=5)
            raise
        if why is None:
            bootstrap = f"127.0.0.1:{port}"
            (state_dir / "bootstrap").write_text(bootstrap + "\n")
            log(f"Apache Kafka {version} ready at {bootstrap} in {time.monotonic() - began:.1f}s (pid {pid})")
            return bootstrap
        stop(state_dir, grace=5)
        if why != "bind" or attempt == 2:
            reason = {
                "exited": "the broker exited during start-up",
                "bind": "the broker could not bind its ports",
                "timeout": f"the broker was not ready within {timeout:g}s",
            }[why]
            raise Fatal(f"{reason}; last lines of {state_dir / 'broker.log'}:\n{log_tail(state_dir / 'broker.log')}")
        log("port taken during start-up; retrying with new ports")
    raise AssertionError("unreachable")


# --- run -----------------------------------------------------------------------------------------


def run(state_dir: Path, version: str, command: list[str]) -> int:
    if not command:
        raise Fatal("run needs a command after --, e.g. run --state-dir DIR -- pytest tests/integration")
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        if stopping:
            return  # already on the way out; let stop() finish so no broker is left behind
        if child is None:
            raise KeyboardInterrupt  # abort start-up; the finally below stops the broker
        if signum != signal.SIGINT and child.poll() is None:
            # SIGTERM/SIGHUP are usually aimed at us alone (a CI timeout, make), so pass them on.
            child.send_signal(signum)
        # Ctrl-C already reached the command (same process group). We wait for it to finish its
        # own teardown against the broker, and stop the broker after that.

    # A Python handler, not SIG_IGN: an ignored SIGINT would be inherited by the command and
    # Ctrl-C would no longer interrupt pytest.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            bootstrap = start(state_dir, version, replace_leftover=True)
            (state_dir / "runner.pid").write_text(f"{os.getpid()}\n")
        except KeyboardInterrupt:
            raise Fatal("interrupted while starting the broker") from None
        env = dict(os.environ, CHOREO_KAFKA=bootstrap, CHOREO_BROKER="kafka")
        try:
            child = subprocess.Popen(command, env=env)
        except OSError as exc:
            raise Fatal(f"cannot run {command[0]!r}: {exc}") from None
        code = child.wait()
        return 128 - code if code < 0 else code
    finally:
        stopping = True
        try:
            stop(state_dir.resolve())
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# --- CLI -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Single-node KRaft Apache Kafka broker for integration tests (make test-kafka)."
    )
    parser.add_argument(
        "--kafka-version", dest="kafka_version", default=kafka_version(),
        help=f"Kafka version (default: $CHOREO_KAFKA_VERSION or {DEFAULT_VERSION})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download the broker jars into the cache (no-op when cached)")
    for name, text in (
        ("start", "start a broker; prints its bootstrap address"),
        ("stop", "stop the broker of a state dir (idempotent)"),
        ("run", "start a broker, run a command against it, stop it"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state-dir", required=True, type=Path, help="folder for config, data, log and pid")
        if name == "run":
            p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)

    try:
        if args.command == "fetch":
            libs = fetch(args.kafka_version)
            print(libs)
            return 0
        if args.command == "start":
            print(start(args.state_dir, args.kafka_version), flush=True)
            return 0
        if args.command == "stop":
            stop(args.state_dir.resolve())
            return 0
        command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return run(args.state_dir, args.kafka_version, command)
    except Fatal as exc:
        log(str(exc))
        return exc.code
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
