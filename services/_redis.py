"""State of the reference services in Redis, and the "once per idempotency key" pattern they share."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from choreo import ConfigurationError, Context, Service


class CheckoutConfig(BaseModel):
    """Failure knobs of the reference system, from ``CHECKOUT_*`` environment variables."""

    model_config = ConfigDict(frozen=True)

    default_stock: int = Field(default=1_000_000, ge=0)
    decline_above_cents: int = Field(default=1_000_000_00, ge=0)
    decline_rate: float = Field(default=0.0, ge=0, le=1)
    shipping_unavailable_rate: float = Field(default=0.0, ge=0, le=1)

    @classmethod
    def from_env(cls) -> CheckoutConfig:
        data: dict[str, object] = {}
        for name in cls.model_fields:
            value = os.environ.get(f"CHECKOUT_{name.upper()}")
            if value is not None:
                data[name] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigurationError(f"CHECKOUT_* settings: {exc}") from None


def chance(order_id: str, salt: str) -> float:
    """A deterministic number in [0, 1) per order, so a rate picks the same orders on every run."""
    digest = hashlib.blake2b(f"{salt}:{order_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# Runs BODY at most once per KEYS[1] (the handler's idempotency key): a re-run after a crash gets the
# first run's result back instead of applying the effect twice. BODY sees KEYS[2..] and ARGV[2..].
_ONCE = """
local prior = redis.call('GET', KEYS[1])
if prior then return prior end
local result = (function()
--BODY--
end)()
redis.call('SET', KEYS[1], result, 'PX', ARGV[1])
return result
"""


class ServiceState:
    """A service's Redis connection (opened at start, closed at stop) and its key namespace."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._redis: aioredis.Redis | None = None
        self.config = CheckoutConfig()
        self._scripts: dict[str, Any] = {}
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

    def key(self, name: str) -> str:
        return self.prefix + name

    async def once(self, ctx: Context, body: str, keys: Sequence[str], args: Sequence[str | int | float]) -> str:
        """Run the Lua ``body`` (which returns a string) once per ``ctx.idempotency_key``."""
        script = self._scripts.get(body)
        if script is None:
            script = self._scripts[body] = self.redis.register_script(_ONCE.replace("--BODY--", body))
        result = await script(
            keys=[self.key(f"effect:{ctx.idempotency_key}"), *keys],
            args=[self._service.settings.done_ttl_ms, *args],
        )
        return str(result)

    async def _open(self) -> None:
        self.config = CheckoutConfig.from_env()
        self._redis = aioredis.Redis.from_url(self._service.settings.redis_url, decode_responses=True)

    async def _close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
