"""The checkout flow's domain events, each bound to its Avro schema in ``schemas/checkout``."""

from __future__ import annotations

from pathlib import Path

from choreo import Event

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas" / "checkout"


class OrderPlaced(Event, schema=SCHEMAS / "order_placed.v1.avsc"):
    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount_cents: int


class InventoryReserved(Event, schema=SCHEMAS / "inventory_reserved.v1.avsc"):
    order_id: str
    sku: str
    quantity: int
    customer_id: str = ""
    amount_cents: int = 0


class InventoryRejected(Event, schema=SCHEMAS / "inventory_rejected.v1.avsc"):
    order_id: str
    sku: str
    reason: str
    customer_id: str = ""


class InventoryReleased(Event, schema=SCHEMAS / "inventory_released.v1.avsc"):
    order_id: str
    sku: str
    quantity: int
    customer_id: str


class PaymentCaptured(Event, schema=SCHEMAS / "payment_captured.v1.avsc"):
    order_id: str
    payment_id: str
    amount_cents: int
    customer_id: str


class PaymentDeclined(Event, schema=SCHEMAS / "payment_declined.v1.avsc"):
    order_id: str
    reason: str
    customer_id: str


class PaymentRefunded(Event, schema=SCHEMAS / "payment_refunded.v1.avsc"):
    order_id: str
    payment_id: str
    amount_cents: int
    customer_id: str


class OrderConfirmed(Event, schema=SCHEMAS / "order_confirmed.v1.avsc"):
    order_id: str
    customer_id: str
    amount_cents: int


class ShipmentScheduled(Event, schema=SCHEMAS / "shipment_scheduled.v1.avsc"):
    order_id: str
    shipment_id: str
    customer_id: str


class ShipmentCancelled(Event, schema=SCHEMAS / "shipment_cancelled.v1.avsc"):
    order_id: str
    customer_id: str
    shipment_id: str


class ShippingUnavailable(Event, schema=SCHEMAS / "shipping_unavailable.v1.avsc"):
    order_id: str
    reason: str
    customer_id: str


class OrderCancelled(Event, schema=SCHEMAS / "order_cancelled.v1.avsc"):
    order_id: str
    reason: str
    customer_id: str


class CustomerNotified(Event, schema=SCHEMAS / "customer_notified.v1.avsc"):
    order_id: str
    customer_id: str
    outcome: str
