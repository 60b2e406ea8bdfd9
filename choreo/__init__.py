"""choreo: event-driven choreography and sagas over Apache Kafka.

Typed Avro events, services whose handlers run effectively once (Kafka's at-least-once delivery plus
Redis idempotency keys), and publishers for code outside handlers.
"""

from choreo.breaker import CircuitBreaker
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
from choreo.logs import configure_logging, event_context
from choreo.publisher import BlockingPublisher, Publisher
from choreo.routing import Subscription
from choreo.deadletter import DLQHeader, Failure
from choreo.retry import DeadLetterNow, RetryLater, RetryPolicy
from choreo.saga import CompensationFailed, Saga, SagaTimedOut
from choreo.tracker import SagaTracker
from choreo.service import Service, ServiceStats
from choreo.settings import Settings

__all__ = [
    "BlockingPublisher",
    "ChoreoError",
    "CircuitBreaker",
    "CompensationFailed",
    "ConfigurationError",
    "Context",
    "DLQHeader",
    "DeadLetterNow",
    "DecodeError",
    "EmitError",
    "Envelope",
    "Event",
    "Failure",
    "FlowGraph",
    "Header",
    "IdempotencyError",
    "IncompatibleSchemaError",
    "Problem",
    "PublishError",
    "Publisher",
    "RetryLater",
    "RetryPolicy",
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
    "configure_logging",
    "event_context",
]
