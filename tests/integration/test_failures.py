"""Failure handling with a real broker, a real Redis and real service processes.

Every test counts effects at an unguarded sink (``helpers.Sink``: a plain ``HINCRBY`` per order in a
downstream service) and asserts that none is LOST (an expected order missing) and none DUPLICATED (a
count above 1):

1. a handler that fails twice per event, then succeeds: each effect once, and the retries are logged;
2. a handler that always fails: the event lands in ``<topic>.dlq`` after exactly N attempts, with the
   original bytes and every ``choreo-dlq-*`` header, the delays between attempts within the jitter
   bounds;
3. a checkout step that dead-letters one order until it is fixed, then ``choreo dlq replay``: the saga
   completes in the tracker and each step's effect happened once;
4. Redis stopped for 10 s in the middle of 5,000 events;
5. the broker stalled (SIGSTOP) for 10 s while events are produced before, during and after;
6. the consumer SIGKILLed while an event waits between two attempts (in place, and with default
   settings, where a long pause goes through a retry topic), then restarted.

Tests 4 and 5 start their own dev stack (whatever broker the suite runs against), so stopping its
Redis or stalling its broker disturbs no other test.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from choreo import Context, DLQHeader, Publisher, RetryPolicy, Service, Settings
from choreo.deadletter import DeadLetter
from choreo.devstack import DevStack, start_dev_stack
from choreo.stores.redis import RedisSagaStore
from choreo.transport import Record
from choreo.transport.kafka import KafkaTransport
from services.events import InventoryReserved, OrderPlaced
from services.invariants import checkout_report
from tests.conftest import service_env
from tests.integration.helpers import ServiceProcess, Sink, eventually, orders, publish, wait_until
from tests.integration.test_cli import choreo

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

FLAKY = "tests.integration.apps.flaky:service"
SLACK_S = 1.5  # on top of a backoff ceiling: scheduling, fetching and Redis round trips on a loaded CI box


@pytest.fixture
async def books(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """The session Redis, where the flaky service and the sinks keep their counts."""
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        yield r
    finally:
        await r.aclose()


@pytest.fixture
def own_stack() -> Iterator[DevStack]:
    stack = start_dev_stack()
    try:
        yield stack
    finally:
        stack.stop()


async def counts(r: aioredis.Redis, key: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in (await r.hgetall(key)).items()}


async def counts_str(r: aioredis.Redis, key: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in (await r.hgetall(key)).items()}


def lost_and_duplicated(effects: dict[str, int], expected: list[str]) -> tuple[list[str], dict[str, int]]:
    lost = sorted(set(expected) - set(effects))
    duplicated = {k: v for k, v in effects.items() if v > 1}
    return lost, duplicated


async def settled(sink: Sink, expected: list[str], timeout: float, settle: float = 2.0) -> dict[str, int]:
    """The sink's counts once every expected order arrived, plus a pause for stray duplicates."""
    await sink.wait_for(len(expected), timeout)
    await asyncio.sleep(settle)
    return await sink.effects()


def assert_exactly_once(effects: dict[str, int], expected: list[str]) -> None:
    lost, duplicated = lost_and_duplicated(effects, expected)
    assert not lost and not duplicated, (
        f"LOST {len(lost)} (e.g. {lost[:5]}), DUPLICATED {len(duplicated)} (e.g. {list(duplicated.items())[:5]})"
    )
    assert set(effects) == set(expected), sorted(set(effects) - set(expected))[:5]


def stop(*procs: ServiceProcess | None) -> None:
    """Terminate what still runs; each must have stopped cleanly."""
    codes = {p.target + " " + p.log_path.name: p.terminate() for p in procs if p is not None and p.proc.poll() is None}
    bad = {name: code for name, code in codes.items() if code != 0}
    assert not bad, bad


