"""Shared fixtures: one real broker and one real Redis per test run, unique names per test.

By default the embedded stack (Tansu + Redis) is started once per run. ``CHOREO_KAFKA`` and
``CHOREO_REDIS`` point the tests at external servers instead (``make test-kafka`` sets
``CHOREO_KAFKA`` to an Apache Kafka broker and ``CHOREO_BROKER=kafka``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from choreo import Settings


@dataclass(frozen=True)
class Endpoints:
    kafka: str
    redis: str
    broker: str  # "tansu" or "kafka"


@pytest.fixture(scope="session")
def endpoints() -> Iterator[Endpoints]:
    kafka = os.environ.get("CHOREO_KAFKA")
    redis = os.environ.get("CHOREO_REDIS")
    broker = os.environ.get("CHOREO_BROKER", "tansu" if not kafka else "external")
    if kafka and redis:
        yield Endpoints(kafka, redis, broker)
        return
    from choreo.devstack import start_dev_stack

    stack = start_dev_stack()
    try:
        yield Endpoints(kafka or stack.kafka_bootstrap, redis or stack.redis_url, broker)
    finally:
        stack.stop()


@pytest.fixture
def unique() -> str:
    """A short unique token for topic prefixes, groups and Redis key prefixes."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(endpoints: Endpoints, unique: str) -> Settings:
    """Settings for one test: its own topic and Redis key namespaces, test-friendly timings."""
    return Settings(
        kafka_bootstrap=endpoints.kafka,
        redis_url=endpoints.redis,
        topic_prefix=f"t{unique}.",
        redis_prefix=f"t{unique}:",
        topic_partitions=4,
        topic_replication=1,
        commit_interval_ms=200,
        # A crashed test process's claims are taken over after 2 s rather than the default lease.
        claim_lease_ms=2_000,
    )


def service_env(settings: Settings) -> dict[str, str]:
    """Environment for a service subprocess that must use the same namespaces as ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHOREO_")}
    env.update(
        CHOREO_KAFKA=settings.kafka_bootstrap,
        CHOREO_REDIS=settings.redis_url,
        CHOREO_TOPIC_PREFIX=settings.topic_prefix,
        CHOREO_REDIS_PREFIX=settings.redis_prefix,
        CHOREO_TOPIC_PARTITIONS=str(settings.topic_partitions),
        CHOREO_TOPIC_REPLICATION=str(settings.topic_replication),
        CHOREO_COMMIT_INTERVAL_MS=str(settings.commit_interval_ms),
        CHOREO_CLAIM_LEASE_MS=str(settings.claim_lease_ms),
        PYTHONUNBUFFERED="1",
    )
    return env
