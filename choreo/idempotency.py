"""The idempotency protocol: claim (with a lease) -> run -> done (with a long TTL).

Kafka delivers at least once; this makes each event's *effects* happen once per handler. For every
(service, handler, event id) there is one key with three states::

    absent --claim--> claimed(owner, lease expiry) --done--> done (kept for done_ttl)
               ^                |
               +--release/lease expiry (the owner failed or crashed)

* ``CLAIMED``: the caller owns the event now and must run it, then mark it done or release it.
* ``DONE``: the event's effects already happened (a redelivery): skip it, emit nothing.
* ``BUSY``: another live process holds the claim (e.g. right after a rebalance); try again later.

A claim held by this same owner (a retry in the same process) is granted again. All calls take many
keys at once, so the processing loop makes one round trip per batch.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol


#: How long a finished event is remembered unless configured (``Settings.done_ttl_ms``).
DONE_TTL_MS = 7 * 24 * 3_600_000


class ClaimResult(enum.IntEnum):
    DONE = 0
    CLAIMED = 1
    BUSY = 2


class IdempotencyStore(Protocol):
    """Where claims live. Implementations are atomic per key and batch many keys per round trip."""

    async def claim(self, keys: Sequence[str], owner: str, lease_ms: int) -> list[ClaimResult]:
        """Try to claim each key for ``owner``; results are in the order of ``keys``."""

    async def finish(self, done: Sequence[str], released: Sequence[str], owner: str, ttl_ms: int) -> None:
        """Mark ``done`` keys done (kept ``ttl_ms``) and drop ``owner``'s claims on ``released``."""

    async def ping(self) -> None:
        """Raise ``IdempotencyError`` naming the address if the store cannot be reached."""

    async def close(self) -> None: ...


def idempotency_key(prefix: str, service: str, handler: str, correlation_id: str, event_id: str) -> str:
    """``<prefix>idem:{<correlation id>}:<service>:<handler>:<event id>``.

    The correlation id sits in a Redis Cluster hash tag, so all keys of one saga share a slot.
    """
    return f"{prefix}idem:{{{correlation_id}}}:{service}:{handler}:{event_id}"
