"""The batch pipeline: a batch's tail (its acks, done marks and offsets) runs while the next batch is
fetched, decoded, claimed and handled, and that batch writes nothing until the tail is durable. If
the tail fails, neither batch happened: both are read again, and no event is lost or reordered.

The memory transport acknowledges a send at once; these tests hold acks back, fail sends and fail
done marks, to drive the overlap and its failures deterministically.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from choreo import Context, DeadLetterNow, Event, Publisher, RetryPolicy, Service, Settings
from choreo.errors import IdempotencyError, PublishError
from choreo.idempotency import ClaimResult
from choreo.schemas import parse_schema
from choreo.stores.memory import MemoryIdempotencyStore
from choreo.transport import OutgoingRecord
from choreo.transport.memory import MemoryBroker, MemoryTransport
from choreo.wire import Wire


class Step(Event, schema=parse_schema({
    "type": "record", "name": "Step", "namespace": "pipe", "version": 1,
    "fields": [{"name": "key", "type": "string"}, {"name": "seq", "type": "int"}],
})):
    key: str
    seq: int


class Stepped(Event, schema=parse_schema({
    "type": "record", "name": "Stepped", "namespace": "pipe", "version": 1,
    "fields": [{"name": "key", "type": "string"}, {"name": "seq", "type": "int"}],
})):
    key: str
    seq: int


PREFIX = "pipe."
OUT = PREFIX + Stepped.topic()
KEYS = ["k0", "k1", "k2", "k3", "k4"]


class HeldAcks(MemoryTransport):
    """Acks that resolve only when released (``hold``), and sends that fail on the calls named in
    ``fail`` (when released, if held)."""

    def __init__(self, broker: MemoryBroker, *, hold: bool = False, fail: Sequence[int] = ()) -> None:
        super().__init__(broker)
        self.hold = hold
        self.fail = set(fail)
        self.calls = 0
        self.pending: list[tuple[asyncio.Future[None], list[OutgoingRecord] | None]] = []

    def send(self, records: Sequence[OutgoingRecord]) -> asyncio.Future[None]:
        self.calls += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((future, list(records) if self.calls not in self.fail else None))
        if not self.hold:
            self.release()
        return future

    def release(self, count: int | None = None) -> None:
        """Resolve the first ``count`` outstanding sends (all by default)."""
        count = len(self.pending) if count is None else count
        for future, records in self.pending[:count]:
            if records is None:
                future.set_exception(PublishError("broker did not acknowledge (test)"))
                continue
            for r in records:
                self.broker.append(r)
            future.set_result(None)
        del self.pending[:count]


class FailingFinish(MemoryIdempotencyStore):
    """Done marks that fail on the calls named in ``fail``; every claim and finish is logged."""

    def __init__(self, fail: Sequence[int] = ()) -> None:
        super().__init__()
        self.fail = set(fail)
        self.calls = 0
        self.log: list[tuple[str, frozenset[str]]] = []

    async def claim(self, keys: Sequence[str], owner: str, lease_ms: int) -> list[ClaimResult]:
        self.log.append(("claim", frozenset(keys)))
        return await super().claim(keys, owner, lease_ms)

    async def finish(self, done: Sequence[str], released: Sequence[str], owner: str, ttl_ms: int) -> None:
        self.calls += 1
        if self.calls in self.fail:
            raise IdempotencyError("Redis went away (test)")
        self.log.append(("release", frozenset(released)))
        await super().finish(done, released, owner, ttl_ms)


def _service(broker: MemoryBroker, transport: MemoryTransport, store: MemoryIdempotencyStore,
             runs: list[tuple[str, int]], fails: dict[int, int] | None = None) -> Service:
    config = Settings(topic_prefix=PREFIX, topic_partitions=2, batch_size=4, concurrency=4, max_backoff_ms=1)
    service = Service("pipe", settings=config, transport=transport, idempotency=store,
                      retry=RetryPolicy(max_attempts=5, initial_delay_s=0.001, max_delay_s=0.001))
    left = dict(fails or {})

    @service.on(Step, emits=[Stepped])
    async def step(event: Step, ctx: Context) -> None:
        await asyncio.sleep(0)  # a real handler awaits: the batch's tail gets its turn meanwhile
        if left.get(event.seq, 0):
            left[event.seq] -= 1
            raise RuntimeError("not yet")
        runs.append((event.key, event.seq))
        ctx.emit(Stepped(key=event.key, seq=event.seq))

    return service


async def _publish(broker: MemoryBroker, count: int) -> dict[str, list[int]]:
    publisher = Publisher("web", settings=Settings(topic_prefix=PREFIX, topic_partitions=2),
                          transport=MemoryTransport(broker))
    await publisher.start()
    expected: dict[str, list[int]] = {}
    for seq in range(count):
        key = KEYS[seq % len(KEYS)]
        expected.setdefault(key, []).append(seq)
        await publisher.publish(Step(key=key, seq=seq), correlation_id=key, event_id=f"e{seq}")
    await publisher.close()
    return expected


async def _publish_with_copy(broker: MemoryBroker) -> None:
    """Five records on k0; the fifth is a copy of the first (the same event id)."""
    publisher = Publisher("web", settings=Settings(topic_prefix=PREFIX, topic_partitions=2),
                          transport=MemoryTransport(broker))
    await publisher.start()
    for seq in [0, 1, 2, 3, 0]:
        await publisher.publish(Step(key="k0", seq=seq), correlation_id="k0", event_id=f"e{seq}")
    await publisher.close()


def _first_seen(pairs: Sequence[tuple[str, int]]) -> dict[str, list[int]]:
    """Per key, the events in the order of their first occurrence."""
    out: dict[str, list[int]] = {}
    for key, seq in pairs:
        if seq not in out.setdefault(key, []):
            out[key].append(seq)
    return out


def _outputs(broker: MemoryBroker) -> list[tuple[str, int]]:
    wire = Wire("check", [Stepped], topic_prefix=PREFIX)
    events = [wire.decode(r, Stepped)[1] for r in broker.records(OUT)]
    return [(e.key, e.seq) for e in events if isinstance(e, Stepped)]


async def _drive(service: Service, transport: HeldAcks, until: Callable[[], bool], polls: int = 600) -> None:
    """Poll, each time acknowledging the batch before only once the next one is under way."""
    for _ in range(polls):
        if until():
            break
        before = len(transport.pending)
        poll = asyncio.ensure_future(service.poll_once(timeout=0.002))
        for _ in range(20):
            await asyncio.sleep(0)
        transport.release(before)
        await poll
        await asyncio.sleep(0.002)  # lets a backoff (max_backoff_ms=1) run out
    transport.hold = False
    transport.release()
    await service.flush()
    assert until(), f"not reached within {polls} polls"


def _committed(broker: MemoryBroker) -> dict[int, int]:
    group = broker.groups[PREFIX + "pipe"]
    return {p: o for (t, p), o in group.committed.items() if t == PREFIX + Step.topic()}


def _ends(broker: MemoryBroker) -> dict[int, int]:
    return {p: len(records) for p, records in enumerate(broker.topics[PREFIX + Step.topic()])}


async def test_the_next_batch_runs_its_handlers_while_the_acks_of_the_one_before_are_outstanding() -> None:
    broker = MemoryBroker()
    expected = await _publish(broker, 8)
    transport = HeldAcks(broker, hold=True)
    runs: list[tuple[str, int]] = []
    service = _service(broker, transport, MemoryIdempotencyStore(), runs)
    await service.start()

    await service.poll_once(timeout=0.002)
    assert transport.calls == 1 and len(runs) == 4, "the first batch ran and handed its records over"
    first_batch = len(runs)
    wait = asyncio.ensure_future(service.poll_once(timeout=0.002))
    for _ in range(50):
        await asyncio.sleep(0)
    # The second batch ran its handlers, but waits for the first one's acks before it sends.
    assert len(runs) == 8 and transport.calls == 1 and not wait.done()
    assert not _committed(broker), "no offset is stored before its batch is acknowledged and marked done"
    transport.release()
    await wait
    assert transport.calls == 2, "the second batch sent once the first was acknowledged"
    transport.release()
    await service.flush()
    await service.close()
    assert first_batch == 4
    assert _first_seen(_outputs(broker)) == expected
    assert _committed(broker) == _ends(broker)


@pytest.mark.parametrize("failing", [[1], [2], [3], [1, 2], [4]], ids=lambda f: f"sends {f} fail")
async def test_a_failed_send_reads_both_batches_again_and_loses_or_reorders_nothing(failing: list[int]) -> None:
    broker = MemoryBroker()
    expected = await _publish(broker, 16)
    transport = HeldAcks(broker, hold=True, fail=failing)
    runs: list[tuple[str, int]] = []
    service = _service(broker, transport, MemoryIdempotencyStore(), runs)
    await service.start()
    await _drive(service, transport, until=lambda: _committed(broker) == _ends(broker) and transport.calls > max(failing))
    await service.close()
    # Every event took effect, each key's events first in publish order (a re-run repeats a pass).
    assert _first_seen(runs) == expected
    outputs = _outputs(broker)
    assert _first_seen(outputs) == expected, "per-key order of the emitted events"
    assert _committed(broker) == _ends(broker)
    assert len(runs) > 16, "the failed batch ran again"


@pytest.mark.parametrize("failing", [[1], [2], [4]], ids=lambda f: f"done marks {f} fail")
async def test_failed_done_marks_read_both_batches_again_and_lose_nothing(failing: list[int]) -> None:
    broker = MemoryBroker()
    expected = await _publish(broker, 16)
    store = FailingFinish(fail=failing)
    runs: list[tuple[str, int]] = []
    transport = HeldAcks(broker, hold=True)
    service = _service(broker, transport, store, runs)
    await service.start()
    await _drive(service, transport, until=lambda: _committed(broker) == _ends(broker) and store.calls > max(failing))
    await service.close()
    assert _first_seen(runs) == expected
    # The emitted events went out before the marks failed; their re-run emits the same ids again.
    assert _first_seen(_outputs(broker)) == expected
    assert _committed(broker) == _ends(broker)


async def test_a_held_over_event_is_claimed_again_only_after_its_claim_was_given_back() -> None:
    # Event 0 fails once and waits in memory: the batch's tail gives its claim back. The next batch
    # runs it again, so it waits for that tail before it claims (else the late give-back would
    # delete the fresh claim).
    broker = MemoryBroker()
    expected = await _publish(broker, 8)
    store = FailingFinish()
    runs: list[tuple[str, int]] = []
    transport = HeldAcks(broker, hold=True)
    service = _service(broker, transport, store, runs, fails={0: 1})
    await service.start()
    await _drive(service, transport, until=lambda: _committed(broker) == _ends(broker))
    await service.close()
    assert _first_seen(runs) == expected
    key = next(k for kind, keys in store.log if kind == "release" for k in keys)
    events = [kind for kind, keys in store.log if key in keys]
    assert events[:3] == ["claim", "release", "claim"], events


async def test_a_copy_of_an_event_in_the_next_batch_does_not_run_before_the_first_is_marked_done() -> None:
    broker = MemoryBroker()
    # Five records on one key: the fifth, in the second batch, is a copy of the first.
    await _publish_with_copy(broker)
    transport = HeldAcks(broker, hold=True)
    runs: list[tuple[str, int]] = []
    service = _service(broker, transport, MemoryIdempotencyStore(), runs)
    await service.start()
    await service.poll_once(timeout=0.002)
    wait = asyncio.ensure_future(service.poll_once(timeout=0.002))
    for _ in range(50):
        await asyncio.sleep(0)
    transport.release()
    await wait
    transport.release()
    await service.flush()
    await service.close()
    assert runs == [("k0", 0), ("k0", 1), ("k0", 2), ("k0", 3)]
    assert service.stats.skipped_duplicates == 1


async def test_a_replayed_dead_letter_in_the_next_batch_runs_once_its_claim_was_given_back() -> None:
    # The previous batch dead-lettered e0 and gives its claim back in its tail; a copy of e0 in the
    # next batch (as `choreo dlq replay` sends) must run, and claim only after that give-back.
    broker = MemoryBroker()
    await _publish_with_copy(broker)
    transport = HeldAcks(broker, hold=True)
    store = FailingFinish()
    runs: list[tuple[str, int]] = []
    config = Settings(topic_prefix=PREFIX, topic_partitions=2, batch_size=4, concurrency=4, max_backoff_ms=1)
    service = Service("pipe", settings=config, transport=transport, idempotency=store)
    blocked = {0}

    @service.on(Step, emits=[Stepped])
    async def step(event: Step, ctx: Context) -> None:
        await asyncio.sleep(0)
        if event.seq in blocked:
            blocked.discard(event.seq)
            raise DeadLetterNow("blocked until the operator fixes it")
        runs.append((event.key, event.seq))

    await service.start()
    await _drive(service, transport, until=lambda: ("k0", 0) in runs)
    await service.close()
    assert runs == [("k0", 1), ("k0", 2), ("k0", 3), ("k0", 0)]
    assert len(broker.records(PREFIX + Step.topic() + ".dlq")) == 1
    key = next(k for kind, keys in store.log if kind == "release" for k in keys)
    assert [kind for kind, keys in store.log if key in keys][:3] == ["claim", "release", "claim"]
