"""The ``make_transport`` fixture: every conformance test runs once per transport ("memory", "kafka")."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conformance.harness import KafkaTransports, MemoryTransports, TransportFactory


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
async def make_transport(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[TransportFactory]:
    factory: TransportFactory
    if request.param == "memory":
        factory = MemoryTransports(f"t{unique}.")
    else:
        # Only the Kafka parametrization needs the broker, so `-m "not kafka"` starts nothing.
        factory = KafkaTransports(request.getfixturevalue("settings"))
    try:
        yield factory
    finally:
        await factory.close_all()
