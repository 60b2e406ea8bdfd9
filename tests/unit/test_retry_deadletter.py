"""Retry policy math, handler signals and the dead-letter record format."""

from __future__ import annotations

import pytest

from choreo import ConfigurationError, DeadLetterNow, DLQHeader, EmitError, RetryLater, RetryPolicy
from choreo.deadletter import DeadLetter, Failure, dead_letter, last_header, summarize
from choreo.transport import Record


def test_full_jitter_stays_under_an_exponential_ceiling() -> None:
    policy = RetryPolicy(initial_delay_s=0.1, max_delay_s=1.0, multiplier=2.0, random=lambda: 1.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert RetryPolicy(random=lambda: 0.0).delay(3) == 0.0
    assert RetryPolicy(random=lambda: 0.5).delay(2) == pytest.approx(0.1)


def test_when_a_policy_gives_up() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=(TimeoutError,))
    assert not policy.gives_up(TimeoutError(), 2) and policy.gives_up(TimeoutError(), 3)
    assert policy.gives_up(ValueError("not retryable"), 1)
    assert policy.gives_up(DeadLetterNow("now"), 1)
    assert policy.gives_up(EmitError("bug"), 1)
    assert not policy.gives_up(RetryLater("busy"), 2) and policy.gives_up(RetryLater("busy"), 3)


@pytest.mark.parametrize("kwargs", [{"max_attempts": 0}, {"initial_delay_s": 2.0, "max_delay_s": 1.0},
                                    {"multiplier": 0.5}, {"initial_delay_s": -1.0}])
def test_a_bad_policy_fails_when_built(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_signals_are_outside_the_choreo_error_tree() -> None:
    from choreo import ChoreoError

    assert not issubclass(RetryLater, ChoreoError) and not issubclass(DeadLetterNow, ChoreoError)


def _record(headers: list[tuple[str, bytes | None]] | None = None) -> Record:
    return Record("t.orders.v1", 2, 41, b"saga-1", b"\xc3\x01bytes", headers or [("choreo-event-id", b"e1")])


def test_a_dead_letter_keeps_the_bytes_and_adds_the_failure() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        failure = Failure.from_exception("handler-error", exc, handler="take", attempts=3)
    out = dead_letter(_record(), failure, service="svc")
    assert out.topic == "t.orders.v1.dlq" and out.key == b"saga-1" and out.value == b"\xc3\x01bytes"
    assert out.headers[0] == ("choreo-event-id", b"e1")
    h = dict(out.headers)
    assert h[DLQHeader.REASON] == b"handler-error" and h[DLQHeader.ERROR_TYPE] == b"ValueError"
    assert h[DLQHeader.OFFSET] == b"41" and h[DLQHeader.PARTITION] == b"2" and h[DLQHeader.ATTEMPTS] == b"3"
    assert b"Traceback" in (h[DLQHeader.TRACEBACK] or b"")


def test_failure_text_is_bounded() -> None:
    out = dead_letter(_record(), Failure("handler-error", "X", "e" * 100_000, "t" * 100_000), service="s")
    h = dict(out.headers)
    assert len(h[DLQHeader.ERROR] or b"") <= 2_000 and (h[DLQHeader.ERROR] or b"").endswith(b"[truncated]")
    assert len(h[DLQHeader.TRACEBACK] or b"") <= 8_000


def test_a_replay_keeps_the_event_and_its_history() -> None:
    first = dead_letter(_record(), Failure("handler-error", "ValueError", "first"), service="s")
    letter = DeadLetter(Record(first.topic, 0, 7, first.key, first.value, first.headers))
    again = letter.replay()
    assert again.topic == "t.orders.v1" and again.value == b"\xc3\x01bytes" and again.key == b"saga-1"
    assert last_header(again.headers, "choreo-event-id") == "e1"
    assert last_header(again.headers, "choreo-replayed-from") == "t.orders.v1.dlq:0:7"
    # It fails again: the new dead letter carries both failures, the newest last.
    second = dead_letter(Record("t.orders.v1", 1, 9, again.key, again.value, again.headers),
                         Failure("handler-error", "KeyError", "second"), service="s")
    letter2 = DeadLetter(Record(second.topic, 0, 8, second.key, second.value, second.headers))
    assert letter2.error_type == "KeyError" and letter2.replays == 1
    assert [v for k, v in second.headers if k == DLQHeader.ERROR] == [b"first", b"second"]
    assert letter.replay("elsewhere").topic == "elsewhere"


def test_summary_and_filters() -> None:
    a = DeadLetter(Record("t.x.dlq", 0, 0, b"k1", b"", [(DLQHeader.ERROR_TYPE, b"ValueError"),
                                                       ("choreo-correlation-id", b"s1"),
                                                       (DLQHeader.LAST_FAILURE, b"2026-11-25T10:00:00.000+00:00")]))
    b = DeadLetter(Record("t.x.dlq", 0, 1, b"k2", b"", [(DLQHeader.ERROR_TYPE, b"ValueError")]))
    assert summarize([a, b]) == {("t.x", "ValueError"): 2}
    assert a.matches(saga_id="s1") and not b.matches(saga_id="s1")
    assert a.matches(key="k1") and not a.matches(key="k2")
    assert a.matches(since="2026-11-25T09:00") and not a.matches(since="2026-11-25T11:00")
