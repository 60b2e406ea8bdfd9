"""Transport factories and fetch helpers for the conformance suite.

A ``TransportFactory`` builds clients of one transport for one test; all clients of a test share a
broker (one ``MemoryBroker``, or the run's Kafka-protocol broker) and a topic prefix of their own, and
``close_all`` closes every one of them. The few things the Transport protocol cannot express the same way
for both (a member that dies, a send the broker refuses) are methods of the factory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from choreo import Settings
from choreo.transport import OutgoingRecord, Record, Transport
from choreo.transport.memory import MemoryBroker, MemoryTransport


class TransportFactory:
    """Builds transports of one kind for one test and closes them all at teardown."""

    kind: str

    def __init__(self, topic_prefix: str) -> None:
        self.topic_prefix = topic_prefix
        self.built: list[Transport] = []

    def __call__(self) -> Transport:
        transport = self._build(f"conformance-{len(self.built)}")
        self.built.append(transport)
        return transport

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def _build(self, client_id: str) -> Transport:
        raise NotImplementedError

    async def vanish(self, transport: Transport) -> None:
        """Make ``transport`` leave its group without committing anything it has not committed yet."""
        raise NotImplementedError

    async def failing_send(self, transport: Transport, topic: str) -> None:
        """Await a send of one record that the broker refuses (it must raise ``PublishError``)."""
        raise NotImplementedError

    async def close_all(self) -> None:
        await asyncio.gather(*(t.close() for t in reversed(self.built)))


class MemoryTransports(TransportFactory):
    kind = "memory"

    def __init__(self, topic_prefix: str) -> None:
        super().__init__(topic_prefix)
        self.broker = MemoryBroker()

    def _build(self, client_id: str) -> Transport:
        return MemoryTransport(self.broker)

    async def vanish(self, transport: Transport) -> None:
        assert isinstance(transport, MemoryTransport)
        transport.crash()

    async def failing_send(self, transport: Transport, topic: str) -> None:
        self.broker.available = False
        try:
            await transport.send([OutgoingRecord(topic, b"k", b"refused")])
        finally:
            self.broker.available = True


class KafkaTransports(TransportFactory):
    kind = "kafka"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.topic_prefix)
        self.settings = settings

    def _build(self, client_id: str) -> Transport:
        from choreo.transport.kafka import KafkaTransport

        return KafkaTransport(self.settings, client_id=client_id)

    async def vanish(self, transport: Transport) -> None:
        # A killed process would take a session timeout (6 s) plus a rebalance to be noticed. Closing
        # without storing offsets is what matters here: only offsets passed to commit() reach the group.
        await transport.close()

    async def failing_send(self, transport: Transport, topic: str) -> None:
        # Kafka and Tansu both answer the metadata request for an illegal name with
        # INVALID_TOPIC_EXCEPTION (Tansu auto-creates any *legal* unknown name), so the delivery fails.
        await transport.send([OutgoingRecord("bad topic!", b"k", b"refused")])



#: Long enough for a group join (about 3 s) plus one rebalance round (about 4 s) on Tansu or Kafka.
GROUP_TIMEOUT_S = 30.0


async def fetch_until(
    transport: Transport,
    predicate_or_count: int | Callable[[list[Record]], bool],
    timeout_s: float = GROUP_TIMEOUT_S,
) -> list[Record]:
    """Fetch until ``count`` records arrived (or ``predicate(records so far)`` holds); fail at the deadline."""
    done: Callable[[list[Record]], bool]
    if isinstance(predicate_or_count, int):
        count = predicate_or_count
        done = lambda records: len(records) >= count  # noqa: E731
    else:
        done = predicate_or_count
    records: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while not done(records):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"fetch_until gave up after {timeout_s} s with {len(records)} records: {summary(records)}"
            )
        records.extend(await transport.fetch(500, 0.1))
    return records


async def fetch_all_until(
    transports: Sequence[Transport],
    predicate: Callable[[list[list[Record]]], bool],
    timeout_s: float = GROUP_TIMEOUT_S,
) -> list[list[Record]]:
    """Fetch on several group members at once (a rebalance needs every member polling) until ``predicate``."""
    received: list[list[Record]] = [[] for _ in transports]
    deadline = time.monotonic() + timeout_s
    while not predicate(received):
        if time.monotonic() > deadline:
            assignments = [t.assignment() for t in transports]
            raise AssertionError(f"gave up after {timeout_s} s; assignments {assignments}")
        batches = await asyncio.gather(*(t.fetch(500, 0.1) for t in transports))
        for seen, batch in zip(received, batches):
            seen.extend(batch)
    return received


async def drain(transport: Transport, seconds: float = 0.2) -> list[Record]:
    """Everything ``transport`` delivers during ``seconds`` (to check that nothing more arrives)."""
    records: list[Record] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        records.extend(await transport.fetch(500, 0.1))
    return records


def summary(records: Sequence[Record]) -> list[tuple[int, int, bytes | None]]:
    return [(r.partition, r.offset, r.value) for r in records]
