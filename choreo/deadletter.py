"""The dead-letter record: the original bytes, unchanged, plus headers saying what went wrong.

A record goes to ``<topic>.dlq`` when its handler failed on its last attempt, or at once when it
cannot be decoded (not Avro, unknown schema, bad headers, invalid value). Key, value and original
headers are kept as they were, so a replay (``choreo dlq replay``) re-delivers the very same event,
with the same event id, and idempotency still holds.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

from choreo.events import utc_now_iso
from choreo.transport import Headers, OutgoingRecord, Record

DLQ_SUFFIX = ".dlq"


class DLQHeader:
    """Headers added to a dead-lettered record (UTF-8 strings)."""

    REASON = "choreo-dlq-reason"  # handler-error, or a decode reason (not-avro, unknown-schema, ...)
    ERROR_TYPE = "choreo-dlq-error-type"
    ERROR = "choreo-dlq-error"
    TRACEBACK = "choreo-dlq-traceback"
    TOPIC = "choreo-dlq-topic"
    PARTITION = "choreo-dlq-partition"
    OFFSET = "choreo-dlq-offset"
    SERVICE = "choreo-dlq-service"
    HANDLER = "choreo-dlq-handler"
    ATTEMPTS = "choreo-dlq-attempts"
    FIRST_FAILURE = "choreo-dlq-first-failure"
    LAST_FAILURE = "choreo-dlq-last-failure"

    ALL = (REASON, ERROR_TYPE, ERROR, TRACEBACK, TOPIC, PARTITION, OFFSET, SERVICE, HANDLER, ATTEMPTS,
           FIRST_FAILURE, LAST_FAILURE)


_MAX_ERROR = 2_000
_MAX_TRACEBACK = 8_000


@dataclass(frozen=True)
class Failure:
    """What went wrong with one record, as written to its dead-letter headers."""

    reason: str
    error_type: str
    error: str
    traceback: str = ""
    handler: str = ""
    attempts: int = 1
    first_failure: str = ""
    last_failure: str = ""

    @classmethod
    def from_exception(cls, reason: str, exc: BaseException, *, handler: str = "", attempts: int = 1,
                       first_failure: str = "") -> Failure:
        now = utc_now_iso()
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(reason, type(exc).__name__, str(exc), text, handler, attempts, first_failure or now, now)


def dead_letter_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


def _bounded(text: str, limit: int) -> bytes:
    data = text.encode(errors="replace")
    return data if len(data) <= limit else data[: limit - 14] + b"...[truncated]"


def dead_letter(record: Record, failure: Failure, *, service: str) -> OutgoingRecord:
    """The record for ``<topic>.dlq``: original key, value and headers, then the failure headers."""
    h = DLQHeader
    # Headers of an earlier dead-lettering (a replayed event that failed again) are kept before ours:
    # the record carries its whole history.
    headers: Headers = [
        *record.headers,
        (h.REASON, failure.reason.encode()),
        (h.ERROR_TYPE, failure.error_type.encode()),
        (h.ERROR, _bounded(failure.error, _MAX_ERROR)),
        (h.TRACEBACK, _bounded(failure.traceback, _MAX_TRACEBACK)),
        (h.TOPIC, record.topic.encode()),
        (h.PARTITION, str(record.partition).encode()),
        (h.OFFSET, str(record.offset).encode()),
        (h.SERVICE, service.encode()),
        (h.HANDLER, failure.handler.encode()),
        (h.ATTEMPTS, str(failure.attempts).encode()),
        (h.FIRST_FAILURE, (failure.first_failure or utc_now_iso()).encode()),
        (h.LAST_FAILURE, (failure.last_failure or utc_now_iso()).encode()),
    ]
    return OutgoingRecord(dead_letter_topic(record.topic), record.key, record.value or b"", headers)


def last_header(headers: Headers, name: str) -> str | None:
    """The value of the last header called ``name`` (the newest dead-lettering), decoded."""
    for key, value in reversed(headers):
        if key == name:
            return value.decode(errors="replace") if value is not None else None
    return None


REPLAYED_AT = "choreo-replayed-at"
REPLAYED_FROM = "choreo-replayed-from"


@dataclass(frozen=True)
class DeadLetter:
    """One record read back from a dead-letter topic."""

    record: Record

    def header(self, name: str) -> str | None:
        return last_header(self.record.headers, name)

    @property
    def original_topic(self) -> str:
        return self.header(DLQHeader.TOPIC) or self.record.topic.removesuffix(DLQ_SUFFIX)

    @property
    def error_type(self) -> str:
        return self.header(DLQHeader.ERROR_TYPE) or "?"

    @property
    def failed_at(self) -> str:
        return self.header(DLQHeader.LAST_FAILURE) or ""

    @property
    def saga_id(self) -> str | None:
        return self.header("choreo-correlation-id")

    @property
    def replays(self) -> int:
        return sum(1 for key, _ in self.record.headers if key == REPLAYED_AT)

    def matches(self, *, since: str | None = None, saga_id: str | None = None, key: str | None = None) -> bool:
        if since is not None and self.failed_at < since:
            return False
        if saga_id is not None and self.saga_id != saga_id:
            return False
        if key is not None and (self.record.key or b"").decode(errors="replace") != key:
            return False
        return True

    def replay(self, to_topic: str | None = None) -> OutgoingRecord:
        """The record to publish again: original key, value and headers (so the same event id and
        idempotency key), with the whole failure history and a note of this replay appended."""
        headers: Headers = [
            *self.record.headers,
            (REPLAYED_AT, utc_now_iso().encode()),
            (REPLAYED_FROM, f"{self.record.topic}:{self.record.partition}:{self.record.offset}".encode()),
        ]
        return OutgoingRecord(to_topic or self.original_topic, self.record.key, self.record.value or b"", headers)


def summarize(letters: list[DeadLetter]) -> dict[tuple[str, str], int]:
    """Counts of dead letters by (original topic, error type)."""
    counts: dict[tuple[str, str], int] = {}
    for letter in letters:
        key = (letter.original_topic, letter.error_type)
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
