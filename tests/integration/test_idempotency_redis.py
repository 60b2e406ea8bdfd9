"""The claim -> done protocol on a real Redis: one round trip per batch, leases, owners, TTLs."""

from __future__ import annotations

import asyncio

import pytest

from choreo import IdempotencyError, Settings
from choreo.idempotency import ClaimResult
from choreo.parking import Gate, GateResult
from choreo.stores.redis import RedisIdempotencyStore, RedisParkingLot

pytestmark = pytest.mark.redis

C, D, B = ClaimResult.CLAIMED, ClaimResult.DONE, ClaimResult.BUSY


@pytest.fixture
async def store(settings: Settings) -> RedisIdempotencyStore:
    s = RedisIdempotencyStore(settings.redis_url)
    yield s  # type: ignore[misc]
    await s.close()


def keys(settings: Settings, *names: str) -> list[str]:
    return [f"{settings.redis_prefix}idem:{{saga}}:svc:h:{n}" for n in names]


async def test_a_fresh_key_is_claimed_and_a_done_key_is_skipped(store: RedisIdempotencyStore, settings: Settings) -> None:
    k = keys(settings, "a", "b")
    assert await store.claim(k, "owner-1", 10_000) == [C, C]
    await store.finish([k[0]], [k[1]], "owner-1", 60_000)
    assert await store.claim(k, "owner-2", 10_000) == [D, C]


async def test_a_live_claim_is_not_stolen_but_its_owner_may_claim_again(store: RedisIdempotencyStore, settings: Settings) -> None:
    k = keys(settings, "a")
    assert await store.claim(k, "owner-1", 10_000) == [C]
    assert await store.claim(k, "owner-2", 10_000) == [B]
    assert await store.claim(k, "owner-1", 10_000) == [C]


async def test_an_expired_claim_is_run_again_by_another_owner(store: RedisIdempotencyStore, settings: Settings) -> None:
    k = keys(settings, "a")
    assert await store.claim(k, "crashed", 100) == [C]
    await asyncio.sleep(0.25)
    assert await store.claim(k, "owner-2", 10_000) == [C]


async def test_release_drops_only_the_owners_own_claim(store: RedisIdempotencyStore, settings: Settings) -> None:
    k = keys(settings, "a")
    await store.claim(k, "owner-1", 10_000)
    await store.finish([], k, "owner-2", 60_000)  # not owner-2's claim: stays
    assert await store.claim(k, "owner-3", 10_000) == [B]
    await store.finish([], k, "owner-1", 60_000)
    assert await store.claim(k, "owner-3", 10_000) == [C]


async def test_done_keys_expire_after_their_ttl(store: RedisIdempotencyStore, settings: Settings) -> None:
    k = keys(settings, "a")
    await store.claim(k, "o", 10_000)
    await store.finish(k, [], "o", 5_000)
    ttl = await store.redis.pttl(k[0])
    assert 0 < ttl <= 5_000


async def test_a_whole_batch_is_one_call(store: RedisIdempotencyStore, settings: Settings) -> None:
    k = keys(settings, *[str(i) for i in range(2_000)])
    before = (await store.redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    results = await store.claim(k, "o", 10_000)
    await store.finish(k, [], "o", 60_000)
    after = (await store.redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    assert results == [C] * 2_000
    assert after - before == 2, "one script call to claim 2,000 keys, one to finish them"


# Every separator the store tries, and more: the batch below must fall back to one argument per value.
_AWKWARD = "".join(chr(c) for c in range(1, 32)) + "\x7f"


@pytest.mark.parametrize("names", [
    ["plain", "new\nline", "tab\there"],  # a newline (the first separator tried) in one key
    ["plain", f"every{_AWKWARD}separator", "x"],  # no single-character separator is free
], ids=["newline", "every-separator"])
async def test_keys_holding_separators_are_claimed_and_finished_exactly(
        store: RedisIdempotencyStore, settings: Settings, names: list[str]) -> None:
    k = keys(settings, *names)
    assert await store.claim(k, "o", 10_000) == [C, C, C]
    await store.finish(k[:1], k[1:], "o", 60_000)
    assert await store.redis.get(k[0]) == b"d"
    assert [await store.redis.exists(key) for key in k[1:]] == [0, 0]
    assert await store.claim(k, "p", 10_000) == [D, C, C]


@pytest.mark.parametrize("odd", ["new\nline", f"every{_AWKWARD}separator"], ids=["newline", "every-separator"])
async def test_parking_keys_and_event_ids_holding_separators(
        store: RedisIdempotencyStore, settings: Settings, odd: str) -> None:
    lot = RedisParkingLot(store.redis, settings.redis_url)
    key, other = f"{settings.redis_prefix}park:g:h:t:{odd}", f"{settings.redis_prefix}park:g:h:t:plain"
    first, second = f"id-1{odd}", f"id-2{odd}"
    assert not await lot.any_parked([key, other])
    await lot.park([(key, first, 12_345), (other, "id-3", 0)], 60_000)
    assert await lot.any_parked([f"{key}-not-parked", key]) and not await lot.any_parked([f"{key}-not-parked"])
    gates = await lot.gate([(key, first, True), (key, second, True), (other, "id-4", False)], 60_000)
    assert gates == [Gate(GateResult.HEAD), Gate(GateResult.PARKED, 12_345), Gate(GateResult.FREE)]
    assert await store.redis.lrange(key, 0, -1) == [first.encode(), second.encode()]
    await lot.unpark([(key, first)])
    assert await store.redis.lrange(key, 0, -1) == [second.encode()]
    assert await store.redis.get(key + ":due") is None, "the head's due time leaves with the head"


async def test_the_gate_finds_a_parked_key_past_its_first_thousand(store: RedisIdempotencyStore, settings: Settings) -> None:
    # any_parked, and the gate before it looks at each key, ask EXISTS a thousand keys at a time.
    lot = RedisParkingLot(store.redis, settings.redis_url)
    lists = [f"{settings.redis_prefix}park:g:h:t:k{i}" for i in range(2_500)]
    assert not await lot.any_parked(lists)
    assert await lot.gate([(k, f"id-{i}", True) for i, k in enumerate(lists)], 60_000) == [Gate(GateResult.FREE)] * 2_500
    assert await store.redis.exists(*lists) == 0, "a gate that parks nothing writes nothing"
    await lot.park([(lists[2_100], "head", 777)], 60_000)
    assert await lot.any_parked(lists) and not await lot.any_parked(lists[:2_100] + lists[2_101:])
    gates = await lot.gate([(k, f"id-{i}", i != 5) for i, k in enumerate(lists)]
                           + [(lists[2_100], "head", True), (lists[5], "id-5", False)], 60_000)
    assert gates[:2_100] == [Gate(GateResult.FREE)] * 2_100
    assert gates[2_100] == Gate(GateResult.PARKED, 777)
    assert gates[2_101:2_500] == [Gate(GateResult.FREE)] * 399
    assert gates[2_500:] == [Gate(GateResult.HEAD), Gate(GateResult.FREE)]
    assert await store.redis.lrange(lists[2_100], 0, -1) == [b"head", b"id-2100"]


async def test_an_unreachable_redis_is_an_idempotency_error_naming_the_address() -> None:
    store = RedisIdempotencyStore("redis://127.0.0.1:1/0")
    with pytest.raises(IdempotencyError, match="127.0.0.1:1"):
        await store.claim(["k"], "o", 1000)
    await store.close()
