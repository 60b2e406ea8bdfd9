"""The claim -> done protocol on a real Redis: one round trip per batch, leases, owners, TTLs."""

from __future__ import annotations

import asyncio

import pytest

from choreo import IdempotencyError, Settings
from choreo.idempotency import ClaimResult
from choreo.stores.redis import RedisIdempotencyStore

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


async def test_an_unreachable_redis_is_an_idempotency_error_naming_the_address() -> None:
    store = RedisIdempotencyStore("redis://127.0.0.1:1/0")
    with pytest.raises(IdempotencyError, match="127.0.0.1:1"):
        await store.claim(["k"], "o", 1000)
    await store.close()
