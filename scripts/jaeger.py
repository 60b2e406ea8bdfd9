#!/usr/bin/env python3
"""Run a real Jaeger v2 (in-memory storage) for `make test-kafka`, so tests can read traces back.

Jaeger is built from source with the Go toolchain from the Go module proxy and cached outside the
repo, so no Jaeger code or binary is committed and nothing is installed globally. Its Go module
path has no /v2 suffix: the v1.7x tags hold the v2 binary (an OpenTelemetry Collector distribution
configured in YAML) at cmd/jaeger, e.g. v1.76.0 is Jaeger v2.13.0.

    jaeger.py build                               # prints the binary's path
    jaeger.py run [--state-dir DIR] -- CMD ...

`run` starts Jaeger with every listener on a free 127.0.0.1 port, waits until its query API
answers, runs CMD with these variables added, then stops Jaeger:

    CHOREO_JAEGER_OTLP_HTTP   http://127.0.0.1:PORT  OTLP/HTTP base URL (for OTEL_EXPORTER_OTLP_ENDPOINT)
    CHOREO_JAEGER_OTLP_GRPC   http://127.0.0.1:PORT  OTLP/gRPC endpoint
    CHOREO_JAEGER_QUERY       http://127.0.0.1:PORT  query API (/api/traces, /api/v3/...) and UI

Environment:
    CHOREO_CACHE                  cache root (default ~/.cache/choreo); the binary goes into
                                  jaeger-<version>/bin, Go's module and build caches into go/
    CHOREO_JAEGER_VERSION         Go module version of github.com/jaegertracing/jaeger (default below)
    CHOREO_JAEGER_START_TIMEOUT   seconds to wait for Jaeger to be ready (default 60)
    CHOREO_GO                     the go command (default: go on PATH, else /usr/local/go/bin/go)

Exit codes: 0 ok, 1 failure, 2 Go missing (or too old).
`run` exits with the command's code (128+N if it died of signal N).

Python 3.11, standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TextIO

DEFAULT_VERSION = "1.76.0"
MODULE = "github.com/jaegertracing/jaeger"
PACKAGE = f"{MODULE}/cmd/jaeger"
GO_FALLBACKS = ("/usr/local/go/bin/go", "/usr/lib/go/bin/go")

# Every listener the default all-in-one config opens is either dropped here or put on a free
# loopback port: the jaeger/zipkin receivers (14250, 14268, 6831, 6832, 9411), remote_sampling
# (5778, 5779), healthcheckv2 (13133), expvar (27777) and zpages (27778) are not configured, and
# `metrics: level: none` turns off the collector's own Prometheus endpoint (8888). The query
# extension always opens an HTTP and a gRPC server, so both get free ports. Its self-tracing is off:
# it would export Jaeger's own spans to whatever OTEL_* the environment names.
CONFIG = """\
# Written by scripts/jaeger.py for one run; every listener is on 127.0.0.1.
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    metrics:
      level: none
    logs:
      level: info

extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memstore
    enable_tracing: false
    http:
      endpoint: 127.0.0.1:{query_http}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}

receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp_grpc}
      http:
        endpoint: 127.0.0.1:{otlp_http}

processors:
  batch:
    # Spans show up in the query API within ~0.1 s rather than the default 0.2 s.
    timeout: 100ms

exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""
PORT_NAMES = ("otlp_http", "otlp_grpc", "query_http", "query_grpc")


