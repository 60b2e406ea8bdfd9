"""Retry policies (pure backoff math) and the signals a handler raises to steer its own retries.

A failing handler is retried in place while its partition waits (so per-key order holds), with
exponential backoff and full jitter, up to ``max_attempts``; then its event is dead-lettered (see
``choreo.deadletter``). ``RetryLater`` and ``DeadLetterNow`` sit outside the ``ChoreoError`` tree, so
an ``except ChoreoError`` in a handler never swallows them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from choreo.errors import ConfigurationError, EmitError


class RetryLater(Exception):  # noqa: N818 - a signal, not an error
    """Raise in a handler to have its event tried again (counts as an attempt)."""

    def __init__(self, reason: str = "retry later", *, delay_s: float | None = None) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


class DeadLetterNow(Exception):  # noqa: N818 - a signal, not an error
    """Raise in a handler to send its event to the dead-letter topic at once, without retries."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a failing handler.

    The delay before attempt ``n + 1`` is uniform in ``[0, min(max_delay_s, initial_delay_s *
    multiplier ** (n - 1))]`` ("full jitter"), so many failing consumers do not retry in lockstep.
    Exceptions not in ``retry_on`` are dead-lettered after the first attempt.
    """

    max_attempts: int = 5
    initial_delay_s: float = 0.1
    max_delay_s: float = 30.0
    multiplier: float = 2.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(f"RetryPolicy: max_attempts must be at least 1, got {self.max_attempts}")
        if not 0 <= self.initial_delay_s <= self.max_delay_s:
            raise ConfigurationError("RetryPolicy: need 0 <= initial_delay_s <= max_delay_s")
        if self.multiplier < 1:
            raise ConfigurationError(f"RetryPolicy: multiplier must be at least 1, got {self.multiplier}")

    def ceiling(self, attempt: int) -> float:
        """The largest delay after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_delay_s, self.initial_delay_s * self.multiplier ** max(0, attempt - 1))

    def delay(self, attempt: int) -> float:
        return self.ceiling(attempt) * self.random()

    def gives_up(self, exc: BaseException, attempt: int) -> bool:
        """True if the event must be dead-lettered after failed attempt ``attempt``."""
        if isinstance(exc, (DeadLetterNow, EmitError)):
            return True  # an undeclared emit is a bug in the handler: retrying cannot help
        if isinstance(exc, RetryLater):
            return attempt >= self.max_attempts
        return attempt >= self.max_attempts or not isinstance(exc, self.retry_on)
