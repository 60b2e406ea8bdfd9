"""The command line: ``choreo schema check`` against git, ``choreo publish`` with validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from choreo import Settings
from services.events import OrderPlaced
from tests.conftest import service_env
from tests.integration.helpers import ROOT, Sink

SCHEMA = {
    "type": "record", "name": "Parcel", "namespace": "ship", "version": 1,
    "fields": [{"name": "parcel_id", "type": "string"}, {"name": "grams", "type": "int"}],
}


def choreo(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "choreo.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=repo,
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "schemas" / "ship").mkdir(parents=True)
    (tmp_path / "schemas" / "ship" / "parcel.v1.avsc").write_text(json.dumps(SCHEMA))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "v1")
    return tmp_path


def _change(repo: Path, fields: list[dict[str, object]]) -> None:
    (repo / "schemas" / "ship" / "parcel.v1.avsc").write_text(json.dumps({**SCHEMA, "fields": fields}))


def test_schema_check_passes_a_compatible_change(repo: Path) -> None:
    _change(repo, [*SCHEMA["fields"], {"name": "fragile", "type": "boolean", "default": False}])  # type: ignore[list-item]
    result = choreo("schema", "check", cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "schema check passed" in result.stdout


def test_schema_check_fails_an_incompatible_change_naming_file_and_field(repo: Path) -> None:
    _change(repo, [*SCHEMA["fields"], {"name": "fragile", "type": "boolean"}])  # type: ignore[list-item]
    result = choreo("schema", "check", cwd=repo)
    assert result.returncode == 1
    assert "parcel.v1.avsc" in result.stdout and "fragile" in result.stdout


def test_schema_check_fails_a_changed_type(repo: Path) -> None:
    _change(repo, [{"name": "parcel_id", "type": "string"}, {"name": "grams", "type": "string"}])
    result = choreo("schema", "check", cwd=repo)
    assert result.returncode == 1 and "grams" in result.stdout


def test_schema_check_of_this_repository_and_its_models_passes() -> None:
    result = choreo("schema", "check", "--models", "services.events")
    assert result.returncode == 0, result.stdout + result.stderr


def test_publish_rejects_fields_that_fail_the_model() -> None:
    result = choreo("publish", "services.events:OrderPlaced", '{"order_id": "o1", "quantity": "many"}')
    assert result.returncode == 1
    assert "OrderPlaced fields are invalid" in result.stderr and "quantity" in result.stderr
    assert "customer_id" in result.stderr  # missing fields are named too


@pytest.mark.kafka
@pytest.mark.redis
@pytest.mark.timeout(60)
async def test_publish_sends_one_validated_event(settings: Settings) -> None:
    fields = {"order_id": "cli-1", "customer_id": "c", "sku": "widget", "quantity": 1, "amount_cents": 5}
    result = choreo("publish", "services.events:OrderPlaced", json.dumps(fields), "--event-id", "evt-cli-1",
                    env=service_env(settings))
    assert result.returncode == 0, result.stderr
    assert "published checkout.OrderPlaced evt-cli-1" in result.stdout
    async with Sink(settings, OrderPlaced) as sink:
        assert await sink.wait_for(1, 30) == {"cli-1": 1}


def test_log_format_json_makes_every_log_line_a_json_object() -> None:
    # Nothing listens on port 1: the service logs that it stopped, then the CLI reports the error.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHOREO_")}
    env.update(CHOREO_KAFKA="127.0.0.1:1", CHOREO_REDIS="redis://127.0.0.1:1/0", CHOREO_LOG_FORMAT="json",
               CHOREO_LOG_LEVEL="ERROR")
    result = choreo("--log-level", "info", "run", "services.inventory:service", env=env)
    assert result.returncode == 1
    *lines, error = result.stderr.splitlines()
    assert error.startswith("choreo: error: cannot reach")  # errors stay plain text
    records = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    # --log-level INFO wins over CHOREO_LOG_LEVEL=ERROR
    assert {"level": "INFO", "logger": "choreo.service.inventory", "message": "service inventory stopped"}.items() \
        <= records[-1].items()
