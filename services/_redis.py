"""Each reference service keeps its own state in Redis; this opens that connection per service."""

from __future__ import annotations

import redis.asyncio as aioredis

from choreo import Service


class ServiceState:
    """A Redis connection opened when its service starts and closed when it stops."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._redis: aioredis.Redis | None = None
        service.on_start(self._open)
        service.on_stop(self._close)

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError(f"service {self._service.name} is not started")
        return self._redis

    @property
    def prefix(self) -> str:
        return f"{self._service.settings.redis_prefix}{self._service.name}:"

    async def _open(self) -> None:
        self._redis = aioredis.Redis.from_url(self._service.settings.redis_url, decode_responses=True)

    async def _close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
