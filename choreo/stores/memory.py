"""In-memory idempotency store with the same semantics as the Redis one (leases expire by the clock)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from choreo.idempotency import ClaimResult


class MemoryIdempotencyStore:
    """``IdempotencyStore`` in a dict, for unit tests. ``clock`` returns milliseconds."""

    def __init__(self, clock: Callable[[], float] = lambda: time.monotonic() * 1000) -> None:
        self._clock = clock
        self._keys: dict[str, tuple[str, float]] = {}  # key -> ("d" | "c:<owner>", expires at ms)

    def _get(self, key: str) -> str | None:
        entry = self._keys.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._keys[key]
            return None
        return entry[0]

    async def claim(self, keys: Sequence[str], owner: str, lease_ms: int) -> list[ClaimResult]:
        mine = f"c:{owner}"
        out = []
        for key in keys:
            value = self._get(key)
            if value is None or value == mine:
                self._keys[key] = (mine, self._clock() + lease_ms)
                out.append(ClaimResult.CLAIMED)
            elif value == "d":
                out.append(ClaimResult.DONE)
            else:
                out.append(ClaimResult.BUSY)
        return out

    async def finish(self, done: Sequence[str], released: Sequence[str], owner: str, ttl_ms: int) -> None:
        for key in done:
            self._keys[key] = ("d", self._clock() + ttl_ms)
        for key in released:
            if self._get(key) == f"c:{owner}":
                del self._keys[key]

    def expire_claims(self) -> None:
        """Let every outstanding claim lapse now, as leases of a crashed process eventually do."""
        self._keys = {k: v for k, v in self._keys.items() if v[0] == "d"}

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