class Fatal(Exception):
    """An error to print without a traceback; code 2 means a missing prerequisite."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def log(message: str) -> None:
    # stdout is reserved for what a subcommand prints (the binary's path for `build`).
    print(f"jaeger: {message}", file=sys.stderr, flush=True)


def jaeger_version() -> str:
    return (os.environ.get("CHOREO_JAEGER_VERSION") or DEFAULT_VERSION).removeprefix("v")


def cache_root() -> Path:
    root = os.environ.get("CHOREO_CACHE") or str(Path.home() / ".cache" / "choreo")
    return Path(root).expanduser()


def install_dir(version: str) -> Path:
    return cache_root() / f"jaeger-{version}"


def binary_path(version: str) -> Path:
    return install_dir(version) / "bin" / "jaeger"


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# --- build ---------------------------------------------------------------------------------------


def find_go() -> str:
    go = os.environ.get("CHOREO_GO") or shutil.which("go")
    if go and not shutil.which(go):
        raise Fatal(f"CHOREO_GO={go} is not an executable go command", 2)
    if not go:
        go = next((p for p in GO_FALLBACKS if os.access(p, os.X_OK)), None)
    if not go:
        raise Fatal(
            "Go 1.24+ is required to build Jaeger for make test-kafka: go not found on PATH "
            "(install it from https://go.dev/dl/ or your distribution's golang package, "
            "or set CHOREO_GO to the go command)", 2,
        )
    return go


def go_env() -> dict[str, str]:
    """Go's caches under the cache root, so a second build is a cache hit and nothing lands in ~/go."""
    root = cache_root() / "go"
    env = dict(os.environ)
    env.update(
        GOPATH=str(root / "path"),
        GOMODCACHE=str(root / "mod"),
        GOCACHE=str(root / "build"),
        # Module cache files are read-only by default, which makes `rm -rf ~/.cache/choreo` fail.
        GOFLAGS="-modcacherw",
        # The go directive of Jaeger's go.mod is checked below with a clear message; never let go
        # fetch another toolchain by itself.
        GOTOOLCHAIN="local",
        CGO_ENABLED="0",
        GO111MODULE="on",
    )
    return env


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def go_run(go: str, args: list[str], cwd: Path, env: dict[str, str], what: str, logfile: Path,
           progress: str = "", total: int = 0) -> str:
    """Run a go command; its stderr goes to the build log, with a progress line every 20 s."""
    started = time.monotonic()
    count = 0
    with open(logfile, "a") as out:
        out.write(f"\n$ go {' '.join(args)}\n")
        out.flush()
        proc = subprocess.Popen([go, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def pump() -> None:
            nonlocal count
            assert proc.stderr is not None
            for line in proc.stderr:
                out.write(line)
                out.flush()
                count += 1

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        stdout_chunks: list[str] = []
        stdout_reader = threading.Thread(
            target=lambda: stdout_chunks.append(proc.stdout.read() if proc.stdout else ""), daemon=True
        )
        stdout_reader.start()
        try:
            while True:
                try:
                    proc.wait(timeout=20)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - started
                    if progress:
                        of = f" of at most {total}" if total else ""
                        log(f"  ... {what}: {count}{of} {progress} so far ({elapsed:.0f}s)")
                    else:
                        log(f"  ... {what} ({elapsed:.0f}s)")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        reader.join()
        stdout_reader.join()
    if proc.returncode != 0:
        raise Fatal(f"{what} failed (go {' '.join(args[:2])} exited {proc.returncode}); "
                    f"last lines of {logfile}:\n{log_tail(logfile, 30)}")
    return "".join(stdout_chunks)


def parse_go_mod(text: str) -> tuple[str, list[str]]:
    """The go directive and the replace directives (as `old => new version` lines) of a go.mod."""
    go_directive = ""
    replaces: list[str] = []
    in_block = False
    for raw in text.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line:
            continue
        if in_block:
            if line == ")":
                in_block = False
            else:
                replaces.append(line)
        elif line.startswith("go "):
            go_directive = line.split()[1]
        elif line.startswith("replace ("):
            in_block = True
        elif line.startswith("replace "):
            replaces.append(line[len("replace "):].strip())
    return go_directive, replaces


def v2_name(module_dir: Path, version: str) -> str:
    """Jaeger's own name for the release, from its changelog (`v1.76.0 / v2.13.0 (date)`)."""
    with contextlib.suppress(OSError):
        text = (module_dir / "CHANGELOG.md").read_text(errors="replace")
        match = re.search(rf"^v{re.escape(version)} / (v2\.\d+\.\d+)", text, re.MULTILINE)
        if match:
            return match.group(1)
    return f"v{version}"


def build(version: str) -> Path:
    binary = binary_path(version)
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    home = install_dir(version)
    home.mkdir(parents=True, exist_ok=True)
    # Two runs building at once (two checkouts, make -j) would share the caches: one builds, the
    # other waits and then finds the binary.
    with open(home / ".build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another build of Jaeger v{version} is running; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():
            return binary
        return _build_locked(version, home, binary)


def _build_locked(version: str, home: Path, binary: Path) -> Path:
    go = find_go()
    env = go_env()
    try:
        go_version = subprocess.run([go, "env", "GOVERSION"], env=env, capture_output=True, text=True,
                                    timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Fatal(f"Go is required to build Jaeger for make test-kafka: {go} env GOVERSION failed: {exc}", 2)
    logfile = home / "build.log"
    logfile.write_text(f"building {PACKAGE}@v{version} with {go} ({go_version})\n")
    log(f"building Jaeger from {PACKAGE}@v{version} with {go_version} into {binary.parent} "
        f"(the first build takes several minutes; the log is {logfile})")
    started = time.monotonic()

    # 1. The module's sources, for its go.mod (go version, replace directives) and changelog.
    out = go_run(go, ["mod", "download", "-json", f"{MODULE}@v{version}"], home, env,
                 f"downloading {MODULE}@v{version}", logfile)
    try:
        info = json.loads(out)
    except json.JSONDecodeError:
        raise Fatal(f"cannot read the output of go mod download:\n{out[-2000:]}") from None
    if info.get("Error"):
        raise Fatal(f"go mod download {MODULE}@v{version}: {info['Error']}")
    go_directive, replaces = parse_go_mod(Path(info["GoMod"]).read_text())
    if go_directive and version_tuple(go_version) < version_tuple(go_directive):
        raise Fatal(f"Jaeger v{version} needs Go {go_directive} or newer to build; {go} is {go_version}", 2)
    local = [r for r in replaces if re.search(r"=>\s*\.{0,2}/", r)]
    if local:
        raise Fatal(f"Jaeger v{version}'s go.mod replaces modules with local folders; cannot build it: {local}")

    # 2. `go install module/cmd@version` refuses modules whose go.mod has replace directives (Jaeger
    # pins an old Shopify/sarama that way), so the binary is built as a tool of a throwaway module
    # that requires Jaeger at that version and repeats its replace directives: the same versions as
    # Jaeger's own build.
    src = home / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    (src / "go.mod").write_text(
        "// Generated by scripts/jaeger.py: builds Jaeger as a tool of this module.\n"
        f"module choreo.invalid/jaeger-build\n\ngo {go_directive or '1.24'}\n\n"
        + "".join(f"replace {r}\n" for r in replaces)
    )
    go_run(go, ["get", "-tool", f"{PACKAGE}@v{version}"], src, env,
           "downloading Jaeger's dependencies", logfile, progress="log lines")
    try:
        total = len(subprocess.run([go, "list", "-deps", PACKAGE], cwd=src, env=env, capture_output=True,
                                   text=True, timeout=300).stdout.split())
    except (OSError, subprocess.TimeoutExpired):
        total = 0

    # 3. go install into a private folder, then rename into place: an interrupted build never
    # leaves a half-written binary that a later run would trust.
    staging = Path(tempfile.mkdtemp(prefix="bin.partial-", dir=home))
    try:
        release = v2_name(Path(info["Dir"]), version)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        ldflags = " ".join([
            "-s", "-w",
            f"-X {MODULE}/internal/version.latestVersion={release}",
            f"-X {MODULE}/internal/version.commitSHA=v{version}",
            f"-X {MODULE}/internal/version.date={stamp}",
        ])
        go_run(go, ["install", "-v", "-trimpath", f"-ldflags={ldflags}", PACKAGE], src,
               {**env, "GOBIN": str(staging)}, "compiling Jaeger", logfile, progress="packages compiled",
               total=total)
        built = staging / "jaeger"
        if not built.is_file():
            raise Fatal(f"go install finished but {built} is missing; see {logfile}")
        check = subprocess.run([str(built), "version"], capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            raise Fatal(f"the built {built} does not run (exit {check.returncode}):\n{check.stdout}{check.stderr}")
        binary.parent.mkdir(parents=True, exist_ok=True)
        os.replace(built, binary)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"built Jaeger {release} (module v{version}) in {time.monotonic() - started:.0f}s: {binary}")
    return binary


# --- ports ---------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
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


def query_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/services", timeout=2) as resp:
            return resp.status == 200 and "data" in json.loads(resp.read() or b"{}")
    except (OSError, ValueError, urllib.error.URLError):
        return False


# --- start / stop --------------------------------------------------------------------------------


def read_pid(state_dir: Path) -> int | None:
    try:
        return int((state_dir / "jaeger.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def is_our_jaeger(pid: int, state_dir: Path) -> bool:
    """True if pid runs Jaeger with this state dir's config (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"--config={state_dir / 'config.yaml'}".encode() in cmdline


def stop(state_dir: Path, grace: float = 10.0) -> None:
    pidfile = state_dir / "jaeger.pid"
    pid = read_pid(state_dir)
    if pid is None:
        return
    if not pid_alive(pid) or not is_our_jaeger(pid, state_dir):
        pidfile.unlink(missing_ok=True)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap(pid)
        if not pid_alive(pid):
            break
        time.sleep(0.05)
    else:
        log(f"Jaeger (pid {pid}) ignored SIGTERM for {grace:.0f}s; sending SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while pid_alive(pid):
            reap(pid)
            time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    (state_dir / "endpoints.env").unlink(missing_ok=True)


def launch(binary: Path, state_dir: Path, ports: dict[str, int]) -> int:
    config = state_dir / "config.yaml"
    config.write_text(CONFIG.format(**ports))
    # Jaeger's own OpenTelemetry SDK pieces read OTEL_*: the test environment's must not reach it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    with open(state_dir / "jaeger.log", "wb") as out:
        # A new session keeps the terminal's Ctrl-C away from Jaeger: `run` stops it only after the
        # command has finished (and its services have flushed their spans).
        proc = subprocess.Popen([str(binary), f"--config={config}"], cwd=state_dir, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    (state_dir / "jaeger.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def wait_ready(pid: int, ports: dict[str, int], state_dir: Path, deadline: float) -> str | None:
    """None when ready, else why not ("bind" if a port was taken under us)."""
    while time.monotonic() < deadline:
        reap(pid)
        if not pid_alive(pid):
            text = log_tail(state_dir / "jaeger.log", 200)
            return "bind" if "address already in use" in text else "exited"
        if (query_answers(ports["query_http"]) and port_accepts(ports["otlp_http"])
                and port_accepts(ports["otlp_grpc"])):
            return None
        time.sleep(0.2)
    return "timeout"


def claim(state_dir: Path) -> TextIO:
    """Hold the state dir for this run (until the returned file is closed or the process dies).

    A second run on the same state dir stops with a message rather than killing the first one's
    Jaeger; a Jaeger found there while nobody holds the dir is a leftover of a run that died."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = open(state_dir / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise Fatal(f"{state_dir} is in use by another jaeger.py run; give this one its own --state-dir "
                    "(make test-kafka JAEGER_STATE=...)") from None
    return lock


def start(state_dir: Path, version: str) -> dict[str, str]:
    binary = build(version)
    state_dir = state_dir.resolve()
    pid = read_pid(state_dir)
    if pid is not None and pid_alive(pid) and is_our_jaeger(pid, state_dir):
        log(f"stopping a Jaeger left over from an earlier run (pid {pid})")
        stop(state_dir)
    timeout = float(os.environ.get("CHOREO_JAEGER_START_TIMEOUT") or 60)
    deadline = time.monotonic() + timeout
    began = time.monotonic()
    logfile = state_dir / "jaeger.log"
    # Another process can take a free port between our check and Jaeger's bind; retry then.
    for attempt in range(3):
        ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
        pid = launch(binary, state_dir, ports)
        try:
            why = wait_ready(pid, ports, state_dir, deadline)
        except BaseException:
            stop(state_dir, grace=5)
            raise
        if why is None:
            endpoints = {
                "CHOREO_JAEGER_OTLP_HTTP": f"http://127.0.0.1:{ports['otlp_http']}",
                "CHOREO_JAEGER_OTLP_GRPC": f"http://127.0.0.1:{ports['otlp_grpc']}",
                "CHOREO_JAEGER_QUERY": f"http://127.0.0.1:{ports['query_http']}",
            }
            (state_dir / "endpoints.env").write_text("".join(f"{k}={v}\n" for k, v in endpoints.items()))
            log(f"Jaeger ready in {time.monotonic() - began:.1f}s (pid {pid}): OTLP http :{ports['otlp_http']}, "
                f"grpc :{ports['otlp_grpc']}; query {endpoints['CHOREO_JAEGER_QUERY']} "
                f"(query gRPC :{ports['query_grpc']}); log {logfile}")
            return endpoints
        stop(state_dir, grace=5)
        if why != "bind" or attempt == 2:
            reason = {
                "exited": "Jaeger exited during start-up",
                "bind": "Jaeger could not bind its ports",
                "timeout": f"Jaeger was not ready within {timeout:g}s",
            }[why]
            raise Fatal(f"{reason}; last lines of {logfile}:\n{log_tail(logfile)}")
        log("port taken during start-up; retrying with new ports")
    raise AssertionError("unreachable")


# --- run -----------------------------------------------------------------------------------------


def run(state_dir: Path, version: str, command: list[str]) -> int:
    if not command:
        raise Fatal("run needs a command after --, e.g. run -- pytest tests/integration")
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        if stopping:
            return  # already on the way out; let stop() finish so no Jaeger is left behind
        if child is None:
            raise KeyboardInterrupt  # abort start-up (or the build); the finally below cleans up
        if signum != signal.SIGINT and child.poll() is None:
            # SIGTERM/SIGHUP are usually aimed at us alone (a CI timeout, make), so pass them on.
            child.send_signal(signum)
        # Ctrl-C already reached the command (same process group): wait for its own teardown.

    # A Python handler, not SIG_IGN: an ignored SIGINT would be inherited by the command.
    lock = claim(state_dir.resolve())
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            endpoints = start(state_dir, version)
        except KeyboardInterrupt:
            raise Fatal("interrupted while building or starting Jaeger") from None
        try:
            child = subprocess.Popen(command, env={**os.environ, **endpoints})
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
            lock.close()


# --- CLI -----------------------------------------------------------------------------------------


def default_state_dir() -> Path:
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"choreo-jaeger-{os.getuid()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Jaeger v2 (in-memory) for integration tests (make test-kafka).")
    parser.add_argument(
        "--jaeger-version", dest="jaeger_version", default=jaeger_version(),
        help=f"Go module version of {MODULE} (default: $CHOREO_JAEGER_VERSION or {DEFAULT_VERSION})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the Jaeger binary into the cache (no-op when cached); prints its path")
    p = sub.add_parser("run", help="start Jaeger, run a command against it, stop it")
    p.add_argument("--state-dir", type=Path, default=default_state_dir(),
                   help="folder for config, log and pid (default: $TMPDIR/choreo-jaeger-UID)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    version = args.jaeger_version.removeprefix("v")

    try:
        if args.command == "build":
            print(build(version), flush=True)
            return 0
        command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return run(args.state_dir, version, command)
    except Fatal as exc:
        log(str(exc))
        return exc.code
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
