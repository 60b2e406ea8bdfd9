"""A two-service chain (inventory -> payment) processes 10,000 orders with zero losses and zero
duplicate effects although the downstream service is SIGKILLed midway and restarted."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from choreo import Settings
from services.events import PaymentCaptured
from tests.integration.helpers import ServiceProcess, Sink, orders, publish, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

N = 10_000


@pytest.mark.timeout(300)
async def test_chain_survives_sigkill_of_downstream_service(settings: Settings, tmp_path: Path) -> None:
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    sent_key = f"{settings.redis_prefix}payment:ledger"
    inventory = ServiceProcess("services.inventory:service", settings, tmp_path / "inventory.log")
    payment = ServiceProcess("services.payment:service", settings, tmp_path / "payment-1.log")
    restarted: ServiceProcess | None = None
    try:
        async with Sink(settings, PaymentCaptured) as sink:
            events = orders(N)
            await publish(settings, events)

            async def midway() -> bool:
                return int(await r.hlen(sent_key)) >= N // 4

            await wait_until(midway, 120, "a quarter of the orders to be charged")
            payment.kill()
            assert payment.proc.returncode == -signal.SIGKILL
            killed_at = int(await r.hlen(sent_key))
            assert killed_at < N, "the kill must happen before the end"
            restarted = ServiceProcess("services.payment:service", settings, tmp_path / "payment-2.log")
            effects = await sink.wait_for(N, 180)

            async def all_sent() -> bool:
                return int(await r.hlen(sent_key)) == N

            await wait_until(all_sent, 60, "every order to be charged once in the ledger")
            effects = await sink.effects()
        assert len(effects) == N, f"lost {N - len(effects)} orders"
        duplicated = {k: v for k, v in effects.items() if v != 1}
        assert not duplicated, f"{len(duplicated)} orders had duplicate effects"
        assert int(await r.scard(sink.ids_key)) == N
    finally:
        for proc in (inventory, payment, restarted):
            if proc is not None and proc.proc.poll() is None:
                assert proc.terminate() == 0, proc.output()[-3000:]
        await r.aclose()
