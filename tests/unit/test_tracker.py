"""The saga tracker's pure parts (folding events into saga state, deadlines, verify) and its timer's stop."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from choreo import FlowGraph, SagaTimedOut, SagaTracker
from choreo.tracker import _Index, fold, next_deadline, verify
from services.checkout import checkout, services

GRAPH = FlowGraph.build(services, [checkout])
INDEX = _Index(GRAPH, [checkout])
T0 = 1_700_000_000_000

# (event id, type, producer, causation) of a checkout whose shipping failed and was compensated.
NO_CARRIER = [
    ("e1", "checkout.OrderPlaced", "web", None),
    ("e2", "checkout.InventoryReserved", "inventory", "e1"),
    ("e3", "checkout.PaymentCaptured", "payment", "e2"),
    ("e4", "checkout.OrderConfirmed", "order", "e3"),
    ("e5", "checkout.ShippingUnavailable", "shipping", "e4"),
    ("e6", "checkout.PaymentRefunded", "payment", "e5"),
    ("e7", "checkout.InventoryReleased", "inventory", "e6"),
    ("e8", "checkout.OrderCancelled", "order", "e7"),
]
HAPPY = [
    *NO_CARRIER[:4],
    ("e5", "checkout.ShipmentScheduled", "shipping", "e4"),
    ("e6", "checkout.CustomerNotified", "notification", "e5"),
]


def run(events: list[tuple[str, str, str, str | None]], order: list[int] | None = None) -> dict[str, Any]:
    state: dict[str, Any] | None = None
    for i in order if order is not None else range(len(events)):
        event_id, event_type, producer, cause = events[i]
        state = fold(state, checkout, INDEX, saga_id="o1", event_id=event_id, event_type=event_type,
                     producer=producer, causation_id=cause, at_ms=T0 + 10 * i, attempt=1)
    assert state is not None
    return state


def statuses(state: dict[str, Any]) -> dict[str, str]:
    return {k: v["status"] for k, v in state["steps"].items()}


def test_a_happy_saga_completes_and_skips_every_compensation() -> None:
    state = run(HAPPY)
    assert state["status"] == "completed" and state["ended_at"] == T0 + 50
    s = statuses(state)
    assert all(s[f] == "completed" for f in ("inventory.reserve_stock", "payment.charge", "order.confirm",
                                                "shipping.schedule", "notification.notify_shipped"))
    assert {v for k, v in s.items() if state["steps"][k]["compensation"]} == {"skipped"}
    assert next_deadline(state, checkout) is None


def test_a_failed_step_compensates_the_completed_ones() -> None:
    state = run(NO_CARRIER)
    s = statuses(state)
    assert state["status"] == "compensated"
    assert s["shipping.schedule"] == "failed"
    assert s["payment.charge"] == "compensated" and s["inventory.reserve_stock"] == "compensated"
    assert s["order.confirm"] == "completed"  # not compensable: the order's own cancel closes it
    assert s["payment.refund"] == "completed" and s["inventory.release_after_refund"] == "completed"


def test_the_status_while_compensating() -> None:
    assert run(NO_CARRIER[:6])["status"] == "compensating"


def test_a_duplicate_event_changes_nothing() -> None:
    state = run(NO_CARRIER)
    again = fold(state, checkout, INDEX, saga_id="o1", event_id="e3", event_type="checkout.PaymentCaptured",
                 producer="payment", causation_id="e2", at_ms=T0 + 999, attempt=2)
    assert again is state


@pytest.mark.parametrize("order", list(itertools.islice(itertools.permutations(range(8)), 0, 40320, 997)))
def test_folding_out_of_order_gives_the_same_story(order: tuple[int, ...]) -> None:
    # Events of one saga travel on several topics, so the tracker may see them in any order.
    expected, state = run(NO_CARRIER), run(NO_CARRIER, list(order))
    assert state["status"] == expected["status"] and statuses(state) == statuses(expected)
    assert state["started_at"] == T0 and not state["late"]


def test_deadline_then_timeout() -> None:
    state = run(NO_CARRIER[:4])
    assert next_deadline(state, checkout) == T0 + int(checkout.deadline.total_seconds() * 1000)
    state = fold(state, checkout, INDEX, saga_id="o1", event_id="t", event_type=SagaTimedOut.event_type(),
                 producer="checkout-tracker", causation_id=None, at_ms=T0 + 40_000, attempt=1)
    assert state["status"] == "timed_out" and next_deadline(state, checkout) is None


def test_an_event_after_the_end_is_late() -> None:
    state = run(HAPPY)
    state = fold(state, checkout, INDEX, saga_id="o1", event_id="x", event_type="checkout.PaymentRefunded",
                 producer="payment", causation_id="e5", at_ms=T0 + 500, attempt=1)
    assert state["late"] == ["x"] and state["status"] == "completed"


def test_verify_accepts_what_the_graph_declares() -> None:
    assert verify(run(HAPPY), GRAPH) == [] and verify(run(NO_CARRIER), GRAPH) == []


def test_verify_catches_a_misrouted_event() -> None:
    # Payment charged straight from OrderPlaced, skipping inventory: no declared edge does that.
    state = run([NO_CARRIER[0], ("m1", "checkout.PaymentCaptured", "payment", "e1")])
    [problem] = verify(state, GRAPH)
    assert "checkout.PaymentCaptured m1 from payment caused by checkout.OrderPlaced" in problem
    assert "not a declared edge" in problem


def test_verify_catches_an_event_before_its_prerequisite_and_an_unknown_cause() -> None:
    state = run(HAPPY[:2])
    state = fold(state, checkout, INDEX, saga_id="o1", event_id="e3", event_type="checkout.PaymentCaptured",
                 producer="payment", causation_id="e2", at_ms=T0 + 5, attempt=1)  # before e2 (T0 + 10)
    assert any("before its cause checkout.InventoryReserved e2" in p for p in verify(state, GRAPH))
    orphan = run([NO_CARRIER[0], ("z", "checkout.OrderConfirmed", "order", "nope")])
    assert any("its cause nope was never observed" in p for p in verify(orphan, GRAPH))


def test_a_compensation_that_gave_up_ends_the_saga_as_compensation_failed() -> None:
    from choreo import CompensationFailed

    state = run(NO_CARRIER[:6])  # refunded, release still to come
    state = fold(state, checkout, INDEX, saga_id="o1", event_id="cf", event_type=CompensationFailed.event_type(),
                 producer="inventory", causation_id="e6", at_ms=T0 + 100, attempt=1)
    assert state["status"] == "compensation_failed" and state["ended_at"] == T0 + 100
    assert next_deadline(state, checkout) is None, "reported, and not timed out on top"


class _LosesTheCancel:
    """A saga store whose ``due`` drops a cancel, as ``asyncio.wait_for`` does on Python 3.11 when the
    awaited result arrives together with the cancel (redis-py writes with it)."""

    def __init__(self) -> None:
        self.checking = asyncio.Event()

    async def due(self, now_ms: int, limit: int) -> list[str]:
        if not self.checking.is_set():  # the first check only: a timer that ignores its flag still ends
            self.checking.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass
        return []

    async def close(self) -> None:
        return None


async def test_the_deadline_timer_stops_even_when_a_check_loses_the_cancel() -> None:
    store = _LosesTheCancel()
    tracker = SagaTracker("tracker", services, [checkout], store=store, check_interval_s=0.01)  # type: ignore[arg-type]
    await tracker._start()
    await asyncio.wait_for(store.checking.wait(), 5)
    await asyncio.wait_for(tracker._stop(), 5)  # hung for good when only the cancel stopped the timer
    assert tracker._timer is None
