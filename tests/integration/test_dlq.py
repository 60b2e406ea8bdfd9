"""Dead-letter topics end to end: a handler that gives up, then ``choreo dlq`` list, show, replay
(keeping the event id, so idempotency holds) and purge."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from collections import Counter

import pytest

from choreo import Context, DeadLetterNow, Failure, Publisher, RetryPolicy, Service, Settings
from choreo.deadletter import DeadLetter, dead_letter
from choreo.transport import TopicSpec
from choreo.transport.kafka import KafkaTransport
from services.events import OrderPlaced
from tests.conftest import Endpoints, service_env
from tests.integration.helpers import ROOT, orders
from tests.integration.test_cli import choreo

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


async def _drive(service: Service, until: object, polls: int = 300) -> None:
    for _ in range(polls):
        await service.poll_once()
        if until():  # type: ignore[operator]
            return
    raise AssertionError("condition not reached")


@pytest.mark.timeout(120)
async def test_dead_letters_are_listed_shown_replayed_once_and_purged(settings: Settings, endpoints: Endpoints) -> None:
    effects: dict[str, int] = {}
    broken = {"o-bad"}
    service = Service("dlq-demo", settings=settings, retry=RetryPolicy(max_attempts=2, initial_delay_s=0.01))

    @service.on(OrderPlaced)
    async def take(event: OrderPlaced, ctx: Context) -> None:
        if event.order_id in broken:
            raise DeadLetterNow(f"customer {event.customer_id} is blocked")
        effects[event.order_id] = effects.get(event.order_id, 0) + 1

    good, bad = orders(2)
    bad = bad.model_copy(update={"order_id": "o-bad"})
    await service.start()
    async with Publisher("web", settings=settings) as publisher:
        await publisher.publish(good, correlation_id="saga-good")
        await publisher.publish(bad, correlation_id="saga-bad", event_id="evt-bad")
    await _drive(service, lambda: len(service.stats.dead_lettered) == 1 and good.order_id in effects)

    env = service_env(settings)
    dlq = settings.topic_prefix + OrderPlaced.topic() + ".dlq"
    listed = choreo("dlq", "list", "--records", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "DeadLetterNow" in listed.stdout and "1 dead letter(s)" in listed.stdout and "saga=saga-bad" in listed.stdout
    assert "0 dead letter(s)" in choreo("dlq", "list", dlq, "--saga", "saga-good", env=env).stdout

    shown = choreo("dlq", "show", dlq, _partition(listed.stdout), "0", env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "customer" in shown.stdout and "blocked" in shown.stdout
    assert "'order_id': 'o-bad'" in shown.stdout, "the value is decoded with its writer schema"

    dry = choreo("dlq", "replay", dlq, "--dry-run", env=env)
    assert dry.returncode == 0 and "would replay 1 record(s)" in dry.stdout

    broken.clear()  # the cause is fixed: replay
    for _ in range(2):  # replaying twice must still have one effect: the event id is kept
        replayed = choreo("dlq", "replay", dlq, env=env)
        assert replayed.returncode == 0 and "replayed 1 record(s)" in replayed.stdout, replayed.stderr
    await _drive(service, lambda: effects.get("o-bad") == 1)
    for _ in range(30):
        await service.poll_once()
    await service.close()
    assert effects == {good.order_id: 1, "o-bad": 1}

    purged = choreo("dlq", "purge", dlq, "--yes", env=env)
    if endpoints.broker == "kafka":
        assert purged.returncode == 0 and "purged 1 record(s)" in purged.stdout
        assert "0 dead letter(s)" in choreo("dlq", "list", dlq, env=env).stdout
    else:  # the embedded broker has no DeleteRecords: the command says so and fails
        assert purged.returncode == 1 and "deleting records" in purged.stderr
    assert choreo("dlq", "purge", dlq, env=env).returncode == 1, "--yes is required"


def _partition(listing: str) -> str:
    """The partition of the first record line of ``dlq list --records`` (it depends on the key's hash)."""
    for line in listing.splitlines():
        if line.startswith("  ") and ".dlq " in line:
            return line.split()[1]
    raise AssertionError(listing)


@pytest.mark.timeout(120)
async def test_replay_shows_its_progress_on_stderr_unless_quiet(settings: Settings) -> None:
    n = 20
    topic = settings.topic_prefix + OrderPlaced.topic()
    dlq = topic + ".dlq"
    events = orders(n, prefix="progress")
    async with Publisher("web", settings=settings) as publisher:
        ids = await publisher.publish_many(events, correlation_ids=[e.order_id for e in events])
    transport = KafkaTransport(settings, client_id="test-progress")
    await transport.connect()
    try:
        await transport.ensure_topics([TopicSpec(dlq, settings.topic_partitions, settings.topic_replication)],
                                      create=True)
        originals = await transport.read_all(topic)
        assert len(originals) == n
        failure = Failure("handler-error", "RuntimeError", "the cause, since fixed")
        await transport.send([dead_letter(r, failure, service="progress") for r in originals])
        env = service_env(settings)

        # Not a terminal (a pipe, as in CI): a plain line each tenth, then the summary on stdout.
        replayed = choreo("dlq", "replay", dlq, "--rate", "500", env=env)
        assert replayed.returncode == 0, replayed.stderr
        assert f"replayed {n} record(s) from {dlq}" in replayed.stdout
        progress = [m for m in (re.match(r"replayed (\d+)/(\d+) \((\d+)%\) \d+/s", line)
                                for line in replayed.stderr.splitlines()) if m]
        assert [int(m.group(1)) for m in progress] == list(range(2, n + 1, 2)), replayed.stderr
        assert {int(m.group(2)) for m in progress} == {n}
        assert [int(m.group(3)) for m in progress] == list(range(10, 101, 10))
        assert "\r" not in replayed.stderr and "\033" not in replayed.stderr
        assert replayed.stderr.count(f" -> {topic} (event ") == n, "one line per replayed record"

        # --quiet: only the summary.
        quiet = choreo("dlq", "replay", dlq, "--rate", "500", "--quiet", env=env)
        assert quiet.returncode == 0, quiet.stderr
        assert f"replayed {n} record(s) from {dlq}" in quiet.stdout
        assert "replayed" not in quiet.stderr, quiet.stderr

        # On a terminal: one line redrawn in place, ending with the final count.
        code, out, err = _choreo_with_terminal_stderr("dlq", "replay", dlq, "--rate", "500", env=env)
        assert code == 0, err
        assert f"replayed {n} record(s) from {dlq}" in out
        assert "\r\033[K" in err and f"replayed {n}/{n} (100%)" in err, err
        assert err.count(f" -> {topic} (event ") == n

        # Every replay kept every event id: the topic holds each original event four times.
        replays = Counter(DeadLetter(r).header("choreo-event-id") for r in await transport.read_all(topic))
        assert replays == {i: 4 for i in ids}
    finally:
        await transport.close()


def _choreo_with_terminal_stderr(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``choreo`` with stderr on a pseudo-terminal (stdout stays a pipe)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "choreo.cli", *args], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        chunks: list[bytes] = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        out, _ = proc.communicate(timeout=60)
        code = proc.returncode
    finally:
        os.close(master)
    return code, out.decode(), b"".join(chunks).decode(errors="replace")
