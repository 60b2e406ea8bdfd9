"""The Transport contract: what the processing loop needs from a broker.

Two implementations honour it and pass one conformance suite (``tests/conformance``):
``choreo.transport.kafka.KafkaTransport`` (confluent-kafka) and ``choreo.transport.memory``.

Contract, for a transport used by one consumer-group member:

* ``fetch`` returns records in offset order per partition; records of one partition are never
  returned twice unless the partition was rewound with ``seek`` or reassigned after a rebalance.
* ``commit`` records, per partition, the offset of the next record to read. It is asynchronous and
  may be batched; ``close`` and revocation commit whatever was stored before the partition is given
  up. A member that dies without committing has its partitions re-read from the last commit.
* ``send`` takes its records when called (the caller may reuse the list), and the awaitable resolves
  once the broker has acknowledged every record (``acks=all``), or raises ``PublishError``. Records
  of one key keep their order. Sending on a closed transport raises ``TransportError``.
* ``pause``/``resume`` stop and restart delivery of partitions without losing their position. A
  partition (re)assigned by a rebalance starts unpaused at its committed offset.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from choreo.schemas import AvroSchema

#: The topic (after the settings' ``topic_prefix``) where producers register the Avro schemas they
#: write, keyed by fingerprint, so consumers can resolve any writer schema, older or newer than theirs.
SCHEMA_TOPIC = "_choreo.schemas"

TopicPartition = tuple[str, int]
Headers = list[tuple[str, bytes | None]]


@dataclass(slots=True)
class Record:
    """A record read from the broker."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int = 0


@dataclass(slots=True)
class OutgoingRecord:
    """A record to publish."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic to create: ``replication=-1`` leaves the factor to the broker's default."""

    name: str
    partitions: int
    replication: int = -1


RebalanceListener = Callable[[Sequence[TopicPartition]], None]


class Transport(Protocol):
    """A broker connection for one service process: a producer and, once subscribed, a group member."""

    async def connect(self) -> None:
        """Check the broker is reachable; raise ``TransportError`` naming the address if not."""

    async def ensure_topics(self, specs: Sequence[TopicSpec], *, create: bool) -> None:
        """Create missing topics (``create=True``) or raise ``ConfigurationError`` naming them."""

    async def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        *,
        on_assign: RebalanceListener | None = None,
        on_revoke: RebalanceListener | None = None,
    ) -> None:
        """Join ``group`` for ``topics``. Listeners run inside ``fetch`` when assignments change."""

    async def fetch(self, max_records: int, timeout: float) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout`` seconds for the first."""

    def send(self, records: Sequence[OutgoingRecord]) -> Awaitable[None]:
        """Publish ``records``; the awaitable resolves when all are acknowledged."""

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Store the next offset to read per partition; committed asynchronously."""

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Rewind (or advance) a partition so ``offset`` is the next record fetched."""

    def pause(self, partitions: Iterable[TopicPartition]) -> None: ...

    def resume(self, partitions: Iterable[TopicPartition]) -> None: ...

    def assignment(self) -> list[TopicPartition]: ...

    def lag(self) -> dict[TopicPartition, int]:
        """Records not yet consumed per assigned partition (high watermark minus position), from what
        the client last saw; no broker round trip."""

    async def register_schema(self, schema: AvroSchema) -> None:
        """Publish ``schema`` to the schema topic (once per process); returns after the broker's ack."""

    def lookup_schema(self, fingerprint: int) -> AvroSchema | None:
        """The writer schema with ``fingerprint`` from the schema topic, or None. Blocks: it may read
        the topic, which happens once per schema version a process has not seen."""

    async def read_all(self, topic: str, timeout: float = 30.0) -> list[Record]:
        """Every record of ``topic`` from the beginning, without joining a group (operator tooling)."""

    async def delete_records(self, topic: str, before: dict[int, int]) -> None:
        """Delete the records of ``topic`` below ``before[partition]``."""

    async def close(self) -> None:
        """Commit stored offsets, leave the group, flush the producer and release everything."""
