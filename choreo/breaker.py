"""Circuit breakers: stop calling a handler whose dependency keeps failing, probe it now and then.

closed --(``failures`` failures within ``window_s``)--> open --(after ``open_s``)--> half-open
half-open --(the probe succeeds)--> closed;  half-open --(the probe fails)--> open again

While a handler's breaker is open, its events are not run and their failed attempts are not
counted, so retries are not burned against a dead dependency: the partition waits until the probe.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from choreo.errors import ConfigurationError

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


@dataclass(frozen=True)
class CircuitBreaker:
    """A breaker's settings; each service process keeps its own state per handler."""

    failures: int = 5
    window_s: float = 30.0
    open_s: float = 10.0

    def __post_init__(self) -> None:
        if self.failures < 1 or self.window_s <= 0 or self.open_s <= 0:
            raise ConfigurationError("CircuitBreaker: failures >= 1, window_s > 0 and open_s > 0 are required")


class BreakerState:
    """The state machine of one breaker. ``on_change(old, new, why)`` is told of every transition."""

    def __init__(self, config: CircuitBreaker, *, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, str, str], None] | None = None) -> None:
        self.config = config
        self.state = CLOSED
        self._clock = clock
        self._on_change = on_change
        self._failures: deque[float] = deque()
        self._opened_at = 0.0
        self._probing = False

    def _move(self, new: str, why: str) -> None:
        old, self.state = self.state, new
        if self._on_change is not None and old != new:
            self._on_change(old, new, why)

    def allow(self) -> bool:
        """May the handler run now? In half-open state only one probe runs at a time."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self._clock() - self._opened_at >= self.config.open_s:
            self._move(HALF_OPEN, "probing the dependency again")
        if self.state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def retry_in(self) -> float:
        """Seconds until the breaker lets a probe through (0 when it would now)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.config.open_s - self._clock())

    def success(self) -> None:
        self._probing = False
        self._failures.clear()
        if self.state != CLOSED:
            self._move(CLOSED, "the probe succeeded")

    def failure(self) -> None:
        now = self._clock()
        self._probing = False
        if self.state == HALF_OPEN:
            self._opened_at = now
            self._move(OPEN, "the probe failed")
            return
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.config.window_s:
            self._failures.popleft()
        if len(self._failures) >= self.config.failures:
            self._opened_at = now
            self._failures.clear()
            self._move(OPEN, f"{self.config.failures} failures within {self.config.window_s:g} s")
