"""A real service process SIGKILLed at each point of the delivery pipeline loses no effect and
duplicates none: after a restart, every input has exactly one effect downstream."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from choreo import Settings
from services.events import InventoryReserved
from tests.integration.helpers import ServiceProcess, Sink, orders, publish, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

N = 120


@pytest.mark.timeout(180)
@pytest.mark.parametrize("point", ["in-handler", "before-produce", "after-produce", "before-done", "before-commit"])
async def test_crash_at_point_loses_nothing_and_duplicates_nothing(point: str, settings: Settings, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"batch_size": 10})
    events = orders(N)
    await publish(settings, events)
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        crashing = ServiceProcess(
            "tests.integration.apps.crashy:service", settings, tmp_path / "crashy-1.log",
            CRASH_AT=point, CRASH_BATCH="3", CHOREO_BATCH_SIZE="10",
        )
        code = crashing.wait(120)
        assert code == -signal.SIGKILL, f"expected the service to SIGKILL itself at {point}:\n{crashing.output()[-3000:]}"
        runs_before = await r.hgetall(f"{settings.redis_prefix}crashy:runs")
        assert 0 < len(runs_before) < N, "the crash must happen midway"

        restarted = ServiceProcess("tests.integration.apps.crashy:service", settings, tmp_path / "crashy-2.log",
                                   CHOREO_BATCH_SIZE="10")
        try:
            async with Sink(settings, InventoryReserved) as sink:
                effects = await sink.wait_for(N, 90)
                # Give stray duplicates a chance to arrive before judging.
                async def drained() -> bool:
                    return int(await r.hlen(f"{settings.redis_prefix}crashy:runs")) == N
                await wait_until(drained, 30, "every order to run")
                effects = await sink.effects()
        finally:
            assert restarted.terminate() == 0, restarted.output()[-3000:]
        assert sorted(effects) == sorted(e.order_id for e in events)
        assert set(effects.values()) == {1}, {k: v for k, v in effects.items() if v != 1}
        assert int(await r.scard(sink.ids_key)) == N  # one event id per order, even if re-emitted

        runs = {k: int(v) for k, v in (await r.hgetall(f"{settings.redis_prefix}crashy:runs")).items()}
        skipped = int(await r.hget(f"{settings.redis_prefix}crashy:stats", "skipped") or 0)
        if point == "before-commit":
            # The batch's effects were durable but its offsets not: its redelivery is recognised and
            # skipped. The batch behind it was mid-way (a tail commits while the next batch runs its
            # handlers), so its events may run again, at most once more.
            assert skipped > 0 and max(runs.values()) <= 2
        else:
            # The in-flight batch ran again after the restart: proof the crash hit mid-pipeline.
            assert max(runs.values()) == 2
    finally:
        await r.aclose()
