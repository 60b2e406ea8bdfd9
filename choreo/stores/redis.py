"""Redis adapter for the idempotency store: one Lua call claims a whole batch in one round trip."""

from __future__ import annotations

from collections.abc import Sequence

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("choreo's Redis store needs the 'redis' package: pip install choreo") from exc

from choreo.errors import IdempotencyError
from choreo.idempotency import ClaimResult

# Values: "d" when done, "c:<owner>" while claimed. The reply is one string of digits, one per key:
# parsing a 500-element array reply in redis-py costs more than the script itself. A claim by the same owner is granted again, so a
# process retrying its own failed event does not wait for its own lease to expire.
_CLAIM = """
local owner = 'c:' .. ARGV[1]
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if not v then
    redis.call('SET', key, owner, 'PX', ARGV[2])
    out[i] = '1'
  elseif v == 'd' then
    out[i] = '0'
  elseif v == owner then
    redis.call('PEXPIRE', key, ARGV[2])
    out[i] = '1'
  else
    out[i] = '2'
  end
end
return table.concat(out)
"""

_FINISH = """
local n = tonumber(ARGV[3])
local owner = 'c:' .. ARGV[1]
for i, key in ipairs(KEYS) do
  if i <= n then
    redis.call('SET', key, 'd', 'PX', ARGV[2])
  elseif redis.call('GET', key) == owner then
    redis.call('DEL', key)
  end
end
return n
"""

_RESULTS = (ClaimResult.DONE, ClaimResult.CLAIMED, ClaimResult.BUSY)


class RedisIdempotencyStore:
    """``IdempotencyStore`` on Redis >= 6.2. Safe for many processes; keys expire by themselves.

    Multi-key scripts need every key in one slot on Redis Cluster; keys carry the saga id as hash tag,
    and batches are split by the caller only when running against a cluster (not supported yet).
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        self._claim = self._redis.register_script(_CLAIM)
        self._finish = self._redis.register_script(_FINISH)

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise IdempotencyError(f"cannot reach Redis at {_safe(self._url)}: {exc}") from None

    async def claim(self, keys: Sequence[str], owner: str, lease_ms: int) -> list[ClaimResult]:
        if not keys:
            return []
        try:
            raw = await self._claim(keys=list(keys), args=[owner, lease_ms])
        except (RedisError, OSError) as exc:
            raise IdempotencyError(f"claiming {len(keys)} keys in Redis at {_safe(self._url)} failed: {exc}") from exc
        digits = raw if isinstance(raw, bytes) else str(raw).encode()
        return [_RESULTS[d - 48] for d in digits]  # b"0" is 48

    async def finish(self, done: Sequence[str], released: Sequence[str], owner: str, ttl_ms: int) -> None:
        if not done and not released:
            return
        try:
            await self._finish(keys=[*done, *released], args=[owner, ttl_ms, len(done)])
        except (RedisError, OSError) as exc:
            raise IdempotencyError(f"marking keys done in Redis at {_safe(self._url)} failed: {exc}") from exc

    async def close(self) -> None:
        await self._redis.aclose()


def _safe(url: str) -> str:
    """The URL without a password, for error messages."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url
