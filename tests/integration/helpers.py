"""Helpers for integration tests: service subprocesses, an effect-counting sink, bounded waits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from choreo import Context, Event, Publisher, Service, Settings
from services.events import OrderPlaced
from tests.conftest import service_env

ROOT = Path(__file__).resolve().parents[2]


class ServiceProcess:
    """``choreo run TARGET`` in its own process, logging to a file."""

    def __init__(self, target: str, settings: Settings, log: Path, **env: str) -> None:
        self.target, self.log_path = target, log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "choreo.cli", "run", target],
            cwd=ROOT, env={**service_env(settings), **env}, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


async def eventually(check: Callable[[], Awaitable[None]], timeout: float) -> None:
    """Run the assertions in ``check`` until they pass, or fail with the last error after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class Sink:
    """A downstream service in the test process whose effect is a plain counter per order.

    The counter has no guard of its own, so any event whose effects choreo lets happen twice shows
    up as a count of 2.
    """

    def __init__(self, settings: Settings, event_type: type[Event], name: str = "sink") -> None:
        self.settings = settings
        self.service = Service(name, settings=settings)
        self.key = f"{settings.redis_prefix}{name}:effects"
        self.ids_key = f"{settings.redis_prefix}{name}:ids"
        self.redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        emits: list[type[Event]] = []

        @self.service.on(event_type, emits=emits, name="count")
        async def count(event: Event, ctx: Context) -> None:
            await self.redis.hincrby(self.key, getattr(event, "order_id"), 1)
            await self.redis.sadd(self.ids_key, ctx.event_id)

        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Sink:
        await self.service.start()
        self._task = asyncio.create_task(self.service.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.service.stop()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)
        await self.redis.aclose()

    async def effects(self) -> dict[str, int]:
        return {k: int(v) for k, v in (await self.redis.hgetall(self.key)).items()}

    async def wait_for(self, orders: int, timeout: float) -> dict[str, int]:
        async def enough() -> bool:
            if self._task is not None and self._task.done():
                self._task.result()
            return int(await self.redis.hlen(self.key)) >= orders

        await wait_until(enough, timeout, f"{orders} orders at the sink")
        return await self.effects()


def orders(n: int, prefix: str = "order") -> list[OrderPlaced]:
    return [
        OrderPlaced(order_id=f"{prefix}-{i:06d}", customer_id=f"c{i % 97}", sku="widget", quantity=1 + i % 3,
                    amount_cents=100 + i)
        for i in range(n)
    ]


async def publish(settings: Settings, events: list[OrderPlaced]) -> list[str]:
    """Place orders, each its own saga whose id is the order id (as in the reference system)."""
    async with Publisher("test", settings=settings) as publisher:
        ids: list[str] = []
        for start in range(0, len(events), 2000):
            chunk = events[start : start + 2000]
            ids += await publisher.publish_many(chunk, correlation_ids=[e.order_id for e in chunk])
        return ids


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