# -- 1. fails twice, then succeeds ------------------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_a_handler_failing_twice_then_succeeding_has_each_effect_once(
    settings: Settings, tmp_path: Path, books: aioredis.Redis
) -> None:
    n = 30
    events = orders(n, prefix="twice")
    expected = [e.order_id for e in events]
    proc = ServiceProcess(FLAKY, settings, tmp_path / "flaky.log", FLAKY_MODE="fail-first", FLAKY_FAILURES="2")
    try:
        async with Sink(settings, InventoryReserved) as sink:
            await publish(settings, events)
            effects = await settled(sink, expected, 120)
    finally:
        stop(proc)
    assert_exactly_once(effects, expected)
    assert int(await books.scard(sink.ids_key)) == n, "one emitted event id per order"

    prefix = f"{settings.redis_prefix}flaky:"
    assert await counts(books, prefix + "attempts") == {o: 3 for o in expected}, "2 failures + 1 success each"
    assert await counts(books, prefix + "runs") == {o: 1 for o in expected}, "the handler got past its failures once"

    # The service logged each retry: a warning per failed attempt, naming the handler and the attempt.
    output = proc.output()
    logged: set[tuple[str, int]] = set()
    for line in output.splitlines():
        found = re.search(r"order (\S+): simulated failure (\d) of 2", line)
        if found and "WARNING" in line and "relay" in line and "attempt" in line:
            logged.add((found.group(1), int(found.group(2))))
    missing = {(o, k) for o in expected for k in (1, 2)} - logged
    assert not missing, f"retries not logged: {sorted(missing)[:5]}\n{output[-3000:]}"
    assert ".dlq" not in output and "gave up" not in output, output[-3000:]  # nothing was dead-lettered


# -- 2. always fails: dead-lettered after N attempts ---------------------------------------------------------


@pytest.mark.timeout(120)
async def test_an_always_failing_handler_dead_letters_after_n_attempts_with_full_headers(
    settings: Settings, books: aioredis.Redis
) -> None:
    attempts = 4
    policy = RetryPolicy(max_attempts=attempts, initial_delay_s=0.2, max_delay_s=0.6)
    service = Service("doomed", settings=settings, retry=policy)
    log_key = f"{settings.redis_prefix}doomed:attempts"
    effects_key = f"{settings.redis_prefix}doomed:effects"

    @service.on(OrderPlaced)
    async def charge_card(event: OrderPlaced, ctx: Context) -> None:
        if event.order_id.startswith("doomed"):
            await books.rpush(log_key, f"{time.monotonic():.6f} {time.time():.6f}")
            raise RuntimeError(f"card processor down for {event.order_id}")
        await books.hincrby(effects_key, event.order_id, 1)

    doomed, follower = orders(2, prefix="doomed")
    follower = follower.model_copy(update={"order_id": "after-doomed"})
    topic = settings.topic_prefix + OrderPlaced.topic()
    dlq = topic + ".dlq"
    await service.start()
    task = asyncio.create_task(service.run())
    try:
        async with Publisher("web", settings=settings) as publisher:
            # Same saga id, so the same partition: the follower waits behind the doomed event.
            await publisher.publish(doomed, correlation_id="saga-doomed", event_id="evt-doomed")
            await publisher.publish(follower, correlation_id="saga-doomed", event_id="evt-after")

        async def handled() -> None:
            if task.done():
                task.result()
            assert len(service.stats.dead_lettered) == 1
            assert await counts(books, effects_key) == {"after-doomed": 1}

        await eventually(handled, 60)
        await asyncio.sleep(1.0)  # any further attempt would show up in the log now
    finally:
        service.stop()
        await asyncio.wait_for(task, 30)

    log = [tuple(float(x) for x in entry.split()) for entry in await books.lrange(log_key, 0, -1)]
    assert len(log) == attempts, f"{len(log)} attempts, expected exactly {attempts}"
    gaps = [later[0] - earlier[0] for earlier, later in zip(log, log[1:])]
    for attempt, gap in enumerate(gaps, 1):
        # Full jitter: the pause after failed attempt n is uniform in [0, ceiling(n)].
        assert 0 <= gap <= policy.ceiling(attempt) + SLACK_S, (attempt, gap, policy.ceiling(attempt))
    assert sum(gaps) <= sum(policy.ceiling(a) for a in range(1, attempts)) + SLACK_S * 2, gaps

    reader = KafkaTransport(settings, client_id="test-dlq-reader")
    await reader.connect()
    try:
        letters: list[Record] = []

        async def dead_lettered() -> None:
            letters[:] = await reader.read_all(dlq)
            assert len(letters) == 1, letters

        await eventually(dead_lettered, 30)
        originals = [r for r in await reader.read_all(topic) if _header(r, "choreo-event-id") == "evt-doomed"]
    finally:
        await reader.close()
    assert len(originals) == 1
    original, record = originals[0], letters[0]
    # The original record, unchanged: key, value bytes and headers, then the failure headers.
    assert record.key == original.key == b"saga-doomed"
    assert record.value == original.value and record.value
    assert record.headers[: len(original.headers)] == original.headers
    added = {k for k, _ in record.headers[len(original.headers):]}
    assert added == set(DLQHeader.ALL), added ^ set(DLQHeader.ALL)

    letter = DeadLetter(record)
    h = letter.header
    assert h(DLQHeader.REASON) == "handler-error"
    assert h(DLQHeader.ERROR_TYPE) == "RuntimeError"
    assert h(DLQHeader.ERROR) == "card processor down for doomed-000000"
    trace = h(DLQHeader.TRACEBACK) or ""
    assert "Traceback" in trace and "charge_card" in trace and "RuntimeError: card processor down" in trace
    assert h(DLQHeader.TOPIC) == topic
    assert h(DLQHeader.PARTITION) == str(original.partition)
    assert h(DLQHeader.OFFSET) == str(original.offset)
    assert h(DLQHeader.SERVICE) == "doomed"
    assert h(DLQHeader.HANDLER) == "charge_card"
    assert h(DLQHeader.ATTEMPTS) == str(attempts)
    first = datetime.fromisoformat(h(DLQHeader.FIRST_FAILURE) or "").timestamp()
    last = datetime.fromisoformat(h(DLQHeader.LAST_FAILURE) or "").timestamp()
    # Each failure is stamped just after its attempt started (the handler wrote the time first).
    assert log[0][1] - 0.05 <= first <= log[0][1] + SLACK_S, (first, log[0])
    assert log[-1][1] - 0.05 <= last <= log[-1][1] + SLACK_S, (last, log[-1])
    assert first <= last


