"""Per-key order while an event waits in a retry topic: later events of its key are parked behind it.

When a handler's event goes to a retry topic, the partition moves on, so without care the key's
next event would run first and reorder the saga. For every (group, handler, topic, key) a list in
the store holds the event ids that must run in order, head first::

    head (in a retry topic) <- parked <- parked ...

* **gate** (before running a batch, if ``any_parked`` says a list exists): an event runs if the list
  is empty or the event is its head.
  Otherwise it is appended (once) and *parked*: forwarded to the first retry tier, where it waits
  until it is the head. Only the head of a list ever runs, so the list, not where the records sit,
  decides the order.
* **park** (after running, before the batch's records are sent): a failed event going to a retry
  topic becomes the head of its list, and events behind it in the same batch join it. Writing the
  list before the retry record is sent means a crash in between leaves a head whose original
  record is redelivered, and the gate lets a head run.
* **unpark** (after the outcome is durable): a head that succeeded or was dead-lettered leaves the
  list, and the next event becomes the head.

A list expires ``ttl_ms`` after its last write, so a head lost to an operator purging a retry
topic does not hold its key forever.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class GateResult(enum.IntEnum):
    FREE = 0  # nothing of this key waits: run
    HEAD = 1  # this event heads its key's list: run, and leave the list when finished
    PARKED = 2  # another event of this key is ahead: wait behind it


@dataclass(frozen=True, slots=True)
class Gate:
    result: GateResult
    #: For a parked event, when the head is due (epoch ms; 0 if unknown).
    head_due_ms: int = 0


class ParkingLot(Protocol):
    """Where the per-key lists live. Each call takes a whole batch (one round trip)."""

    async def any_parked(self, keys: Sequence[str]) -> bool:
        """Whether any of these list keys has a list: asked alongside the batch's claims, so that
        a batch none of whose keys waits (nearly every batch) needs no ``gate``."""

    async def gate(self, entries: Sequence[tuple[str, str, bool]], ttl_ms: int) -> list[Gate]:
        """For each ``(list key, event id, may_park)``: the gate's answer. Entries with ``may_park``
        false (events already done) are only looked at, never appended."""

    async def park(self, entries: Sequence[tuple[str, str, int]], ttl_ms: int) -> None:
        """Append each ``(list key, event id, due ms)`` unless present, in order. A ``due ms`` above
        zero records when the list's head is due again (the head's retry time)."""

    async def unpark(self, entries: Sequence[tuple[str, str]]) -> None:
        """Remove each ``(list key, event id)``."""

    async def close(self) -> None: ...


def park_key(prefix: str, group: str, handler: str, topic: str, key: bytes) -> str:
    """``<prefix>park:<group>:<handler>:<topic>:<record key>``."""
    return f"{prefix}park:{group}:{handler}:{topic}:{key.decode('utf-8', 'backslashreplace')}"
