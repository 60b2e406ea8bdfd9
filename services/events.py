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


class InventoryRejected(Event, schema=SCHEMAS / "inventory_rejected.v1.avsc"):
    order_id: str
    sku: str
    reason: str


class CustomerNotified(Event, schema=SCHEMAS / "customer_notified.v1.avsc"):
    order_id: str
    customer_id: str
    outcome: str
