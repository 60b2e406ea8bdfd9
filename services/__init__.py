"""The reference system: independent services of a checkout flow, each run as its own process."""
