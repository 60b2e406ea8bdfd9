"""The claim -> done protocol on a real Redis: one round trip per batch, leases, owners, TTLs."""

from __future__ import annotations

import asyncio

import pytest

from choreo import IdempotencyError, Settings
from choreo.idempotency import ClaimResult
from choreo.parking import Gate, GateResult
from choreo.stores.redis import RedisIdempotencyStore, RedisParkingLot, _holder

pytestmark = pytest.mark.redis

C, D, B = ClaimResult.CLAIMED, ClaimResult.DONE, ClaimResult.BUSY


@pytest.fixture
async def store(settings: Settings) -> RedisIdempotencyStore:
    s = RedisIdempotencyStore(settings.redis_url, prefix=settings.redis_prefix)
    yield s  # type: ignore[misc]
    await s.close()


def keys(settings: Settings, *names: str) -> list[str]:
    return [f"{settings.redis_prefix}idem:{{saga}}:svc:h:{n}" for n in names]


def marker(settings: Settings, batch: int, owner: str) -> str:
    return f"{settings.redis_prefix}batch:{batch}:{_holder(owner)}"


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


async def test_done_keys_expire_after_their_ttl(settings: Settings) -> None:
    # A key claimed in a batch is kept for the done TTL plus its lease, and its batch's marker at
    # least as long; one done on its own is kept for the done TTL.
    store = RedisIdempotencyStore(settings.redis_url, prefix=settings.redis_prefix, done_ttl_ms=5_000)
    k = keys(settings, "a", "b")
    try:
        await store.claim(k[:1], "o", 1_000)
        await asyncio.sleep(0.01)  # the marker is written later, so it expires later
        await store.finish(k[:1], [], "o", 5_000)
        await store.finish(k[1:], [], "o", 5_000)  # never claimed here: marked on its own
        async with store.redis.pipeline(transaction=True) as pipe:  # both read at one instant
            key_ttl, mark_ttl = await pipe.pttl(k[0]).pttl(marker(settings, 1, "o")).execute()
        assert 5_000 < key_ttl <= mark_ttl <= 6_000
        assert 0 < await store.redis.pttl(k[1]) <= 5_000 and await store.redis.get(k[1]) == b"d"
    finally:
        await store.close()


