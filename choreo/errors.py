"""The one error tree of choreo.

    ChoreoError
     ├── ConfigurationError      bad settings, declarations or arguments; raised at start-up
     ├── SchemaError             an Avro schema or a model that disagrees with it
     │    ├── IncompatibleSchemaError   a schema change that old data cannot be read with
     │    └── DecodeError               bytes or headers that are not a valid choreo event
     ├── TransportError          the broker cannot be reached or refused an operation
     │    └── PublishError             an event the broker did not acknowledge
     ├── IdempotencyError        the idempotency store (Redis) cannot be reached or failed
     └── EmitError               a handler emitted an event type it did not declare

Handler control signals (retry later, dead-letter now) are deliberately outside this tree, so an
``except ChoreoError`` in user code never swallows them.
"""

from __future__ import annotations


class ChoreoError(Exception):
    """Root of every error choreo raises."""


class ConfigurationError(ChoreoError):
    """Invalid settings, declarations or arguments, detected before any event is processed."""


class SchemaError(ChoreoError):
    """An Avro schema that cannot be used, or a model that disagrees with its schema.

    ``path`` is the schema file and ``field`` the offending field, when known.
    """

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class IncompatibleSchemaError(SchemaError):
    """A schema change that breaks reading data written with the previous version."""


class DecodeError(SchemaError):
    """A record whose value or headers cannot be decoded into an event.

    The transport adds where the record came from (topic, partition, offset) when it reports it.
    """

    def __init__(self, message: str, *, reason: str = "decode", **kwargs: str | None) -> None:
        super().__init__(message, **kwargs)
        self.reason = reason


class TransportError(ChoreoError):
    """The broker cannot be reached, or refused an operation."""


class PublishError(TransportError):
    """An event was not acknowledged by the broker."""

    def __init__(self, message: str, *, topic: str | None = None, event_id: str | None = None) -> None:
        super().__init__(message)
        self.topic = topic
        self.event_id = event_id


class IdempotencyError(ChoreoError):
    """The idempotency store cannot be reached or answered unexpectedly."""


class EmitError(ChoreoError):
    """A handler emitted an event type that its registration does not declare."""