def _header(record: Record, name: str) -> str | None:
    return DeadLetter(record).header(name)


# -- 3. DLQ replay after a fix: the saga completes --------------------------------------------------------

CHECKOUT = {
    "order": "services.order:service",
    "inventory": "services.inventory:service",
    "payment": "tests.integration.apps.broken_payment:service",  # the reference payment, with a switch
    "shipping": "services.shipping:service",
    "notification": "services.notification:service",
    "tracker": "services.checkout:tracker",
}


@pytest.mark.timeout(180)
async def test_a_dead_lettered_step_replayed_after_the_fix_completes_its_saga(
    settings: Settings, tmp_path: Path, books: aioredis.Redis
) -> None:
    p = settings.redis_prefix
    stock = {"gadget": 1_000}
    await books.hset(f"{p}inventory:stock", "gadget", stock["gadget"])
    broken = OrderPlaced(order_id="fixme-1", customer_id="c-fixme", sku="gadget", quantity=2, amount_cents=1_500)
    fine = [OrderPlaced(order_id=f"fine-{i}", customer_id=f"c-{i}", sku="gadget", quantity=1, amount_cents=900)
            for i in range(2)]
    everything = [broken, *fine]
    await books.sadd(f"{p}test:payment-broken", broken.order_id)
    # A generous saga deadline: the stuck saga must wait for its replay, not time out.
    env = {"CHECKOUT_SAGA_DEADLINE_S": "600"}
    procs = {name: ServiceProcess(target, settings, tmp_path / f"{name}.log", **env) for name, target in CHECKOUT.items()}
    store = RedisSagaStore(settings.redis_url, prefix=p)
    dlq = settings.topic_prefix + InventoryReserved.topic() + ".dlq"
    try:
        await publish(settings, everything)

        async def others_shipped_and_broken_dead_lettered() -> None:
            sent = await counts_str(books, f"{p}notification:sent")
            assert sent == {o.order_id: "shipped" for o in fine}, sent
            assert await counts(books, f"{p}test:payment-failures") == {broken.order_id: 3}

        await eventually(others_shipped_and_broken_dead_lettered, 120)
        listed = choreo("dlq", "list", "--records", env=service_env(settings))
        assert listed.returncode == 0, listed.stderr
        assert "1 dead letter(s)" in listed.stdout and "PaymentGatewayDown" in listed.stdout, listed.stdout

        async def stuck() -> None:
            state = await store.get(broken.order_id)
            assert state is not None and state["status"] == "running", state
            assert state["steps"]["inventory.reserve_stock"]["status"] == "completed", state["steps"]
            assert state["steps"]["payment.charge"]["status"] == "running", state["steps"]

        await eventually(stuck, 30)

        await books.srem(f"{p}test:payment-broken", broken.order_id)  # the cause is fixed
        replayed = choreo("dlq", "replay", dlq, env=service_env(settings))
        assert replayed.returncode == 0, replayed.stderr
        assert f"replayed 1 record(s) from {dlq}" in replayed.stdout, replayed.stdout
        assert "replayed 1/1 (100%)" in replayed.stderr, replayed.stderr

        async def completed() -> None:
            for order in everything:
                state = await store.get(order.order_id)
                assert state is not None and state["status"] == "completed", (order.order_id, state and state["status"])
                steps = {k: v["status"] for k, v in state["steps"].items()}
                for step in ("inventory.reserve_stock", "payment.charge", "order.confirm", "shipping.schedule",
                             "notification.notify_shipped"):
                    assert steps[step] == "completed", (order.order_id, steps)
                kinds = [e["type"] for e in state["events"]]
                assert len(kinds) == len(set(kinds)) == 6, kinds  # one event per step, plus OrderPlaced

        await eventually(completed, 90)
        await asyncio.sleep(1.0)  # room for a stray duplicate before counting
    finally:
        await store.close()
        stop(*procs.values())

    ids = [o.order_id for o in everything]
    # Each step's effect happened once for every order, the replayed one included.
    assert await counts(books, f"{p}test:payment-charged") == {i: 1 for i in ids}, "charged once each"
    assert await counts(books, f"{p}test:payment-failures") == {broken.order_id: 3}, "no failure after the fix"
    ledger = await counts_str(books, f"{p}payment:ledger")
    assert set(ledger) == set(ids) and ledger[broken.order_id].endswith(":1500")
    assert await counts_str(books, f"{p}inventory:reservations") == {
        broken.order_id: "gadget:2", **{o.order_id: "gadget:1" for o in fine}}
    assert await counts(books, f"{p}inventory:stock") == {"gadget": 1_000 - 4}
    assert set(await counts_str(books, f"{p}shipping:shipments")) == set(ids)
    assert await counts_str(books, f"{p}order:status") == {i: "confirmed" for i in ids}
    assert await counts_str(books, f"{p}notification:sent") == {i: "shipped" for i in ids}
    report = await checkout_report(books, p, everything, stock)
    assert report.ok, report.lines()


