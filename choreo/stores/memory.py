"""In-memory idempotency store with the same semantics as the Redis one (leases expire by the clock)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from choreo.idempotency import ClaimResult
from choreo.parking import Gate, GateResult


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


class MemoryParkingLot:
    """``ParkingLot`` in dicts, for unit tests (lists never expire)."""

    def __init__(self) -> None:
        self.lists: dict[str, list[str]] = {}
        self._due: dict[str, int] = {}

    async def any_parked(self, keys: Sequence[str]) -> bool:
        return any(self.lists.get(key) for key in keys)

    async def gate(self, entries: Sequence[tuple[str, str, bool]], ttl_ms: int) -> list[Gate]:
        out = []
        for key, event_id, may_park in entries:
            ids = self.lists.get(key)
            if not ids:
                out.append(Gate(GateResult.FREE))
            elif ids[0] == event_id:
                out.append(Gate(GateResult.HEAD))
            elif may_park:
                if event_id not in ids:
                    ids.append(event_id)
                out.append(Gate(GateResult.PARKED, self._due.get(key, 0)))
            else:
                out.append(Gate(GateResult.FREE))
        return out

    async def park(self, entries: Sequence[tuple[str, str, int]], ttl_ms: int) -> None:
        for key, event_id, due_ms in entries:
            ids = self.lists.setdefault(key, [])
            if event_id not in ids:
                ids.append(event_id)
            if due_ms and ids[0] == event_id:
                self._due[key] = due_ms

    async def unpark(self, entries: Sequence[tuple[str, str]]) -> None:
        for key, event_id in entries:
            ids = self.lists.get(key, [])
            if ids and ids[0] == event_id:
                self._due.pop(key, None)
            if event_id in ids:
                ids.remove(event_id)
            if not ids:
                self.lists.pop(key, None)

    async def close(self) -> None:
        return None
