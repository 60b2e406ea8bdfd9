"""Redis adapter for the idempotency store: one Lua call claims a whole batch in one round trip."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from typing import Any

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError, WatchError
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("choreo's Redis store needs the 'redis' package: pip install choreo") from exc

from choreo.errors import IdempotencyError
from choreo.idempotency import DONE_TTL_MS, ClaimResult
from choreo.parking import Gate, GateResult

# Every script takes its lists as one argument each, joined by a separator that none of the values
# holds (ARGV[first] names it), and splits them itself: redis-py packs each argument in Python, which
# for a 500-key batch costs more than the round trip (~1 ms against ~10 us). An empty separator means
# the lists come element by element after a count (a batch whose values hold every separator tried).
# Keys are therefore not declared in KEYS: standalone Redis, which is what choreo supports.
_LISTS = """
local function list(first, j)
  local sep, l = ARGV[first], {}
  if sep == '' then
    local n = tonumber(ARGV[first + 1])
    for i = 1, n do l[i] = ARGV[first + 1 + (j - 1) * n + i] end
    return l
  end
  local s, start = ARGV[first + j], 1
  while true do
    local at = string.find(s, sep, start, true)
    if not at then
      l[#l + 1] = string.sub(s, start)
      break
    end
    l[#l + 1] = string.sub(s, start, at - 1)
    start = at + 1
  end
  return l
end

local function lists(first, count)
  local out = {}
  for j = 1, count do out[j] = list(first, j) end
  return out
end

-- Whether any of the keys exists: one EXISTS per thousand keys, since unpack is bounded by Lua's stack.
local function any_exists(keys)
  for i = 1, #keys, 1000 do
    if redis.call('EXISTS', unpack(keys, i, math.min(i + 999, #keys))) > 0 then return true end
  end
  return false
end
"""

# Values:
# * "d": done (kept for the done TTL);
# * "b:<deadline ms>:<batch>:<holder>": claimed by the owner whose digest is ``holder`` (12 hex
#   digits, so the value stays short enough for Redis to store it with its object, in one
#   allocation) in its claim call number ``batch``, the lease running to the deadline (Redis's
#   clock). The key is kept as long as a done mark, because it *becomes* done, without being written
#   again, once its batch's marker ``<marks><batch>:<holder>`` exists: a batch of 500 events costs
#   Redis one write to finish, not 500;
# * "c:<owner>": claimed on its own, the lease being the key's TTL. A claim still held when the rest
#   of its batch is marked (a handler call outliving its batch) is turned into this before the marker
#   is written, and is then marked done on its own.
# The reply is one string of digits, one per key: parsing a 500-element array reply in redis-py costs
# more than the script itself. 0: done, 1: claimed now, under this call's batch; 2: busy; 3: claimed
# already by this owner (a retry, or a copy of the event), which keeps the claim's batch and gets a
# new lease. ARGV: owner, lease ms, key TTL ms, batch, marks prefix, holder, then the list of keys.
_BATCH_CLAIMS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function batch_claim(deadline, batch, holder)
  return 'b:' .. string.format('%.0f', deadline) .. ':' .. batch .. ':' .. holder
end

-- deadline, batch and holder of a batch claim; nil for any other value
local function parse(v)
  return string.match(v, '^b:(%d+):(%d+):(.*)$')
end
"""

_CLAIM = _LISTS + _BATCH_CLAIMS + """
local owner, lease, ttl, marks, me = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[5], ARGV[6]
local now = now_ms()
local mine = batch_claim(now + lease, ARGV[4], me)
local single = 'c:' .. owner
local out = {}
for i, key in ipairs(lists(7, 1)[1]) do
  -- A fresh key, the common case, costs one command.
  local v = false
  if not redis.call('SET', key, mine, 'NX', 'PX', ttl) then
    v = redis.call('GET', key)
    if not v then redis.call('SET', key, mine, 'PX', ttl) end  -- it expired in between
  end
  if not v then
    out[i] = '1'
  elseif v == 'd' then
    out[i] = '0'
  elseif v == single then
    redis.call('PEXPIRE', key, lease)
    out[i] = '3'
  else
    local deadline, batch, holder = parse(v)
    if not deadline then
      out[i] = '2'  -- held on its own by another owner, until its TTL runs out
    elseif redis.call('EXISTS', marks .. batch .. ':' .. holder) == 1 then
      out[i] = '0'
    elseif holder == me then
      redis.call('SET', key, batch_claim(now + lease, batch, me), 'KEEPTTL')
      out[i] = '3'
    elseif tonumber(deadline) > now then
      out[i] = '2'
    else
      redis.call('SET', key, mine, 'PX', ttl)  -- the holder's lease ran out: it crashed or hung
      out[i] = '1'
    end
  end
end
return table.concat(out)
"""

# One list of keys with one operation each, applied in order: "r" gives the owner's claim back,
# "h<batch>" turns the owner's claim in that batch into one on its own (see above), "m" writes a
# batch's marker and "d" marks a key done on its own.
# ARGV: owner, done TTL ms, marker TTL ms, holder, then the lists of keys and operations.
_FINISH = _LISTS + _BATCH_CLAIMS + """
local owner, ttl, mark_ttl, me = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local single = 'c:' .. owner
local now
local l = lists(5, 2)
local ops = l[2]
for i, key in ipairs(l[1]) do
  local op = ops[i]
  if op == 'm' then
    redis.call('SET', key, '1', 'PX', mark_ttl)
  elseif op == 'd' then
    redis.call('SET', key, 'd', 'PX', ttl)
  else
    local v = redis.call('GET', key)
    if v then
      local deadline, batch, holder = parse(v)
      if op == 'r' then
        if v == single or holder == me then redis.call('DEL', key) end
      elseif holder == me and 'h' .. batch == op then
        now = now or now_ms()
        local left = tonumber(deadline) - now
        if left > 0 then
          redis.call('SET', key, single, 'PX', string.format('%.0f', left))
        else
          redis.call('DEL', key)  -- its lease ran out: as a claim on its own would have expired
        end
      end
    end
  end
end
return #ops
"""


def _lists(*lists: Sequence[str]) -> list[str | int]:
    """Script arguments for ``lists`` of equal length (see ``_LISTS``): a separator, then one joined
    string per list; or, if every separator tried occurs in some value, ``""``, the length and the
    values one by one."""
    for sep in _SEPARATORS:
        joined = [sep.join(values) for values in lists]
        # One character, so a value holding it shows as one separator too many.
        if all(text.count(sep) == len(values) - 1 for text, values in zip(joined, lists)):
            return [sep, *joined]
    return ["", len(lists[0]), *(value for values in lists for value in values)]


_SEPARATORS = "\n" + "".join(chr(c) for c in range(1, 32) if c != 10) + "\x7f"


def _holder(owner: str) -> str:
    """The owner's name in batch claims and markers: 48 bits of its digest. Owners carry a random
    part (``Service`` adds 8 hex digits of a UUID), so two live owners share one by chance only."""
    return hashlib.blake2b(owner.encode(), digest_size=6).hexdigest()


_RESULTS = (ClaimResult.DONE, ClaimResult.CLAIMED, ClaimResult.BUSY, ClaimResult.CLAIMED)


class RedisIdempotencyStore:
    """``IdempotencyStore`` on Redis >= 6.2. Safe for many processes; keys expire by themselves.

    Each ``claim`` call is a batch: its keys are marked done together by one marker key (see the
    values above), which this object tracks per owner until every key of the batch is finished.
    ``done_ttl_ms`` is how long a claimed key is kept, so it is remembered that long once done.
    Multi-key scripts need every key in one slot on Redis Cluster; keys carry the saga id as hash tag,
    and batches are split by the caller only when running against a cluster (not supported yet).
    """

    def __init__(self, url: str, *, prefix: str = "choreo:", done_ttl_ms: int = DONE_TTL_MS) -> None:
        self._url = url
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        self._claim = self._redis.register_script(_CLAIM)
        self._finish = self._redis.register_script(_FINISH)
        self._marks = f"{prefix}batch:"
        self._done_ttl_ms = done_ttl_ms
        self._batches = itertools.count(1)
        # Per owner, its batches with a key not finished yet: those keys, and the TTL they were
        # claimed with. A key in none of them is finished on its own. Set operations throughout:
        # this bookkeeping runs for every key, and Python's sets do it in C.
        self._open: dict[str, dict[int, tuple[set[str], int]]] = {}
        self._holders: dict[str, str] = {}

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
        batch = next(self._batches)
        ttl = self._done_ttl_ms + lease_ms  # done for done_ttl_ms after a finish within the lease
        try:
            raw = await self._claim(args=[owner, lease_ms, ttl, batch, self._marks, self._holder(owner), *_lists(keys)])
        except (RedisError, OSError) as exc:
            raise IdempotencyError(f"claiming {len(keys)} keys in Redis at {_safe(self._url)} failed: {exc}") from exc
        digits = raw if isinstance(raw, bytes) else str(raw).encode()
        if digits.count(49) == len(digits):  # b"1": all claimed now, the common case
            claimed = set(keys)
        else:
            claimed = {key for key, d in zip(keys, digits) if d == 49}
        if claimed:
            # A key taken over again may still sit in an older batch too (it had been taken from us
            # meanwhile); finishing it then marks both, which is still right.
            self._open.setdefault(owner, {})[batch] = (claimed, ttl)
        return [_RESULTS[d - 48] for d in digits]  # b"0" is 48

    async def finish(self, done: Sequence[str], released: Sequence[str], owner: str, ttl_ms: int) -> None:
        if not done and not released:
            return
        batches = self._open.get(owner, {})
        holder = self._holder(owner)
        finished, gone = set(done), set(released)
        single = set(finished)
        keys: list[str] = list(released)
        ops: list[str] = ["r"] * len(keys)
        touched: list[int] = []  # batches that give back claims but are not marked
        mark_ttl = ttl_ms
        for batch, (still, claimed_ttl) in list(batches.items()):
            if still.isdisjoint(finished):
                if gone and not still.isdisjoint(gone):
                    still -= gone
                    touched.append(batch)
                    if not still:
                        del batches[batch]
                continue
            del batches[batch]
            single -= still
            mark_ttl = max(mark_ttl, claimed_ttl)  # the marker outlives every key that names it
            for key in still - gone - finished:  # a call that outlives its batch: it goes on alone
                keys.append(key)
                ops.append(f"h{batch}")
            keys.append(f"{self._marks}{batch}:{holder}")
            ops.append("m")
        keys += single
        ops += ["d"] * len(single)
        try:
            await self._finish(args=[owner, ttl_ms, mark_ttl, holder, *_lists(keys, ops)])
        except (RedisError, OSError) as exc:
            # Claims this call should have given back may still name their batch: its marker must
            # never be written, so the rest of it is finished key by key (or left to expire).
            for batch in touched:
                batches.pop(batch, None)
            raise IdempotencyError(f"marking keys done in Redis at {_safe(self._url)} failed: {exc}") from exc

    def _holder(self, owner: str) -> str:
        holder = self._holders.get(owner)
        if holder is None:
            holder = self._holders[owner] = _holder(owner)
        return holder

    async def close(self) -> None:
        await self._redis.aclose()


# Lists of event ids per key, head first (see choreo.parking); ``<list>:due`` holds the head's retry
# time. Replies are short strings naming only the entries that are not free: most batches park nothing.
# So the script first asks whether any of the lists exists (a few EXISTS) before a LINDEX per key; the
# service asks ``any_parked`` first and calls the gate only when one does, but the gate stays cheap
# for any other caller.
# ARGV: ttl ms, then the lists of keys, event ids and may-park flags ("1"/"0").
_GATE = _LISTS + """
local ttl = ARGV[1]
local keys = list(2, 1)
if not any_exists(keys) then return '' end
local ids, flags = list(2, 2), list(2, 3)
local out = {}
for i, key in ipairs(keys) do
  local id = ids[i]
  local head = redis.call('LINDEX', key, 0)
  if head then
    if head == id then
      out[#out + 1] = i .. ':h'
    elseif flags[i] == '1' then
      if not redis.call('LPOS', key, id) then
        redis.call('RPUSH', key, id)
      end
      redis.call('PEXPIRE', key, ttl)
      out[#out + 1] = i .. ':p:' .. (redis.call('GET', key .. ':due') or '0')
    end
  end
end
return table.concat(out, ',')
"""

# ARGV: the list of keys. 1 if any of them exists.
_ANY = _LISTS + """
return any_exists(list(1, 1)) and 1 or 0
"""

# ARGV: ttl ms, then the lists of keys, event ids and due times (ms; "0": not the head's retry).
_PARK = _LISTS + """
local ttl = ARGV[1]
local l = lists(2, 3)
local ids, dues = l[2], l[3]
for i, key in ipairs(l[1]) do
  local id = ids[i]
  if not redis.call('LPOS', key, id) then
    redis.call('RPUSH', key, id)
  end
  redis.call('PEXPIRE', key, ttl)
  if dues[i] ~= '0' and redis.call('LINDEX', key, 0) == id then
    redis.call('SET', key .. ':due', dues[i], 'PX', ttl)
  end
end
return #l[1]
"""

# ARGV: the lists of keys and event ids.
_UNPARK = _LISTS + """
local l = lists(1, 2)
local ids = l[2]
for i, key in ipairs(l[1]) do
  if redis.call('LINDEX', key, 0) == ids[i] then
    redis.call('DEL', key .. ':due')
  end
  redis.call('LREM', key, 1, ids[i])
end
return #l[1]
"""


class RedisParkingLot:
    """``ParkingLot`` on Redis >= 6.0.6 (LPOS), sharing a connection pool with the idempotency store."""

    def __init__(self, redis: aioredis.Redis, url: str) -> None:
        self._redis = redis
        self._url = url
        self._any = redis.register_script(_ANY)
        self._gate = redis.register_script(_GATE)
        self._park = redis.register_script(_PARK)
        self._unpark = redis.register_script(_UNPARK)

    async def any_parked(self, keys: Sequence[str]) -> bool:
        if not keys:
            return False
        try:
            return bool(await self._any(args=_lists(keys)))
        except (RedisError, OSError) as exc:
            raise IdempotencyError(f"checking parked keys in Redis at {_safe(self._url)} failed: {exc}") from exc

    async def gate(self, entries: Sequence[tuple[str, str, bool]], ttl_ms: int) -> list[Gate]:
        gates = [_FREE] * len(entries)
        if not entries:
            return gates
        lists = _lists([key for key, _, _ in entries], [event_id for _, event_id, _ in entries],
                       ["1" if may_park else "0" for _, _, may_park in entries])
        try:
            raw = await self._gate(args=[ttl_ms, *lists])
        except (RedisError, OSError) as exc:
            raise IdempotencyError(f"checking parked keys in Redis at {_safe(self._url)} failed: {exc}") from exc
        for part in _text(raw).split(",") if raw else ():
            index, kind, *due = part.split(":")
            gates[int(index) - 1] = _HEAD if kind == "h" else Gate(GateResult.PARKED, int(due[0]) if due else 0)
        return gates

    async def park(self, entries: Sequence[tuple[str, str, int]], ttl_ms: int) -> None:
        if not entries:
            return
        lists = _lists([key for key, _, _ in entries], [event_id for _, event_id, _ in entries],
                       [str(due_ms) for _, _, due_ms in entries])
        try:
            await self._park(args=[ttl_ms, *lists])
        except (RedisError, OSError) as exc:
            raise IdempotencyError(f"parking events in Redis at {_safe(self._url)} failed: {exc}") from exc

    async def unpark(self, entries: Sequence[tuple[str, str]]) -> None:
        if not entries:
            return
        try:
            await self._unpark(args=_lists([key for key, _ in entries], [event_id for _, event_id in entries]))
        except (RedisError, OSError) as exc:
            raise IdempotencyError(f"releasing parked keys in Redis at {_safe(self._url)} failed: {exc}") from exc

    async def close(self) -> None:
        return None  # the connection belongs to the idempotency store


_FREE = Gate(GateResult.FREE)
_HEAD = Gate(GateResult.HEAD)


def _safe(url: str) -> str:
    """The URL without a password, for error messages."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


class RedisSagaStore:
    """``SagaStore`` on Redis: one JSON value per saga, updated with optimistic transactions (WATCH).

    Keys (``{id}`` is a Redis Cluster hash tag): ``<prefix>saga:{<id>}`` the state,
    ``<prefix>saga-status:{<id>}`` its status alone (read by services that skip ended sagas),
    ``<prefix>sagas`` (sorted by start time) and ``<prefix>saga-deadlines`` (sorted by deadline).
    """

    def __init__(self, url: str, *, prefix: str = "choreo:") -> None:
        self._url = url
        self._prefix = prefix
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)

    def _key(self, saga_id: str) -> str:
        return f"{self._prefix}saga:{{{saga_id}}}"

    def status_key(self, saga_id: str) -> str:
        return f"{self._prefix}saga-status:{{{saga_id}}}"

    async def update(self, saga_id: str, change: Callable[[Any], Any]) -> Any:
        key = self._key(saga_id)
        for _ in range(100):
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    old = json.loads(raw) if raw else None
                    new = change(old)
                    if new is None or new is old:
                        await pipe.unwatch()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
                        return old
                    pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
                    pipe.set(key, json.dumps(new, separators=(",", ":")))
                    pipe.set(self.status_key(saga_id), new["status"])
                    pipe.zadd(f"{self._prefix}sagas", {saga_id: new["started_at"]})
                    if new.get("ended_at") is None:
                        pipe.zadd(f"{self._prefix}sagas-running", {saga_id: new["started_at"]})
                    else:
                        pipe.zrem(f"{self._prefix}sagas-running", saga_id)
                    if new.get("next_deadline") is None:
                        pipe.zrem(f"{self._prefix}saga-deadlines", saga_id)
                    else:
                        pipe.zadd(f"{self._prefix}saga-deadlines", {saga_id: new["next_deadline"]})
                    await pipe.execute()
                    return new
            except WatchError:
                continue  # another tracker process changed this saga meanwhile: fold again
            except (RedisError, OSError) as exc:
                raise IdempotencyError(f"updating saga {saga_id} in Redis at {_safe(self._url)} failed: {exc}") from exc
        raise IdempotencyError(f"saga {saga_id}: 100 conflicting updates in a row")

    async def get(self, saga_id: str) -> Any:
        raw = await self._redis.get(self._key(saga_id))
        return json.loads(raw) if raw else None

    async def statuses(self, saga_ids: Sequence[str]) -> list[str | None]:
        """The status of each saga (None if unknown), in one round trip."""
        if not saga_ids:
            return []
        values = await self._redis.mget([self.status_key(i) for i in saga_ids])
        return [_text(v) if v else None for v in values]

    async def counts(self, now_ms: int) -> tuple[int, int]:
        """(sagas not ended, sagas past their next deadline), for the metrics."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(f"{self._prefix}sagas-running")
            pipe.zcount(f"{self._prefix}saga-deadlines", "-inf", now_ms)
            running, overdue = await pipe.execute()
        return int(running), int(overdue)

    async def due(self, now_ms: int, limit: int) -> list[str]:
        ids = await self._redis.zrangebyscore(f"{self._prefix}saga-deadlines", "-inf", now_ms, start=0, num=limit)
        return [_text(i) for i in ids]

    async def postpone(self, saga_id: str, until_ms: int) -> None:
        await self._redis.zadd(f"{self._prefix}saga-deadlines", {saga_id: until_ms}, xx=True)

    async def list(self, *, status: str | None = None, older_than_ms: int | None = None,
                   newest_first: bool = True, limit: int = 50) -> list[Any]:
        """Sagas by start time, filtered by status and minimum age."""
        import time

        key = f"{self._prefix}sagas"
        top = "+inf" if older_than_ms is None else int(time.time() * 1000) - older_than_ms
        found: list[Any] = []
        offset = 0
        while len(found) < limit:
            if newest_first:
                ids = await self._redis.zrevrangebyscore(key, top, "-inf", start=offset, num=200)
            else:
                ids = await self._redis.zrangebyscore(key, "-inf", top, start=offset, num=200)
            if not ids:
                break
            offset += len(ids)
            raws = await self._redis.mget([self._key(_text(i)) for i in ids])
            for raw in raws:
                state = json.loads(raw) if raw else None
                if state and (status is None or state["status"] == status):
                    found.append(state)
        return found[:limit]

    async def close(self) -> None:
        await self._redis.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
