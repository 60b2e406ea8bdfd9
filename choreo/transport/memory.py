"""An in-memory transport: a real implementation of the Transport contract, for fast tests.

``MemoryBroker`` holds topics (partitioned logs), committed offsets per consumer group and group
membership; each ``MemoryTransport`` is one client of it. Keys go to partitions by a stable hash, so
one key's records stay in order; groups split partitions among members (range-style) and rebalance
when a member joins or leaves; a closed or crashed member's partitions are re-read from the last
commit by the others. It passes the same conformance suite as the Kafka transport.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from choreo.errors import ConfigurationError, PublishError, TransportError
from choreo.schemas import AvroSchema
from choreo.transport import OutgoingRecord, RebalanceListener, Record, TopicPartition, TopicSpec


@dataclass
class _Group:
    members: list[MemoryTransport] = field(default_factory=list)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    generation: int = 0


class MemoryBroker:
    """Topics, groups and offsets shared by every ``MemoryTransport`` built on it."""

    def __init__(self, *, default_partitions: int = 4) -> None:
        self.topics: dict[str, list[list[Record]]] = {}
        self.groups: dict[str, _Group] = {}
        self.default_partitions = default_partitions
        self.schemas: dict[int, AvroSchema] = {}  # the schema topic
        self.low: dict[TopicPartition, int] = {}  # first offset not deleted (delete_records)
        self.available = True  # False simulates an outage: every call raises TransportError

    def create_topic(self, name: str, partitions: int) -> None:
        self.topics.setdefault(name, [[] for _ in range(partitions)])

    def append(self, record: OutgoingRecord) -> tuple[int, int]:
        if record.topic not in self.topics:
            self.create_topic(record.topic, self.default_partitions)
        parts = self.topics[record.topic]
        partition = zlib.crc32(record.key) % len(parts) if record.key is not None else 0
        log = parts[partition]
        offset = len(log)
        log.append(Record(record.topic, partition, offset, record.key, record.value, list(record.headers)))
        return partition, offset

    def records(self, topic: str) -> list[Record]:
        """Every record of ``topic``, partition by partition (for assertions in tests)."""
        return [r for part in self.topics.get(topic, []) for r in part]

    def _rebalance(self, group: _Group) -> None:
        group.generation += 1
        members = group.members
        topics = sorted({t for m in members for t in m._topics})
        partitions = [(t, p) for t in topics for p in range(len(self.topics.get(t, [])))]
        plan: dict[int, list[TopicPartition]] = {id(m): [] for m in members}
        eligible = {id(m): set(m._topics) for m in members}
        index = 0
        for tp in partitions:
            for _ in range(len(members)):
                member = members[index % len(members)]
                index += 1
                if tp[0] in eligible[id(member)]:
                    plan[id(member)].append(tp)
                    break
        for member in members:
            member._pending_assignment = (group.generation, plan[id(member)])


class MemoryTransport:
    """One client (producer and, once subscribed, group member) of a ``MemoryBroker``."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self._group_name: str | None = None
        self._topics: list[str] = []
        self._assigned: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._pending_assignment: tuple[int, list[TopicPartition]] | None = None
        self._on_assign: RebalanceListener | None = None
        self._on_revoke: RebalanceListener | None = None
        self._closed = False

    def _check(self) -> None:
        if not self.broker.available:
            raise TransportError("memory broker unavailable")
        if self._closed:
            raise TransportError("transport is closed")

    async def connect(self) -> None:
        self._check()

    async def ensure_topics(self, specs: Sequence[TopicSpec], *, create: bool) -> None:
        self._check()
        missing = [s for s in specs if s.name not in self.broker.topics]
        if missing and not create:
            raise ConfigurationError(f"topics missing: {', '.join(s.name for s in missing)}")
        for spec in missing:
            self.broker.create_topic(spec.name, spec.partitions)

    async def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        *,
        on_assign: RebalanceListener | None = None,
        on_revoke: RebalanceListener | None = None,
    ) -> None:
        self._check()
        missing = [t for t in topics if t not in self.broker.topics]
        if missing:
            raise TransportError(f"subscribed topics not available: {', '.join(missing)}")
        self._group_name, self._topics = group, list(topics)
        self._on_assign, self._on_revoke = on_assign, on_revoke
        g = self.broker.groups.setdefault(group, _Group())
        g.members.append(self)
        self.broker._rebalance(g)

    def _group(self) -> _Group:
        if self._group_name is None:
            raise TransportError("the transport is not subscribed")
        return self.broker.groups[self._group_name]

    def _apply_rebalance(self) -> None:
        pending, self._pending_assignment = self._pending_assignment, None
        if pending is None:
            return
        _, partitions = pending
        if self._assigned and self._on_revoke:
            self._on_revoke(list(self._assigned))
        committed = self._group().committed
        self._assigned = list(partitions)
        self._positions = {tp: committed.get(tp, 0) for tp in partitions}
        self._paused.clear()
        if self._on_assign:
            self._on_assign(list(partitions))

    async def fetch(self, max_records: int, timeout: float) -> list[Record]:
        self._check()
        self._apply_rebalance()
        out = self._take(max_records)
        if not out and timeout > 0:
            await asyncio.sleep(min(timeout, 0.01))
            self._apply_rebalance()
            out = self._take(max_records)
        return out

    def _take(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        for tp in self._assigned:
            if tp in self._paused:
                continue
            log = self.broker.topics[tp[0]][tp[1]]
            position = max(self._positions[tp], self.broker.low.get(tp, 0))
            chunk = log[position : position + max_records - len(out)]
            # Each consumer gets its own copies, as records read off the network would be.
            out.extend(Record(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers), r.timestamp_ms)
                       for r in chunk)
            self._positions[tp] = position + len(chunk)
            if len(out) >= max_records:
                break
        return out

    def send(self, records: Sequence[OutgoingRecord]) -> asyncio.Future[None]:
        # Records are handed over when send() is called, as with a real producer's queue.
        if self._closed:
            raise TransportError("cannot send: the transport is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.broker.available:
            future.set_exception(PublishError("broker did not acknowledge: memory broker unavailable"))
            return future
        for r in records:
            self.broker.append(r)
        future.set_result(None)
        return future

    async def register_schema(self, schema: AvroSchema) -> None:
        self._check()
        self.broker.schemas[schema.fingerprint] = schema

    def lookup_schema(self, fingerprint: int) -> AvroSchema | None:
        return self.broker.schemas.get(fingerprint)

    async def read_all(self, topic: str, timeout: float = 30.0) -> list[Record]:
        self._check()
        low = self.broker.low
        return [Record(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers), r.timestamp_ms)
                for r in self.broker.records(topic) if r.offset >= low.get((r.topic, r.partition), 0)]

    async def delete_records(self, topic: str, before: dict[int, int]) -> None:
        self._check()
        for partition, offset in before.items():
            key = (topic, partition)
            self.broker.low[key] = max(self.broker.low.get(key, 0), offset)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._check()
        committed = self._group().committed
        for tp, offset in offsets.items():
            if tp in self._positions:  # a revoked partition's offsets are not ours to commit
                committed[tp] = offset

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if partition in self._positions:
            self._positions[partition] = offset

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        self._paused.update(partitions)

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        self._paused.difference_update(partitions)

    def assignment(self) -> list[TopicPartition]:
        return list(self._assigned)

    def lag(self) -> dict[TopicPartition, int]:
        return {tp: max(0, len(self.broker.topics[tp[0]][tp[1]]) - self._positions.get(tp, 0))
                for tp in self._assigned}

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._group_name is not None:
            group = self._group()
            if self._on_revoke and self._assigned:
                self._on_revoke(list(self._assigned))
            group.members.remove(self)
            self.broker._rebalance(group)

    def crash(self) -> None:
        """Vanish without committing or revoking, as a killed process would."""
        self._closed = True
        if self._group_name is not None:
            group = self._group()
            group.members.remove(self)
            self.broker._rebalance(group)
