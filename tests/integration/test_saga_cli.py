"""``choreo saga list | show | verify`` read what the tracker stored in a real Redis."""

from __future__ import annotations

import pytest

from choreo import FlowGraph, Settings
from choreo.stores.redis import RedisSagaStore
from choreo.tracker import _Index, fold
from services.checkout import checkout, services
from tests.conftest import service_env
from tests.integration.test_cli import choreo

pytestmark = pytest.mark.redis

INDEX = _Index(FlowGraph.build(services, [checkout]), [checkout])
HAPPY = [
    ("e1", "checkout.OrderPlaced", "web", None),
    ("e2", "checkout.InventoryReserved", "inventory", "e1"),
    ("e3", "checkout.PaymentCaptured", "payment", "e2"),
    ("e4", "checkout.OrderConfirmed", "order", "e3"),
    ("e5", "checkout.ShipmentScheduled", "shipping", "e4"),
    ("e6", "checkout.CustomerNotified", "notification", "e5"),
]


async def _store_saga(store: RedisSagaStore, saga_id: str, events: list[tuple[str, str, str, str | None]],
                      t0: int) -> None:
    for i, (event_id, event_type, producer, cause) in enumerate(events):
        await store.update(saga_id, lambda state, i=i, e=event_id, t=event_type, p=producer, c=cause: fold(
            state, checkout, INDEX, saga_id=saga_id, event_id=f"{saga_id}-{e}", event_type=t, producer=p,
            causation_id=f"{saga_id}-{c}" if c else None, at_ms=t0 + 15 * i, attempt=1))


@pytest.fixture
async def stored(settings: Settings) -> Settings:
    store = RedisSagaStore(settings.redis_url, prefix=settings.redis_prefix)
    await _store_saga(store, "o-happy", HAPPY, 1_700_000_000_000)
    await _store_saga(store, "o-running", HAPPY[:3], 1_700_000_100_000)
    # Misrouted: payment charged straight from OrderPlaced.
    await _store_saga(store, "o-bad", [HAPPY[0], ("x", "checkout.PaymentCaptured", "payment", "e1")],
                      1_700_000_200_000)
    await store.close()
    return settings


def test_list_filters_by_status_and_age(stored: Settings) -> None:
    env = service_env(stored)
    out = choreo("saga", "list", env=env).stdout
    assert "o-happy" in out and "o-running" in out and "3 saga(s)" in out
    out = choreo("saga", "list", "--status", "completed", env=env).stdout
    assert "o-happy" in out and "o-running" not in out and "1 saga(s)" in out
    assert "0 saga(s)" in choreo("saga", "list", "--older-than", "100000d", env=env).stdout
    bad = choreo("saga", "list", "--older-than", "soon", env=env)
    assert bad.returncode == 1 and "--older-than 'soon'" in bad.stderr


def test_show_prints_a_timeline_of_steps_and_events(stored: Settings) -> None:
    result = choreo("saga", "show", "o-happy", env=service_env(stored))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "saga o-happy (checkout): completed" in out
    assert "completed    payment.charge" in out and "+15 ms" in out
    assert "skipped      payment.refund" in out
    assert "checkout.CustomerNotified" in out and "+    75 ms" in out
    missing = choreo("saga", "show", "nope", env=service_env(stored))
    assert missing.returncode == 1 and "no saga 'nope'" in missing.stdout


def test_verify_reports_the_misrouted_saga_only(stored: Settings) -> None:
    result = choreo("saga", "verify", "services.checkout:system", env=service_env(stored))
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if line.startswith("saga ")]
    assert len(lines) == 1 and lines[0].startswith("saga o-bad:") and "not a declared edge" in lines[0]
    assert "verified 3 saga(s): 1 departed from the graph" in result.stdout
    assert choreo("saga", "verify", "services.checkout:system", "o-happy", env=service_env(stored)).returncode == 0
