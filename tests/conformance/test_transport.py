"""The Transport contract (``choreo.transport``), checked the same way on the memory and Kafka transports.

Every test builds its clients with ``make_transport()``, creates its topics with ``ensure_topics``
before subscribing, and names its own group, so tests share nothing but the broker.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Sequence

import pytest

from choreo.errors import ConfigurationError, PublishError, TransportError
from choreo.schemas import parse_schema
from choreo.transport import OutgoingRecord, Record, TopicPartition, TopicSpec, Transport
from tests.conformance.harness import TransportFactory, drain, fetch_all_until, fetch_until, summary

pytestmark = [pytest.mark.timeout(60)]


# -- helpers ------------------------------------------------------------------------------------------


async def topic_with(make_transport: TransportFactory, transport: Transport, name: str, partitions: int) -> str:
    topic = make_transport.topic(name)
    await transport.ensure_topics([TopicSpec(topic, partitions)], create=True)
    return topic


def keyed(topic: str, count: int, *, keys: int = 40, tag: str = "v") -> list[OutgoingRecord]:
    """``count`` records spread over ``keys`` keys; values are unique (``tag-i``) to identify records."""
    return [OutgoingRecord(topic, f"key-{i % keys}".encode(), f"{tag}-{i}".encode()) for i in range(count)]


def by_partition(records: Sequence[Record]) -> dict[TopicPartition, list[Record]]:
    parts: dict[TopicPartition, list[Record]] = defaultdict(list)
    for r in records:
        parts[(r.topic, r.partition)].append(r)
    return dict(parts)


def values(records: Sequence[Record]) -> list[bytes | None]:
    """Record values (unique per record in these tests), to compare as lists or as ``Counter`` bags."""
    return [r.value for r in records]


def assert_no_duplicates(records: Sequence[Record]) -> None:
    seen = [(r.topic, r.partition, r.offset) for r in records]
    assert len(seen) == len(set(seen)), f"records delivered twice: {summary(records)}"


async def read_all(make_transport: TransportFactory, topic: str, count: int, group: str) -> list[Record]:
    """A fresh member of a fresh ``group`` reads ``count`` records of ``topic`` from the beginning."""
    reader = make_transport()
    await reader.subscribe([topic], make_transport.group(group))
    return await fetch_until(reader, count)


# -- topics ---------------------------------------------------------------------------------------------


async def test_ensure_topics_creates_missing_topics(make_transport: TransportFactory) -> None:
    transport = make_transport()
    one, three = make_transport.topic("one"), make_transport.topic("three")

    await transport.ensure_topics([TopicSpec(one, 1), TopicSpec(three, 3)], create=True)

    # Now present: checking without creation passes, and creating again is a no-op.
    await transport.ensure_topics([TopicSpec(one, 1), TopicSpec(three, 3)], create=False)
    await transport.ensure_topics([TopicSpec(three, 3)], create=True)


async def test_ensure_topics_without_create_names_the_missing_topic(make_transport: TransportFactory) -> None:
    transport = make_transport()
    present = await topic_with(make_transport, transport, "present", 1)
    absent = make_transport.topic("absent")

    with pytest.raises(ConfigurationError) as info:
        await transport.ensure_topics([TopicSpec(present, 1), TopicSpec(absent, 1)], create=False)

    assert absent in str(info.value)
    assert present not in str(info.value)
    # Checking did not create it.
    with pytest.raises(ConfigurationError):
        await transport.ensure_topics([TopicSpec(absent, 1)], create=False)


# -- producing and fetching ------------------------------------------------------------------------------


async def test_sent_records_come_back_intact_in_offset_order(make_transport: TransportFactory) -> None:
    producer = make_transport()
    topic = await topic_with(make_transport, producer, "roundtrip", 3)
    sent = [
        OutgoingRecord(topic, b"alpha", b"a-0", [("trace", b"t-1"), ("none", None), ("empty", b"")]),
        OutgoingRecord(topic, b"beta", b"b-0", [("dup", b"1"), ("dup", b"2"), ("bin", bytes(range(256)))]),
        OutgoingRecord(topic, b"alpha", b"a-1", []),
        OutgoingRecord(topic, None, b"no-key", [("h", b"x")]),
        OutgoingRecord(topic, b"gamma", b"", [("only-none", None)]),
        OutgoingRecord(topic, "clé-ü".encode(), "välue".encode(), [("ключ", "значение".encode())]),
        *keyed(topic, 30, keys=7),
    ]

    await producer.send(sent)  # resolved: every record is acknowledged and readable by anyone
    got = await read_all(make_transport, topic, len(sent), "roundtrip")

    assert_no_duplicates(got)
    assert Counter(values(got)) == Counter(r.value for r in sent)
    received = {r.value: r for r in got}
    for out in sent:
        r = received[out.value]
        assert (r.topic, r.key, r.value, r.headers) == (out.topic, out.key, out.value, out.headers)
        assert 0 <= r.partition < 3
    for tp, records in by_partition(got).items():
        # A fresh topic without transactions: offsets 0, 1, 2, ... delivered in that order.
        assert [r.offset for r in records] == list(range(len(records))), tp


async def test_records_of_one_key_stay_on_one_partition_in_send_order(make_transport: TransportFactory) -> None:
    producer = make_transport()
    topic = await topic_with(make_transport, producer, "keys", 4)
    sent = keyed(topic, 120, keys=6)
    # Several sends, not awaited one by one: order per key must hold across calls too.
    first, second = producer.send(sent[:60]), producer.send(sent[60:])
    await first
    await second

    got = await read_all(make_transport, topic, len(sent), "keys")

    assert_no_duplicates(got)
    per_key: dict[bytes | None, list[Record]] = defaultdict(list)
    for r in got:
        per_key[r.key].append(r)
    assert len(per_key) == 6
    for key, records in per_key.items():
        assert len({r.partition for r in records}) == 1, f"{key!r} spread over partitions"
        assert [r.offset for r in records] == sorted(r.offset for r in records)
        assert values(records) == [r.value for r in sent if r.key == key]


async def test_send_of_nothing_resolves(make_transport: TransportFactory) -> None:
    await make_transport().send([])


async def test_send_takes_its_records_when_called(make_transport: TransportFactory) -> None:
    # send() is a plain method returning an awaitable (not a coroutine): the records are handed over
    # when it is called, so the caller may reuse its list or records before awaiting the ack.
    producer = make_transport()
    topic = await topic_with(make_transport, producer, "handover", 1)
    batch = keyed(topic, 5)
    pending = producer.send(batch)
    batch.clear()
    await pending
    await producer.send([OutgoingRecord(topic, b"k", b"last")])

    consumer = make_transport()
    await consumer.subscribe([topic], make_transport.group("handover"))
    got = await fetch_until(consumer, lambda rs: b"last" in values(rs))
    assert values(got) == [*(f"v-{i}".encode() for i in range(5)), b"last"]


async def test_refused_send_raises_publish_error(make_transport: TransportFactory) -> None:
    producer = make_transport()
    topic = await topic_with(make_transport, producer, "refused", 1)

    with pytest.raises(PublishError) as info:
        await make_transport.failing_send(producer, topic)

    assert isinstance(info.value, TransportError)
    # One refused record does not break the transport: the next send goes through.
    await producer.send([OutgoingRecord(topic, b"k", b"after")])


async def test_fetched_records_are_the_consumers_own_copies(make_transport: TransportFactory) -> None:
    # Handlers get the record's header list (Envelope.headers); what they do to it must not change
    # the record for a redelivery or for other groups.
    producer = make_transport()
    topic = await topic_with(make_transport, producer, "copies", 1)
    sent = OutgoingRecord(topic, b"k", b"v", [("h", b"1")])
    await producer.send([sent])
    consumer = make_transport()
    await consumer.subscribe([topic], make_transport.group("copies"))
    [record] = await fetch_until(consumer, 1)

    record.headers.append(("added", b"by a handler"))
    record.value = b"changed"
    consumer.seek((topic, 0), 0)
    [again] = await fetch_until(consumer, 1)

    assert (again.value, again.headers) == (b"v", [("h", b"1")])


# -- schema topic ---------------------------------------------------------------------------------------


async def test_a_registered_schema_can_be_looked_up_by_another_client(make_transport: TransportFactory) -> None:
    schema = parse_schema(
        {"type": "record", "name": "Ping", "namespace": "conformance", "version": 1,
         "fields": [{"name": "n", "type": "int"}]}
    )
    writer, reader = make_transport(), make_transport()

    await writer.register_schema(schema)
    await writer.register_schema(schema)  # once per process: a repeat is a no-op

    # lookup_schema blocks (it may read the schema topic), so keep it off the event loop.
    assert await asyncio.to_thread(reader.lookup_schema, schema.fingerprint) == schema
    assert await asyncio.to_thread(reader.lookup_schema, schema.fingerprint ^ 1) is None


# -- offsets and group membership ---------------------------------------------------------------------


def halfway(records: Sequence[Record]) -> dict[TopicPartition, int]:
    """Per partition, the offset of its middle record (the next one to read after a commit there)."""
    return {tp: rs[len(rs) // 2].offset for tp, rs in by_partition(records).items()}


def at_or_after(records: Sequence[Record], cut: dict[TopicPartition, int]) -> list[Record]:
    return [r for r in records if r.offset >= cut[(r.topic, r.partition)]]


async def test_new_member_resumes_after_the_committed_offsets(make_transport: TransportFactory) -> None:
    first = make_transport()
    topic = await topic_with(make_transport, first, "resume", 4)
    group = make_transport.group("resume")
    sent = keyed(topic, 40)
    await first.send(sent)
    await first.subscribe([topic], group)
    read = await fetch_until(first, len(sent))
    assert len(by_partition(read)) == 4, "every partition should hold records"

    cut = halfway(read)
    first.commit(cut)
    await first.close()  # right away: close must commit what was stored
    later = keyed(topic, 12, tag="later")
    second = make_transport()
    await second.send(later)
    await second.subscribe([topic], group)

    expected = at_or_after(read, cut)
    wanted = {r.value for r in expected} | {r.value for r in later}
    got = await fetch_until(second, lambda rs: wanted <= {r.value for r in rs})
    got += await drain(second, 0.2)

    assert_no_duplicates(got)
    assert Counter(values(got)) == Counter(wanted)
    assert all(r.offset >= cut[(r.topic, r.partition)] for r in got), "re-read a committed record"


async def test_member_that_vanishes_has_its_uncommitted_records_re_read(make_transport: TransportFactory) -> None:
    first = make_transport()
    topic = await topic_with(make_transport, first, "vanish", 4)
    group = make_transport.group("vanish")
    sent = keyed(topic, 40)
    await first.send(sent)
    await first.subscribe([topic], group)
    read = await fetch_until(first, len(sent))
    cut = halfway(read)
    first.commit(cut)  # the first half is done; the member read the rest but never finished it
    await make_transport.vanish(first)

    second = make_transport()
    await second.subscribe([topic], group)
    expected = at_or_after(read, cut)
    got = await fetch_until(second, len(expected))
    got += await drain(second, 0.2)

    assert_no_duplicates(got)
    assert Counter(values(got)) == Counter(values(expected))


async def test_seek_rewinds_one_partition_also_across_pause_and_resume(make_transport: TransportFactory) -> None:
    consumer = make_transport()
    topic = await topic_with(make_transport, consumer, "seek", 4)
    await consumer.send(keyed(topic, 40))
    await consumer.subscribe([topic], make_transport.group("seek"))
    read = await fetch_until(consumer, 40)
    parts = by_partition(read)
    tp = max(parts, key=lambda p: len(parts[p]))
    assert len(parts[tp]) >= 4

    consumer.seek(tp, 2)
    again = await fetch_until(consumer, len(parts[tp]) - 2)
    again += await drain(consumer, 0.2)

    assert summary(again) == summary(parts[tp][2:])

    # The service's retry pattern: rewind and hold the partition, then let it go.
    consumer.seek(tp, 1)
    consumer.pause([tp])
    assert await drain(consumer, 0.2) == []
    consumer.resume([tp])
    retried = await fetch_until(consumer, len(parts[tp]) - 1)
    retried += await drain(consumer, 0.2)
    assert summary(retried) == summary(parts[tp][1:])


async def test_pause_stops_one_partition_and_resume_restarts_it(make_transport: TransportFactory) -> None:
    consumer = make_transport()
    topic = await topic_with(make_transport, consumer, "pause", 4)
    await consumer.send(keyed(topic, 40, tag="before"))
    await consumer.subscribe([topic], make_transport.group("pause"))
    before = await fetch_until(consumer, 40)
    partition_of = {r.key: (r.topic, r.partition) for r in before}
    paused = sorted(by_partition(before))[0]

    consumer.pause([paused])
    batch = keyed(topic, 40, tag="during")  # the same keys, so the same partitions as before
    await consumer.send(batch)
    for_paused = [r.value for r in batch if partition_of[r.key] == paused]
    for_others = {tp: [r.value for r in batch if partition_of[r.key] == tp] for tp in partition_of.values()}
    del for_others[paused]

    during = await fetch_until(consumer, 40 - len(for_paused))
    during += await drain(consumer, 0.3)
    assert paused not in by_partition(during), "a paused partition delivered records"
    assert {tp: values(rs) for tp, rs in by_partition(during).items()} == for_others

    consumer.resume([paused])
    after = await fetch_until(consumer, len(for_paused))
    after += await drain(consumer, 0.2)
    assert {tp: values(rs) for tp, rs in by_partition(after).items()} == {paused: for_paused}, (
        "resume lost or repeated records"
    )


async def test_pause_without_seek_keeps_records_already_prefetched(make_transport: TransportFactory) -> None:
    """Backpressure pauses a partition whose records the client has fetched ahead but not handed
    out: on resume those records come, from the next offset the caller has not seen, none twice."""
    consumer = make_transport()
    topic = await topic_with(make_transport, consumer, "prefetch", 1)
    sent = [OutgoingRecord(topic, b"k", f"p-{i}".encode()) for i in range(300)]
    await consumer.send(sent)
    await consumer.subscribe([topic], make_transport.group("prefetch"))
    first: list[Record] = []
    while not first:
        first = await consumer.fetch(10, 1.0)
    await asyncio.sleep(0.3)  # time for the client to prefetch the rest
    tp = (first[0].topic, first[0].partition)
    consumer.pause([tp])
    assert await drain(consumer, 0.3) == [], "a paused partition delivered records"
    consumer.resume([tp])
    rest = await fetch_until(consumer, 300 - len(first))
    rest += await drain(consumer, 0.2)
    assert values(first + rest) == [r.value for r in sent], "resume lost or repeated records"


async def test_members_split_the_partitions_and_the_last_one_takes_all(make_transport: TransportFactory) -> None:
    a, b = make_transport(), make_transport()
    topic = await topic_with(make_transport, a, "split", 4)
    group = make_transport.group("split")
    everything = {(topic, p) for p in range(4)}
    assigned: dict[str, list[Sequence[TopicPartition]]] = {"a": [], "b": [], "a-revoked": [], "b-revoked": []}
    await a.subscribe([topic], group, on_assign=assigned["a"].append, on_revoke=assigned["a-revoked"].append)
    await b.subscribe([topic], group, on_assign=assigned["b"].append, on_revoke=assigned["b-revoked"].append)

    def split(_: object) -> bool:
        mine, theirs = set(a.assignment()), set(b.assignment())
        return bool(mine) and bool(theirs) and not mine & theirs and mine | theirs == everything

    await fetch_all_until([a, b], split)
    assert set(assigned["a"][-1]) == set(a.assignment())
    assert set(assigned["b"][-1]) == set(b.assignment())

    sent = keyed(topic, 40, tag="split")
    await a.send(sent)
    got_a, got_b = await fetch_all_until([a, b], lambda got: sum(map(len, got)) >= len(sent))
    got_a += await drain(a, 0.2)
    got_b += await drain(b, 0.2)
    assert {(r.topic, r.partition) for r in got_a} <= set(a.assignment())
    assert {(r.topic, r.partition) for r in got_b} <= set(b.assignment())
    assert Counter(values(got_a + got_b)) == Counter(r.value for r in sent)
    a.commit({(r.topic, r.partition): r.offset + 1 for r in got_a})
    b.commit({(r.topic, r.partition): r.offset + 1 for r in got_b})

    a_had = set(a.assignment())
    await a.close()
    assert assigned["a-revoked"] and set(assigned["a-revoked"][-1]) == a_had

    await fetch_until(b, lambda _: set(b.assignment()) == everything)
    assert set(assigned["b"][-1]) == everything
    late = keyed(topic, 20, tag="late")
    await b.send(late)
    got = await fetch_until(b, lambda rs: {r.value for r in late} <= {r.value for r in rs})
    got += await drain(b, 0.2)
    # a committed what it processed, so b reads only the new records, from all four partitions.
    assert Counter(values(got)) == Counter(r.value for r in late)


async def test_a_partition_reassigned_by_a_rebalance_starts_unpaused(make_transport: TransportFactory) -> None:
    # Service._assigned forgets its pauses (retry backoff, halted partitions) on a new assignment, so
    # the transport must deliver a (re)assigned partition from its committed offset, paused or not before.
    a, b = make_transport(), make_transport()
    topic = await topic_with(make_transport, a, "repause", 4)
    group = make_transport.group("repause")
    everything = {(topic, p) for p in range(4)}
    await a.send(keyed(topic, 40, tag="before"))
    await a.subscribe([topic], group)
    read = await fetch_until(a, 40)
    a.commit({(r.topic, r.partition): r.offset + 1 for r in read})
    a.pause(a.assignment())

    await b.subscribe([topic], group)

    def split(_: object) -> bool:
        mine, theirs = set(a.assignment()), set(b.assignment())
        return bool(mine) and bool(theirs) and mine | theirs == everything

    await fetch_all_until([a, b], split)
    sent = keyed(topic, 40, tag="after")
    await a.send(sent)
    # Bounded well below the group timeout: the records are there; only a stuck pause withholds them.
    got_a, got_b = await fetch_all_until([a, b], lambda got: sum(map(len, got)) >= len(sent), timeout_s=2)
    got_a += await drain(a, 0.2)

    assert got_a, "the member that paused before the rebalance received nothing"
    assert Counter(values(got_a + got_b)) == Counter(r.value for r in sent)


async def test_send_on_a_closed_transport_raises_transport_error(make_transport: TransportFactory) -> None:
    producer = make_transport()
    topic = await topic_with(make_transport, producer, "closed", 1)
    await producer.close()
    with pytest.raises(TransportError, match="closed"):
        producer.send([OutgoingRecord(topic, b"k", b"v")])
