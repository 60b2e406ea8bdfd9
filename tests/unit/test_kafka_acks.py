"""The Kafka transport's per-send ack counter, fed from two threads at once as librdkafka may."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError

from choreo.errors import PublishError
from choreo.transport.kafka import _Acks


class _Message:
    def topic(self) -> str:
        return "orders"


async def _report_from_two_threads(count: int, errors_at: set[int]) -> asyncio.Future[None]:
    loop = asyncio.get_running_loop()
    stuck: list[bool] = []
    acks = _Acks(loop, count, lambda: stuck.append(True))
    start = threading.Barrier(2)

    def report(numbers: range) -> None:
        start.wait()
        for n in numbers:
            err: Any = KafkaError(KafkaError._MSG_TIMED_OUT) if n in errors_at else None
            acks(err, _Message())

    half = count // 2
    threads = [threading.Thread(target=report, args=(r,)) for r in (range(half), range(half, count))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    await asyncio.wait([acks._future], timeout=5)
    assert acks._future.done()
    assert bool(stuck) == bool(errors_at)
    return acks._future


async def test_the_send_resolves_once_every_record_is_acknowledged() -> None:
    future = await _report_from_two_threads(20_000, set())
    assert future.result() is None


async def test_an_error_reported_by_either_thread_fails_the_send() -> None:
    future = await _report_from_two_threads(20_000, {17, 19_999})
    with pytest.raises(PublishError, match=r"orders: .*\(and 1 more\)"):
        future.result()
