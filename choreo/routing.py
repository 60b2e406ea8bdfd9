"""Subscriptions: which handler runs for which event type, and which event types it may emit."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from choreo.errors import ConfigurationError
from choreo.events import Event
from choreo.breaker import CircuitBreaker
from choreo.retry import RetryPolicy

if TYPE_CHECKING:
    from choreo.context import Context

#: ``async def handler(event, ctx)``, or a plain ``def`` that blocks (run in the service's thread pool).
Handler = Callable[[Any, "Context"], Awaitable[None]] | Callable[[Any, "Context"], None]
#: ``key``: a record key's events in offset order, keys concurrently; ``partition``: one event at a
#: time per partition; ``unordered``: any event may run beside any other.
Ordering = Literal["key", "partition", "unordered"]
_ORDERINGS = ("key", "partition", "unordered")


@dataclass(frozen=True, slots=True)
class Subscription:
    """One handler of one event type in one service.

    ``name`` is part of every idempotency key and must stay stable across deployments: renaming a
    handler makes choreo treat already-processed events as new for it.
    """

    event_type: type[Event]
    handler: Handler
    name: str
    emits: frozenset[type[Event]]
    #: True for a compensating handler: it runs on the failure path and may never lead to a forward step.
    compensation: bool = False
    #: The forward handler (of the same service) whose effects this compensation undoes.
    undoes: str | None = None
    #: False for a forward step that needs no compensation (e.g. it changes nothing).
    compensable: bool = True
    #: This handler's retry policy; None uses its service's.
    retry: RetryPolicy | None = None
    #: A circuit breaker for this handler's dependency, or None.
    breaker: CircuitBreaker | None = None
    #: A plain ``def``: it runs in the service's bounded thread pool, never on the event loop.
    blocking: bool = False
    #: The order this handler keeps (see ``Ordering``); None uses the service's ``Settings.ordering``.
    ordering: Ordering | None = None

    @classmethod
    def build(
        cls,
        event_type: type[Event],
        handler: Handler,
        *,
        emits: Sequence[type[Event]] = (),
        name: str | None = None,
        compensation: bool = False,
        undoes: str | None = None,
        compensable: bool = True,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        ordering: Ordering | None = None,
    ) -> Subscription:
        where = f"handler {getattr(handler, '__qualname__', handler)!r}"
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            raise ConfigurationError(f"{where}: {event_type!r} is not an Event subclass")
        event_type.avro_schema()  # a class with no schema fails here, at registration
        for emitted in emits:
            if not (isinstance(emitted, type) and issubclass(emitted, Event)):
                raise ConfigurationError(f"{where}: emits {emitted!r}, which is not an Event subclass")
            emitted.avro_schema()
        if not callable(handler) or inspect.isgeneratorfunction(handler) or inspect.isasyncgenfunction(handler):
            raise ConfigurationError(f"{where}: a handler must be an 'async def' or a plain 'def' function")
        handler_name = name or getattr(handler, "__name__", "")
        if not handler_name or not all(c.isalnum() or c in "_-." for c in handler_name):
            raise ConfigurationError(f"{where}: handler name {handler_name!r} must be letters, digits, '_', '-', '.'")
        if undoes is not None and not compensation:
            raise ConfigurationError(f"{where}: only a compensation (service.compensate) can undo a step")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"{where}: retry must be a choreo.RetryPolicy, got {type(retry).__name__}")
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise ConfigurationError(f"{where}: breaker must be a choreo.CircuitBreaker, got {type(breaker).__name__}")
        if ordering is not None and ordering not in _ORDERINGS:
            raise ConfigurationError(f"{where}: ordering must be one of {', '.join(_ORDERINGS)}, got {ordering!r}")
        return cls(event_type, handler, handler_name, frozenset(emits), compensation, undoes,
                   compensable and not compensation, retry, breaker, not inspect.iscoroutinefunction(handler),
                   ordering)
