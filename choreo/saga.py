"""Saga declarations: a named business flow from a start event to its end events, with a deadline.

A saga is a chain of events across services, not a coordinator: each step is an ordinary handler
(``service.on``), each compensation a compensating handler (``service.compensate``). The declaration
names where the chain starts and ends, so the flow graph can be checked and the saga tracker can tell
a running saga from a finished or stuck one::

    checkout = Saga(
        "checkout",
        starts_with=OrderPlaced,
        completes_on=[CustomerNotified],
        fails_on=[OrderCancelled],
        deadline=timedelta(seconds=30),
    )
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from choreo.errors import ConfigurationError
from choreo.events import Event

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

#: Saga statuses in which forward steps no longer run (``Service(skip_ended_sagas=True)``).
STOPPED_STATUSES = frozenset({"compensating", "compensated", "compensation_failed", "timed_out"})


@dataclass(frozen=True)
class Saga:
    """A declared saga. Invalid declarations raise ``ConfigurationError`` when built.

    ``completes_on`` are the events that end it successfully, ``fails_on`` those that end it after
    compensation; ``deadline`` bounds the time from the start event to an end event, and
    ``step_deadline`` (optional) the time between two consecutive events of one saga. Past either,
    the saga tracker marks the saga ``timed_out`` and publishes ``SagaTimedOut``.
    """

    name: str
    starts_with: type[Event]
    completes_on: Sequence[type[Event]]
    fails_on: Sequence[type[Event]] = ()
    deadline: timedelta = timedelta(minutes=5)
    step_deadline: timedelta | None = None
    #: "compensate": a timeout (``SagaTimedOut``) must lead to a compensation of every completed step,
    #: which ``choreo graph check`` verifies; "report": the tracker only marks and announces it.
    on_timeout: str = "compensate"
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = f"saga {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigurationError(f"{where}: name must be lower-case letters, digits, '_' or '-'")
        for label in ("completes_on", "fails_on"):
            if isinstance(getattr(self, label), (type, str, bytes)):
                raise ConfigurationError(f"{where}: {label} must be a list of Event subclasses")
        for label, types in (("starts_with", [self.starts_with]), ("completes_on", self.completes_on),
                             ("fails_on", self.fails_on)):
            for t in types:
                if not (isinstance(t, type) and issubclass(t, Event)) or not hasattr(t, "__choreo_schema__"):
                    raise ConfigurationError(f"{where}: {label} has {t!r}, which is not an Event subclass with a schema")
        if not self.completes_on:
            raise ConfigurationError(f"{where}: completes_on needs at least one event type")
        overlap = set(self.completes_on) & set(self.fails_on)
        if overlap:
            names = ", ".join(sorted(t.__name__ for t in overlap))
            raise ConfigurationError(f"{where}: {names} cannot both complete and fail the saga")
        if self.starts_with in set(self.completes_on) | set(self.fails_on):
            raise ConfigurationError(f"{where}: the start event cannot also end the saga")
        if not isinstance(self.deadline, timedelta) or not (
            self.step_deadline is None or isinstance(self.step_deadline, timedelta)
        ):
            raise ConfigurationError(f"{where}: deadline and step_deadline must be datetime.timedelta")
        if self.on_timeout not in ("compensate", "report"):
            raise ConfigurationError(f"{where}: on_timeout must be 'compensate' or 'report', not {self.on_timeout!r}")
        if self.deadline <= timedelta(0):
            raise ConfigurationError(f"{where}: deadline must be positive")
        if self.step_deadline is not None and not timedelta(0) < self.step_deadline <= self.deadline:
            raise ConfigurationError(f"{where}: step_deadline must be positive and at most the deadline")
        object.__setattr__(self, "completes_on", tuple(self.completes_on))
        object.__setattr__(self, "fails_on", tuple(self.fails_on))

    @property
    def end_events(self) -> tuple[type[Event], ...]:
        return (*self.completes_on, *self.fails_on)


class SagaTimedOut(Event, schema=Path(__file__).parent / "avro" / "saga_timed_out.v1.avsc"):
    """Emitted by the saga tracker for a saga past its deadline; compensations react to it.

    Its correlation id (and key) is the saga id, like every other event of the saga.
    """

    saga_id: str
    saga: str
    status: str
    deadline: str


class CompensationFailed(Event, schema=Path(__file__).parent / "avro" / "compensation_failed.v1.avsc"):
    """Emitted by a service whose compensating handler failed on its last attempt (its event went to
    the dead-letter topic). The saga tracker ends the saga as ``compensation_failed``."""

    saga_id: str
    service: str
    handler: str
    error: str
