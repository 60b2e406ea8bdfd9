"""The delivery property test on a real broker and a real Redis: random key sequences, duplicate
deliveries, handler failures and handler delays, with different keys of a partition running side by
side. Each event takes effect exactly once, each key's events take effect in publish order, and no
two events of one key ever run at once.

One service runs for the whole module (a group join per example would cost seconds on Tansu); each
example publishes its own keys. Crash points are covered with real processes by
``test_parallel.py`` (a member leaving mid-stream), ``test_crash.py`` and ``test_failures.py``
(SIGKILL), and by the memory-transport variant of this property in ``tests/unit``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from choreo import BlockingPublisher, Context, Event, RetryPolicy, Service, Settings
from choreo.schemas import parse_schema

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]


class Hop(Event, schema=parse_schema({
    "type": "record", "name": "Hop", "namespace": "propkafka", "version": 1,
    "fields": [{"name": "key", "type": "string"}, {"name": "seq", "type": "int"}],
})):
    key: str
    seq: int


@dataclass
class Observed:
    """What the handler saw, written from the service's thread, read from the test's."""

    effects: dict[str, list[int]] = field(default_factory=dict)
    failures_left: dict[str, int] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    overlaps: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Running:
    settings: Settings
    observed: Observed
    publisher: BlockingPublisher


@pytest.fixture(scope="module")
def running(endpoints: object) -> Iterator[Running]:
    from tests.conftest import Endpoints

    assert isinstance(endpoints, Endpoints)
    unique = uuid.uuid4().hex[:10]
    settings = Settings(kafka_bootstrap=endpoints.kafka, redis_url=endpoints.redis, topic_prefix=f"t{unique}.",
                        redis_prefix=f"t{unique}:", topic_partitions=3, topic_replication=1,
                        commit_interval_ms=200, claim_lease_ms=2_000, batch_size=13, concurrency=8,
                        slow_handler_ms=5, max_backoff_ms=20)
    observed = Observed()
    service = Service("propkafka", settings=settings,
                      retry=RetryPolicy(max_attempts=10, initial_delay_s=0.001, max_delay_s=0.005))

    @service.on(Hop)
    async def apply(event: Hop, ctx: Context) -> None:
        with observed.lock:
            observed.running[event.key] = observed.running.get(event.key, 0) + 1
            if observed.running[event.key] > 1:  # not an assert: the service would retry the handler
                observed.overlaps.append(event.key)
        try:
            await asyncio.sleep(observed.delays.get(ctx.event_id, 0.0))
            with observed.lock:
                left = observed.failures_left.get(ctx.event_id, 0)
                if left:
                    observed.failures_left[ctx.event_id] = left - 1
                    raise RuntimeError("transient")
                observed.effects.setdefault(event.key, []).append(event.seq)
        finally:
            with observed.lock:
                observed.running[event.key] -= 1

    started = threading.Event()
    failed: list[BaseException] = []

    def serve() -> None:
        async def main() -> None:
            await service.start()
            started.set()
            await service.run()

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            failed.append(exc)
            started.set()

    thread = threading.Thread(target=serve, name="propkafka-service", daemon=True)
    thread.start()
    assert started.wait(60), "the service did not start"
    assert not failed, failed
    publisher = BlockingPublisher("prop-web", settings=settings)
    try:
        yield Running(settings, observed, publisher)
    finally:
        publisher.close()
        service.stop()
        thread.join(30)
        assert not failed, failed


# (key index, copies published, failures before the handler succeeds, handler delay in ms)
plans = st.lists(st.tuples(st.integers(0, 7), st.integers(1, 3), st.integers(0, 2), st.integers(0, 4)),
                 min_size=1, max_size=40)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(plan=plans)
def test_on_a_real_broker_each_event_takes_effect_once_in_key_order(
    running: Running, plan: list[tuple[int, int, int, int]]
) -> None:
    run = uuid.uuid4().hex[:8]
    observed = running.observed
    expected: dict[str, list[int]] = {}
    events: list[Hop] = []
    ids: list[str] = []
    for seq, (key_index, copies, failures, delay_ms) in enumerate(plan):
        key, event_id = f"{run}-k{key_index}", f"{run}-e{seq}"
        with observed.lock:
            observed.failures_left[event_id] = failures
            observed.delays[event_id] = delay_ms / 1000
        expected.setdefault(key, []).append(seq)
        # A producer retrying after a lost ack publishes the same id again, right behind the first.
        events += [Hop(key=key, seq=seq)] * copies
        ids += [event_id] * copies
    running.publisher.publish_many(events, event_ids=ids, correlation_ids=[e.key for e in events])

    def ours() -> dict[str, list[int]]:
        with observed.lock:
            return {k: list(v) for k, v in observed.effects.items() if k.startswith(run)}

    deadline = time.monotonic() + 60
    while ours() != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    # A duplicate effect would arrive after the last expected one: give it the time to show.
    time.sleep(0.2)
    assert ours() == expected
    assert not [k for k in observed.overlaps if k.startswith(run)], "two events of one key ran at once"
