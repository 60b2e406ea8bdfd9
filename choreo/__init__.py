"""choreo: event-driven choreography and sagas over Apache Kafka.

Typed Avro events, services whose handlers run effectively once (Kafka's at-least-once delivery plus
Redis idempotency keys), and publishers for code outside handlers.
"""

from choreo.context import Context
from choreo.errors import (
    ChoreoError,
    ConfigurationError,
    DecodeError,
    EmitError,
    IdempotencyError,
    IncompatibleSchemaError,
    PublishError,
    SchemaError,
    TransportError,
)
from choreo.events import Envelope, Event, Header
from choreo.graph import FlowGraph, Problem, Step
from choreo.publisher import BlockingPublisher, Publisher
from choreo.routing import Subscription
from choreo.saga import Saga, SagaTimedOut
from choreo.tracker import SagaTracker
from choreo.service import Service, ServiceStats
from choreo.settings import Settings

__all__ = [
    "BlockingPublisher",
    "ChoreoError",
    "ConfigurationError",
    "Context",
    "DecodeError",
    "EmitError",
    "Envelope",
    "Event",
    "FlowGraph",
    "Header",
    "IdempotencyError",
    "IncompatibleSchemaError",
    "Problem",
    "PublishError",
    "Publisher",
    "Saga",
    "SagaTimedOut",
    "SagaTracker",
    "SchemaError",
    "Service",
    "ServiceStats",
    "Settings",
    "Step",
    "Subscription",
    "TransportError",
]