# -- 4. Redis stopped for 10 s in the middle of 5,000 events ------------------------------------------------


@pytest.mark.timeout(240)
async def test_redis_stopped_for_ten_seconds_during_five_thousand_events(
    settings: Settings, tmp_path: Path, books: aioredis.Redis, own_stack: DevStack
) -> None:
    n = 5_000
    events = orders(n, prefix="outage")
    expected = [e.order_id for e in events]
    # The service keeps its idempotency keys in the stack's Redis, which goes away; its books, the sink
    # and the sink's own idempotency keys stay in the session Redis.
    local = settings.model_copy(update={"redis_url": own_stack.redis_url})
    runs_key = f"{settings.redis_prefix}flaky:runs"
    proc = ServiceProcess(FLAKY, local, tmp_path / "flaky.log", FLAKY_SINK_REDIS=settings.redis_url,
                          CHOREO_MAX_BACKOFF_MS="1000")
    try:
        async with Sink(settings, InventoryReserved) as sink:
            await publish(settings, events[: n // 2])

            async def under_way() -> bool:
                return int(await books.hlen(runs_key)) >= 500
            await wait_until(under_way, 120, "500 events to be handled")

            own_stack.stop_redis()
            stopped = time.monotonic()
            await publish(settings, events[n // 2 :])  # the rest arrives while Redis is down
            await asyncio.sleep(2.0)  # the batch in flight when Redis went away has ended by now
            ran_early = int(await books.hlen(runs_key))
            await asyncio.sleep(max(0.0, stopped + 10 - time.monotonic()))
            ran_late = int(await books.hlen(runs_key))
            await asyncio.to_thread(own_stack.start_redis)
            assert ran_late == ran_early < n, "no handler runs without its idempotency guard"

            effects = await settled(sink, expected, 150)
    finally:
        stop(proc)
    assert_exactly_once(effects, expected)
    assert int(await books.scard(sink.ids_key)) == n
    assert set(await counts(books, runs_key)) == set(expected)
    output = proc.output()
    assert re.search(r"ERROR .*Redis", output), "the outage was reported"


# -- 5. the broker stalled (SIGSTOP) for 10 s ---------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_a_broker_stalled_for_ten_seconds_loses_and_duplicates_nothing(
    settings: Settings, tmp_path: Path, books: aioredis.Redis, own_stack: DevStack
) -> None:
    before, during, after = orders(300, "before"), orders(300, "during"), orders(300, "after")
    expected = [e.order_id for e in before + during + after]
    local = settings.model_copy(update={"kafka_bootstrap": own_stack.kafka_bootstrap})
    runs_key = f"{settings.redis_prefix}flaky:runs"
    proc = ServiceProcess(FLAKY, local, tmp_path / "flaky.log")
    pid = own_stack.broker_pid
    assert pid is not None
    try:
        async with Sink(local, InventoryReserved) as sink, Publisher("web", settings=local) as publisher:
            await publisher.publish_many(before, correlation_ids=[e.order_id for e in before])

            async def under_way() -> bool:
                return int(await books.hlen(runs_key)) >= 100
            await wait_until(under_way, 120, "100 events to be handled")

            os.kill(pid, signal.SIGSTOP)
            try:
                # Produced during the stall: acknowledged once the broker is back.
                pending = asyncio.ensure_future(
                    publisher.publish_many(during, correlation_ids=[e.order_id for e in during]))
                await asyncio.sleep(10)
                assert not pending.done(), "nothing can be acknowledged by a stopped broker"
            finally:
                os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(pending, 90)
            await publisher.publish_many(after, correlation_ids=[e.order_id for e in after])
            effects = await settled(sink, expected, 150)
    finally:
        stop(proc)
    assert_exactly_once(effects, expected)
    assert int(await books.scard(sink.ids_key)) == len(expected)


# -- 6. the consumer SIGKILLed during a retry -----------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("retry_env", [
    # The pause is waited in place: the partition is paused and rewound to the event.
    pytest.param({"CHOREO_RETRY_TIERS": "0"}, id="waiting-in-place"),
    # Default settings: a 3 s pause is longer than a policy's default in-process maximum, so the
    # event waits in a retry topic while its partition moves on.
    pytest.param({}, id="default-settings"),
])
async def test_a_consumer_killed_during_a_retry_loses_and_duplicates_nothing(
    retry_env: dict[str, str], settings: Settings, tmp_path: Path, books: aioredis.Redis
) -> None:
    n = 40
    events = orders(n, prefix="kill")
    expected = [e.order_id for e in events]
    victim = expected[7]
    env = {"FLAKY_MODE": "fail-first", "FLAKY_FAILURES": "2", "FLAKY_FAIL_IDS": victim,
           "FLAKY_RETRY_DELAY_S": "3", **retry_env}  # a fixed pause between attempts: the kill lands inside it
    log_key = f"{settings.redis_prefix}flaky:log:{victim}"
    first = ServiceProcess(FLAKY, settings, tmp_path / "flaky-1.log", **env)
    second: ServiceProcess | None = None
    try:
        async with Sink(settings, InventoryReserved) as sink:
            await publish(settings, events)

            async def first_attempt_failed() -> bool:
                return int(await books.llen(log_key)) >= 1
            await wait_until(first_attempt_failed, 120, f"the first attempt at {victim}")
            first.kill()
            assert first.proc.returncode == -signal.SIGKILL
            assert int(await books.llen(log_key)) == 1, "killed while the event waited for its second attempt"

            second = ServiceProcess(FLAKY, settings, tmp_path / "flaky-2.log", **env)
            effects = await settled(sink, expected, 120)
    finally:
        stop(second)
        if first.proc.poll() is None:
            first.kill()
    assert_exactly_once(effects, expected)
    assert int(await books.scard(sink.ids_key)) == n

    # The retried event failed in the killed process, failed again after the restart, then succeeded.
    # (Its next attempts may come sooner than the policy's pause: after the kill, the event may be
    # delivered twice, from its original offset, not yet committed, and from its retry record.)
    log = [entry.split() for entry in await books.lrange(log_key, 0, -1)]
    assert [int(a) for a, _, _ in log] == [1, 2, 3], log
    assert [int(pid) for _, pid, _ in log] == [first.proc.pid, second.proc.pid, second.proc.pid], log
    runs = await counts(books, f"{settings.redis_prefix}flaky:runs")
    assert runs[victim] == 1, "the retried event succeeded once"
    assert set(runs) == set(expected)
