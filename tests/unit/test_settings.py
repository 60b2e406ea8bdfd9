"""Settings: defaults, CHOREO_* environment variables, and errors that name what to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest

from choreo import ConfigurationError, Settings


def test_defaults_point_at_a_local_broker_and_redis() -> None:
    defaults = Settings()
    assert defaults.kafka_bootstrap == "127.0.0.1:9092"
    assert defaults.redis_url == "redis://127.0.0.1:6379/0"
    assert defaults.kafka_config == {}
    assert defaults.redis_prefix == "choreo:"
    assert defaults.topic_prefix == ""
    assert defaults.batch_size == 500
    assert defaults.create_topics is True


def test_from_env_with_no_variables_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOREO_BATCH_SIZE", "7")
    assert Settings.from_env().batch_size == 7


def test_from_env_reads_broker_and_redis_addresses() -> None:
    loaded = Settings.from_env({"CHOREO_KAFKA": "k1:9092, k2:9093", "CHOREO_REDIS": "rediss://r:6380/2"})
    assert loaded.kafka_bootstrap == "k1:9092,k2:9093"
    assert loaded.redis_url == "rediss://r:6380/2"


def test_from_env_reads_any_field_by_its_upper_case_name() -> None:
    loaded = Settings.from_env({
        "CHOREO_BATCH_SIZE": "200",
        "CHOREO_TOPIC_PREFIX": "staging.",
        "CHOREO_CREATE_TOPICS": "false",
        "CHOREO_SHUTDOWN_TIMEOUT_S": "2.5",
    })
    assert loaded.batch_size == 200
    assert loaded.topic_prefix == "staging."
    assert loaded.create_topics is False
    assert loaded.shutdown_timeout_s == 2.5


def test_from_env_ignores_unrelated_variables() -> None:
    assert Settings.from_env({"CHOREO_BROKER": "tansu", "HOME": "/root"}) == Settings()


def test_overrides_win_over_the_environment() -> None:
    loaded = Settings.from_env({"CHOREO_BATCH_SIZE": "200"}, batch_size=3)
    assert loaded.batch_size == 3


def test_kafka_config_from_json() -> None:
    loaded = Settings.from_env({"CHOREO_KAFKA_CONFIG": json.dumps(
        {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "socket.keepalive.enable": True}
    )})
    assert loaded.kafka_config == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "socket.keepalive.enable": True,
    }


def test_kafka_config_from_a_properties_file(tmp_path: Path) -> None:
    properties = tmp_path / "client.properties"
    properties.write_text(
        "# Confluent Cloud client settings\n"
        "\n"
        "security.protocol=SASL_SSL\n"
        "! another comment style\n"
        "  sasl.mechanism = PLAIN  \n"
        "sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required password='a=b';\n"
    )
    loaded = Settings.from_env({"CHOREO_KAFKA_CONFIG_FILE": str(properties)})
    assert loaded.kafka_config == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.jaas.config": "org.apache.kafka.common.security.plain.PlainLoginModule required password='a=b';",
    }


def test_json_kafka_config_wins_over_the_properties_file(tmp_path: Path) -> None:
    properties = tmp_path / "client.properties"
    properties.write_text("security.protocol=SSL\nssl.ca.location=/etc/ca.pem\n")
    loaded = Settings.from_env({
        "CHOREO_KAFKA_CONFIG_FILE": str(properties),
        "CHOREO_KAFKA_CONFIG": '{"security.protocol": "SASL_SSL"}',
    })
    assert loaded.kafka_config == {"security.protocol": "SASL_SSL", "ssl.ca.location": "/etc/ca.pem"}


def test_settings_are_frozen() -> None:
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        Settings().batch_size = 1  # assigning to a frozen model is the point


# --- errors --------------------------------------------------------------------------------------


BAD_VALUES = [
    ({"CHOREO_BATCH_SIZE": "abc"}, "CHOREO_BATCH_SIZE"),
    ({"CHOREO_BATCH_SIZE": "0"}, "CHOREO_BATCH_SIZE"),
    ({"CHOREO_KAFKA": "nonsense"}, "CHOREO_KAFKA"),
    ({"CHOREO_KAFKA": ""}, "CHOREO_KAFKA"),
    ({"CHOREO_REDIS": "http://localhost:6379"}, "CHOREO_REDIS"),
    ({"CHOREO_TOPIC_PREFIX": "bad prefix/"}, "CHOREO_TOPIC_PREFIX"),
    ({"CHOREO_CREATE_TOPICS": "maybe"}, "CHOREO_CREATE_TOPICS"),
    ({"CHOREO_KAFKA_CONFIG": '{"socket": {"nested": 1}}'}, "CHOREO_KAFKA_CONFIG"),
    ({"CHOREO_KAFKA_CONFIG": '{"enable.idempotence": false}'}, "CHOREO_KAFKA_CONFIG"),
]


@pytest.mark.parametrize(("env", "named"), BAD_VALUES)
def test_a_bad_value_from_the_environment_is_a_configuration_error(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigurationError):
        Settings.from_env(env)


@pytest.mark.parametrize(("env", "named"), BAD_VALUES)
def test_a_bad_value_from_the_environment_names_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{named}:"):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CHOREO_KAFKA_CONFIG": "{not json"}, "CHOREO_KAFKA_CONFIG"),
        ({"CHOREO_KAFKA_CONFIG": "[1, 2]"}, "CHOREO_KAFKA_CONFIG"),
        ({"CHOREO_KAFKA_CONFIG_FILE": "/nonexistent/client.properties"}, "CHOREO_KAFKA_CONFIG_FILE"),
    ],
)
def test_an_unreadable_kafka_config_names_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        Settings.from_env(env)


@pytest.mark.parametrize("key", ["enable.idempotence", "acks", "enable.auto.offset.store", "group.id",
                                 "bootstrap.servers"])
def test_kafka_config_may_not_override_keys_choreo_owns(key: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{key} are managed by choreo"):
        Settings.from_env({"CHOREO_KAFKA_CONFIG": json.dumps({key: "x"})})


def test_a_protected_key_in_the_properties_file_is_rejected(tmp_path: Path) -> None:
    properties = tmp_path / "client.properties"
    properties.write_text("acks=1\n")
    with pytest.raises(ConfigurationError, match="acks"):
        Settings.from_env({"CHOREO_KAFKA_CONFIG_FILE": str(properties)})


def test_a_properties_line_without_equals_names_file_and_line(tmp_path: Path) -> None:
    properties = tmp_path / "client.properties"
    properties.write_text("security.protocol=SSL\n# fine\nnot a setting\n")
    with pytest.raises(ConfigurationError, match=rf"{properties}:3"):
        Settings.from_env({"CHOREO_KAFKA_CONFIG_FILE": str(properties)})


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"CHOREO_BATCH_SIZE": "abc", "CHOREO_REDIS": "nope"})
    assert "batch_size" in str(info.value).lower()
    assert "redis" in str(info.value).lower()


def test_bad_values_in_code_are_configuration_errors_naming_the_field() -> None:
    with pytest.raises(ConfigurationError, match="batch_size"):
        Settings(batch_size=0)
    with pytest.raises(ConfigurationError, match="enable.idempotence"):
        Settings(kafka_config={"enable.idempotence": False})


def test_an_unknown_setting_in_code_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="batchsize"):
        Settings(batchsize=5)
