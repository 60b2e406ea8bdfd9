"""compose/ cannot run here (no Docker engine), so check what can be checked: the file parses, every
service command names a real choreo service, and every variable is one the code reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from choreo import Service, Settings
from choreo.cli._load import load
from services._redis import CheckoutConfig

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
CHECKOUT = {name: svc for name, svc in SERVICES.items() if svc.get("command", [None])[0] == "choreo"}


def test_the_file_has_the_infrastructure_and_every_checkout_process() -> None:
    assert {"kafka", "redis", "jaeger"} <= set(SERVICES)
    assert set(CHECKOUT) == {"order", "inventory", "payment", "shipping", "notification", "checkout-tracker"}


@pytest.mark.parametrize("name", sorted(CHECKOUT))
def test_every_command_runs_a_real_service(name: str) -> None:
    command = CHECKOUT[name]["command"]
    assert command[:2] == ["choreo", "run"]
    assert isinstance(load(command[2], "service"), Service)


@pytest.mark.parametrize("name", sorted(CHECKOUT))
def test_every_variable_is_one_the_code_reads(name: str) -> None:
    env = {k: str(v) for k, v in CHECKOUT[name]["environment"].items()}
    choreo = {k: v for k, v in env.items() if k.startswith("CHOREO_")}
    settings = Settings.from_env(choreo)  # raises on a bad value
    assert settings.kafka_bootstrap == "kafka:19092"
    known = {"CHOREO_KAFKA", "CHOREO_REDIS", "CHOREO_KAFKA_CONFIG", "CHOREO_KAFKA_CONFIG_FILE"} | {
        f"CHOREO_{f.upper()}" for f in Settings.model_fields
    }
    assert set(choreo) <= known
    checkout = {k for k in env if k.startswith("CHECKOUT_")}
    assert checkout <= {f"CHECKOUT_{f.upper()}" for f in CheckoutConfig.model_fields} | {"CHECKOUT_SAGA_DEADLINE_S"}
    assert {k for k in env if not k.startswith(("CHOREO_", "CHECKOUT_"))} <= {
        "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SERVICE_NAME"
    }
    assert env["OTEL_SERVICE_NAME"] == name


def test_the_dockerfile_copies_what_exists() -> None:
    for line in (ROOT / "compose" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
