"""Fuzz the consuming side with random values and headers: nothing crashes the service, and every
record ends processed or dead-lettered, in order, with its partition moving on."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from choreo import Context, Event, Header, Publisher, Service, Settings
from choreo.schemas import parse_schema
from choreo.stores.memory import MemoryIdempotencyStore
from choreo.transport import OutgoingRecord
from choreo.transport.memory import MemoryBroker, MemoryTransport


class Ping(Event, schema=parse_schema({
    "type": "record", "name": "Ping", "namespace": "fuzz", "version": 1,
    "fields": [{"name": "n", "type": "long"}, {"name": "note", "type": "string"}],
})):
    n: int
    note: str


names = st.sampled_from([*Header.REQUIRED, Header.CAUSATION_ID, Header.ATTEMPT, "other", ""])
header_lists = st.lists(st.tuples(names, st.one_of(st.none(), st.binary(max_size=40))), max_size=10)
values = st.one_of(st.binary(max_size=60), st.builds(lambda tail: b"\xc3\x01" + tail, st.binary(max_size=40)))
garbage = st.lists(st.tuples(values, header_lists, st.booleans()), min_size=1, max_size=12)


async def _scenario(records: list[tuple[bytes, list[tuple[str, bytes | None]], bool]]) -> None:
    broker = MemoryBroker()
    config = Settings(topic_prefix="f.", topic_partitions=1)
    service = Service("fuzz", settings=config, transport=MemoryTransport(broker), idempotency=MemoryIdempotencyStore())
    seen: list[int] = []

    @service.on(Ping)
    async def handle(event: Ping, ctx: Context) -> None:
        seen.append(event.n)

    publisher = Publisher("p", settings=config, transport=MemoryTransport(broker))
    await publisher.start()
    await service.start()
    topic = config.topic_prefix + Ping.topic()
    good = 0
    for i, (value, headers, keep_valid_headers) in enumerate(records):
        # Mix real events in, so order around the garbage is checked too.
        await publisher.publish(Ping(n=i, note="ok"), event_id=f"ok-{i}", correlation_id="k", key="k")
        good += 1
        valid = list(broker.records(topic)[-1].headers)
        broker.append(OutgoingRecord(topic, b"k", value, (valid + headers) if keep_valid_headers else headers))
    for _ in range(200):
        await service.poll_once(timeout=0)
        committed = broker.groups[service.group].committed.get((topic, 0), 0)
        if committed == 2 * len(records):
            break
    await service.close()
    await publisher.close()
    assert broker.groups[service.group].committed[(topic, 0)] == 2 * len(records), "every record was finished"
    # Random bytes never carry the Ping schema's fingerprint, so each one is dead-lettered, and the
    # real events around them are handled once each, in order.
    assert seen == list(range(good))
    assert len(broker.records(topic + ".dlq")) == len(records), "each random record is dead-lettered, none lost"


@hsettings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=garbage)
def test_random_records_never_crash_the_service_and_none_is_lost(
    records: list[tuple[bytes, list[tuple[str, bytes | None]], bool]]
) -> None:
    asyncio.run(_scenario(records))
