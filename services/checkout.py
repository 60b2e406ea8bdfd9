"""The checkout saga and the services that carry it, for ``choreo graph`` and the saga tracker.

An order's id is its saga id: place orders with ``correlation_id=order_id`` so that every event of
its checkout, and the tracker's ``SagaTimedOut``, carries it.

    choreo graph check services.checkout:system
    choreo run services.checkout:tracker
"""

from __future__ import annotations

import os
from datetime import timedelta

from choreo import Saga, SagaTracker
from services import inventory, notification, order, payment, shipping
from services.events import CustomerNotified, OrderCancelled, OrderPlaced

checkout = Saga(
    "checkout",
    starts_with=OrderPlaced,
    completes_on=[CustomerNotified],
    fails_on=[OrderCancelled],
    deadline=timedelta(seconds=float(os.environ.get("CHECKOUT_SAGA_DEADLINE_S", "30"))),
    description="place -> reserve stock -> charge -> confirm -> ship -> notify; compensate in reverse",
)

services = [order.service, inventory.service, payment.service, shipping.service, notification.service]
system = [*services, checkout]

#: ``choreo run services.checkout:tracker``: follows every checkout saga, times out stuck ones.
tracker = SagaTracker("checkout-tracker", services, [checkout]).service
