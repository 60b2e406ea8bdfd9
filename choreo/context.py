"""The context a handler receives: emit events, read the envelope, log with the event's identity."""

from __future__ import annotations

import logging
from typing import Any

from choreo.errors import EmitError
from choreo.events import Envelope, Event


class Context:
    """Per-event handler context.

    Events passed to ``emit`` are buffered and published only after the handler returns without an
    error; if it raises, nothing it emitted is sent. Each emitted event gets an id derived from the
    input event id, the handler name and its position, so a re-run after a crash emits the same ids.
    """

    __slots__ = ("envelope", "service", "handler", "idempotency_key", "_allowed", "emitted", "_logger")

    def __init__(
        self,
        envelope: Envelope,
        *,
        service: str,
        handler: str,
        idempotency_key: str,
        allowed: frozenset[type[Event]],
        logger: logging.Logger,
    ) -> None:
        self.envelope = envelope
        self.service = service
        self.handler = handler
        #: Pass this to external systems (payment APIs, databases) to make their side effects idempotent.
        self.idempotency_key = idempotency_key
        self._allowed = allowed
        self.emitted: list[tuple[Event, str | None]] = []
        self._logger = logger

    @property
    def event_id(self) -> str:
        return self.envelope.event_id

    @property
    def correlation_id(self) -> str:
        return self.envelope.correlation_id

    @property
    def attempt(self) -> int:
        return self.envelope.attempt

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry the service, handler, event id and correlation id."""
        extra: dict[str, Any] = {
            "service": self.service,
            "handler": self.handler,
            "event_id": self.envelope.event_id,
            "correlation_id": self.envelope.correlation_id,
        }
        return logging.LoggerAdapter(self._logger, extra)

    def emit(self, event: Event, *, key: str | None = None) -> None:
        """Queue ``event`` for publishing once the handler succeeds.

        ``key`` defaults to the correlation id, so all events of one saga stay in order on one
        partition. Emitting a type that the handler's registration does not list raises ``EmitError``.
        """
        if type(event) not in self._allowed:
            declared = ", ".join(sorted(t.__name__ for t in self._allowed)) or "nothing"
            raise EmitError(
                f"handler {self.service}.{self.handler} emitted {type(event).__name__}, "
                f"but its registration declares emits=[{declared}]"
            )
        self.emitted.append((event, key))