async def test_a_whole_batch_is_one_call(store: RedisIdempotencyStore, settings: Settings) -> None:
    k = keys(settings, *[str(i) for i in range(2_000)])
    before = (await store.redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    results = await store.claim(k, "o", 10_000)
    await store.finish(k, [], "o", 60_000)
    after = (await store.redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    assert results == [C] * 2_000
    assert after - before == 2, "one script call to claim 2,000 keys, one to finish them"


async def _sets(store: RedisIdempotencyStore) -> int:
    return int((await store.redis.info("commandstats")).get("cmdstat_set", {}).get("calls", 0))


async def test_a_batch_is_marked_done_by_one_write(store: RedisIdempotencyStore, settings: Settings) -> None:
    k = keys(settings, *[str(i) for i in range(500)])
    await store.claim(k, "o", 10_000)
    before = await _sets(store)
    await store.finish(k[:499], k[499:], "o", 60_000)
    assert await _sets(store) - before == 1, "one marker for the batch, not a write per key"
    assert await store.claim(k, "p", 10_000) == [D] * 499 + [C]


async def test_a_claim_is_stored_in_one_allocation(store: RedisIdempotencyStore, settings: Settings) -> None:
    # Kept as long as a done mark: a value short enough for Redis's embedded strings (44 bytes).
    k = keys(settings, "a")
    await store.claim(k, f"checkout-payment@{'host' * 16}:4194304:0123abcd", 30_000)
    assert await store.redis.object("encoding", k[0]) == b"embstr"


async def test_a_claim_outliving_its_batch_stays_held_then_is_done_on_its_own(
        store: RedisIdempotencyStore, settings: Settings) -> None:
    k = keys(settings, "a", "late", "late-fails")
    assert await store.claim(k, "o", 10_000) == [C, C, C]
    await store.finish(k[:1], [], "o", 60_000)  # the other two are still running
    assert await store.claim(k, "p", 10_000) == [D, B, B]
    assert await store.claim(k[1:], "o", 10_000) == [C, C], "the owner may still claim its own again"
    await store.finish(k[1:2], k[2:], "o", 60_000)
    assert await store.redis.get(k[1]) == b"d"
    assert await store.claim(k, "p", 10_000) == [D, D, C]


async def test_a_copy_claimed_again_before_its_batch_is_marked_is_done_with_it(
        store: RedisIdempotencyStore, settings: Settings) -> None:
    # The next batch claims a copy of an event while the batch before (which ran it) is finishing.
    k = keys(settings, "a")
    assert await store.claim(k, "o", 10_000) == [C]
    assert await store.claim(k, "o", 10_000) == [C]
    await store.finish(k, [], "o", 60_000)
    assert await store.claim(k, "o", 10_000) == [D], "its copy sees it done"
    assert await store.claim(k, "p", 10_000) == [D]


async def test_a_claim_whose_lease_ran_out_is_taken_over_and_its_holder_cannot_mark_it(
        store: RedisIdempotencyStore, settings: Settings) -> None:
    k = keys(settings, "a", "b")
    assert await store.claim(k, "hung", 100) == [C, C]
    await asyncio.sleep(0.25)
    assert await store.claim(k[:1], "p", 10_000) == [C]
    await store.finish(k, [], "hung", 60_000)  # the hung process wakes up and finishes its batch
    assert await store.claim(k, "q", 10_000) == [B, D], "p's claim is p's; b was not taken over"


async def test_a_key_taken_back_after_two_takeovers_is_marked_with_its_new_batch(
        store: RedisIdempotencyStore, settings: Settings) -> None:
    k = keys(settings, "a", "b")
    assert await store.claim(k, "o", 100) == [C, C]
    await asyncio.sleep(0.25)
    assert await store.claim(k[:1], "p", 100) == [C]
    await asyncio.sleep(0.25)
    assert await store.claim(k[:1], "o", 10_000) == [C]  # o's second batch holds it now
    await store.finish(k[:1], [], "o", 60_000)
    assert await store.claim(k, "q", 10_000) == [D, C], "b, of o's first batch, is not marked: its lease ran out"


async def test_a_failed_finish_never_marks_the_claims_it_gave_back(
        store: RedisIdempotencyStore, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # Giving back "failed" did not reach Redis: its claim still names its batch, so the batch's
    # marker must never be written, even when its last key ("late") finishes.
    k = keys(settings, "ok", "failed", "late")
    assert await store.claim(k, "o", 300) == [C, C, C]
    finish = store._finish

    async def unreachable(*args: object, **kwargs: object) -> object:
        raise ConnectionError("Redis went away")

    monkeypatch.setattr(store, "_finish", unreachable)
    with pytest.raises(IdempotencyError, match="marking keys done"):
        await store.finish(k[:1], k[1:2], "o", 60_000)
    monkeypatch.setattr(store, "_finish", finish)
    await store.finish(k[2:], [], "o", 60_000)
    assert not await store.redis.exists(marker(settings, 1, "o"))
    assert await store.claim(k, "p", 10_000) == [B, B, D]
    await asyncio.sleep(0.4)
    assert await store.claim(k, "p", 10_000) == [C, C, D], "their leases ran out: run again"


async def test_claims_written_before_batch_markers_are_still_read(store: RedisIdempotencyStore, settings: Settings) -> None:
    k = keys(settings, "done", "held", "mine")
    await store.redis.set(k[0], "d", px=60_000)
    await store.redis.set(k[1], "c:other", px=60_000)
    await store.redis.set(k[2], "c:o", px=60_000)
    assert await store.claim(k, "o", 10_000) == [D, B, C]
    assert 0 < await store.redis.pttl(k[2]) <= 10_000
    await store.finish(k[2:], [], "o", 60_000)
    assert await store.redis.get(k[2]) == b"d"


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
