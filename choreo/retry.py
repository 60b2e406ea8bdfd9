"""Retry policies (backoff math), the signals a handler raises to steer its retries, and retry topics.

A failing handler is tried again after an exponential backoff with full jitter, up to
``max_attempts``; then its event is dead-lettered (see ``choreo.deadletter``).

* A **short** delay (up to ``in_process_max_s``) is waited in place: the partition is paused and
  rewound to the event, so nothing behind it runs first.
* A **long** delay goes through a retry topic, so the partition moves on: the event is republished
  to ``<topic>.retry.<tier>`` with its attempt count and due time, and the consumer of that topic
  pauses the partition until the record is due (pause/resume, never sleep). Tier ``k`` holds delays
  of roughly ``10**(k-1)`` to ``10**k`` seconds (the last tier takes everything longer), so a record
  waits behind others of about its own delay. With ``ordered`` retries (the default) the key's later
  events are parked behind it (``choreo.parking``) and run in order once it succeeds or is
  dead-lettered.

``RetryLater`` and ``DeadLetterNow`` sit outside the ``ChoreoError`` tree, so an
``except ChoreoError`` in a handler never swallows them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from choreo.errors import ConfigurationError, EmitError
from choreo.transport import Headers


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
    Exceptions not in ``retry_on`` are dead-lettered after the first attempt. Delays up to
    ``in_process_max_s`` are waited in place; longer ones go through retry topics. ``ordered=False``
    lets the key's later events run while one of its events waits in a retry topic.
    """

    max_attempts: int = 5
    initial_delay_s: float = 0.1
    max_delay_s: float = 30.0
    multiplier: float = 2.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    in_process_max_s: float = 1.0
    ordered: bool = True
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(f"RetryPolicy: max_attempts must be at least 1, got {self.max_attempts}")
        if not 0 <= self.initial_delay_s <= self.max_delay_s:
            raise ConfigurationError("RetryPolicy: need 0 <= initial_delay_s <= max_delay_s")
        if self.multiplier < 1:
            raise ConfigurationError(f"RetryPolicy: multiplier must be at least 1, got {self.multiplier}")
        if self.in_process_max_s < 0:
            raise ConfigurationError(f"RetryPolicy: in_process_max_s must be >= 0, got {self.in_process_max_s}")

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


# -- retry topics ---------------------------------------------------------------------------------------

RETRY_INFIX = ".retry."
#: How often a parked event looks whether it heads its key when its head's due time is unknown; with
#: the head's due time known, a tenth of this after it (and at most ten times this from now).
PARK_RECHECK_S = 0.5


class RetryHeader:
    """Headers of a record in a retry topic, added to the original record's headers."""

    ATTEMPTS = "choreo-retry-attempts"  # failed attempts so far (0 for a parked event)
    DUE = "choreo-retry-due"  # epoch milliseconds from which it may run
    HANDLERS = "choreo-retry-handlers"  # comma-separated handler names to run
    FIRST_FAILURE = "choreo-retry-first-failure"
    ERROR = "choreo-retry-error"  # the last failure, for people reading the topic
    ORIGIN = "choreo-retry-origin"  # topic:partition:offset of the original record
    PARKED = "choreo-retry-parked"  # "1": it did not fail, it waits behind an earlier event of its key

    ALL = frozenset({ATTEMPTS, DUE, HANDLERS, FIRST_FAILURE, ERROR, ORIGIN, PARKED})


def retry_topic(topic: str, tier: int) -> str:
    return f"{topic}{RETRY_INFIX}{tier}"


def retry_tier(delay_s: float, tiers: int) -> int:
    """The tier for a delay: 1 below 10 s, 2 below 100 s, ... up to ``tiers``."""
    return max(1, min(tiers, 1 + int(math.log10(max(delay_s, 1.0)))))


def original_topic(topic: str) -> str:
    """``orders.v1`` for ``orders.v1.retry.2`` (and for ``orders.v1`` itself)."""
    base, infix, tier = topic.rpartition(RETRY_INFIX)
    return base if infix and tier.isdigit() else topic


@dataclass(frozen=True, slots=True)
class RetryState:
    """What a retry record carries besides the original event."""

    attempts: int
    due_ms: int
    handlers: tuple[str, ...]
    first_failure: str
    origin: tuple[str, int, int]  # topic, partition, offset of the original record
    parked: bool = False
    error: str = ""

    @classmethod
    def read(cls, headers: Headers) -> RetryState:
        """Parse the retry headers; raises ``ValueError`` naming the header that is missing or bad."""
        found: dict[str, str] = {}
        for key, value in headers:
            if key in RetryHeader.ALL and value is not None:
                found[key] = value.decode(errors="replace")
        try:
            topic, partition, offset = found[RetryHeader.ORIGIN].rsplit(":", 2)
            return cls(
                attempts=int(found[RetryHeader.ATTEMPTS]),
                due_ms=int(found[RetryHeader.DUE]),
                handlers=tuple(h for h in found[RetryHeader.HANDLERS].split(",") if h),
                first_failure=found.get(RetryHeader.FIRST_FAILURE, ""),
                origin=(topic, int(partition), int(offset)),
                parked=found.get(RetryHeader.PARKED) == "1",
                error=found.get(RetryHeader.ERROR, ""),
            )
        except KeyError as exc:
            raise ValueError(f"retry header {exc.args[0]} is missing") from None
        except ValueError as exc:
            raise ValueError(f"malformed retry header: {exc}") from None

    def headers(self) -> Headers:
        topic, partition, offset = self.origin
        return [
            (RetryHeader.ATTEMPTS, str(self.attempts).encode()),
            (RetryHeader.DUE, str(self.due_ms).encode()),
            (RetryHeader.HANDLERS, ",".join(self.handlers).encode()),
            (RetryHeader.FIRST_FAILURE, self.first_failure.encode()),
            (RetryHeader.ERROR, self.error.encode(errors="replace")[:1000]),
            (RetryHeader.ORIGIN, f"{topic}:{partition}:{offset}".encode()),
            (RetryHeader.PARKED, b"1" if self.parked else b"0"),
        ]


def without_retry_headers(headers: Headers) -> Headers:
    return [(k, v) for k, v in headers if k not in RetryHeader.ALL]
