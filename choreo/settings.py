"""Validated settings for services and publishers, from code or from ``CHOREO_*`` environment variables.

=============================  ==========================================================
environment variable           setting
=============================  ==========================================================
``CHOREO_KAFKA``               ``kafka_bootstrap`` (``host:port[,host:port...]``)
``CHOREO_REDIS``               ``redis_url`` (``redis://`` or ``rediss://``)
``CHOREO_KAFKA_CONFIG``        ``kafka_config``: JSON object of librdkafka settings
``CHOREO_KAFKA_CONFIG_FILE``   a Java-style ``client.properties`` file (``key=value`` lines)
``CHOREO_<FIELD>``             any other field below, upper-cased (``CHOREO_BATCH_SIZE=200``)
=============================  ==========================================================

``kafka_config`` passes TLS and SASL settings (``security.protocol``, ``sasl.mechanism``,
``ssl.ca.location`` ...) straight to librdkafka, for producers, consumers and the admin client.
Settings choreo owns for correctness (``enable.idempotence``, ``acks``, ``enable.auto.offset.store``)
cannot be overridden there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from choreo.errors import ConfigurationError
from choreo.idempotency import DONE_TTL_MS

_PROTECTED_KAFKA_KEYS = frozenset(
    {"enable.idempotence", "acks", "enable.auto.offset.store", "group.id", "bootstrap.servers"}
)
_HOSTPORT = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$")


class Settings(BaseModel):
    """Connection and tuning settings. Invalid values raise ``ConfigurationError`` when built."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    kafka_config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    #: Prefix for every Redis key choreo writes, so several systems can share one Redis.
    redis_prefix: str = "choreo:"
    #: Prefix for every topic name and consumer group id (e.g. ``staging.``), so several environments
    #: can share one cluster.
    topic_prefix: str = Field(default="", pattern=r"^[a-zA-Z0-9._-]*$", max_length=100)

    create_topics: bool = True
    topic_partitions: int = Field(default=4, ge=1, le=100_000)
    #: -1 leaves the replication factor to the broker's default.
    topic_replication: int = Field(default=-1, ge=-1, le=32)

    batch_size: int = Field(default=500, ge=1, le=100_000)
    #: Handler calls in flight at once in one service process, across all its partitions. Events of
    #: one key (with ``ordering="key"``) still run one after another.
    concurrency: int = Field(default=64, ge=1, le=10_000)
    #: The default order handlers keep: ``key`` (events of one record key in offset order, different
    #: keys concurrently), ``partition`` (one event at a time per partition) or ``unordered``.
    ordering: Literal["key", "partition", "unordered"] = "key"
    #: How long a batch waits for its slowest handler calls before it goes on without them: they
    #: finish in the background, holding back only their own chain (key), and their outcome is
    #: settled with a later batch. One slow call never stalls the other keys for longer than this.
    slow_handler_ms: int = Field(default=200, ge=1, le=3_600_000)
    #: Events a service holds in memory besides the batch in hand: those waiting behind an earlier
    #: event of their key (a retry, a claim held elsewhere). At the bound, the partitions holding
    #: them stop fetching until they drain below half of it.
    max_buffered: int = Field(default=10_000, ge=1, le=10_000_000)
    #: librdkafka's prefetch queue (``queued.max.messages.kbytes``): records fetched ahead of the
    #: batch in hand, so memory stays bounded whatever the backlog.
    fetch_buffer_kb: int = Field(default=16_384, ge=1, le=2_097_151)
    fetch_wait_ms: int = Field(default=10, ge=0, le=60_000)
    # Kafka's defaults are 45 s / 3 s; these make a group join take seconds, also on Tansu.
    session_timeout_ms: int = Field(default=6_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=500, ge=100)
    linger_ms: int = Field(default=5, ge=0, le=60_000)
    commit_interval_ms: int = Field(default=1_000, ge=10)
    #: How long an idempotency claim is held before another process may take over the event.
    #: Keep it above the longest handler run; a crashed process's events wait this long to be retried.
    claim_lease_ms: int = Field(default=30_000, ge=100)
    #: How long a finished event is remembered; longer than any retry or replay window.
    done_ttl_ms: int = Field(default=DONE_TTL_MS, ge=1_000)
    #: Upper bound of the pause before a failed event is tried again.
    max_backoff_ms: int = Field(default=30_000, ge=1)
    #: Retry topics per consumed topic (``<topic>.retry.1`` ...) for retry delays longer than a
    #: policy's ``in_process_max_s``; 0 waits every delay in place, pausing the partition.
    retry_tiers: int = Field(default=3, ge=0, le=9)
    #: Partitions of each retry topic. Retries are a trickle next to the main traffic, and every
    #: partition a consumer is assigned costs fetch work on the client and the broker.
    retry_topic_partitions: int = Field(default=1, ge=1, le=100_000)
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    #: Threads for handlers written as plain ``def`` (blocking I/O); async handlers never use them.
    handler_threads: int = Field(default=8, ge=1, le=1_024)
    #: Where ``choreo saga show`` links a saga's trace (Jaeger's UI).
    jaeger_url: str = "http://127.0.0.1:16686"
    #: ``text`` (readable) or ``json`` (one object per line, for log pipelines).
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Serve metrics for Prometheus on this port (``/metrics``); 0 serves none.
    metrics_port: int = Field(default=0, ge=0, le=65_535)

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts or not all(_HOSTPORT.match(p) for p in parts):
            raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return ",".join(parts)

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {value!r}")
        return value

    @field_validator("kafka_config")
    @classmethod
    def _kafka_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        protected = sorted(_PROTECTED_KAFKA_KEYS.intersection(value))
        if protected:
            raise ValueError(f"{', '.join(protected)} are managed by choreo and cannot be set here")
        return value

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc, "Settings")) from exc

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``CHOREO_*`` variables (see the module docstring); ``overrides`` win."""
        env = os.environ if env is None else env
        data: dict[str, Any] = {}
        if "CHOREO_KAFKA" in env:
            data["kafka_bootstrap"] = env["CHOREO_KAFKA"]
        if "CHOREO_REDIS" in env:
            data["redis_url"] = env["CHOREO_REDIS"]
        kafka_config: dict[str, Any] = {}
        if "CHOREO_KAFKA_CONFIG_FILE" in env:
            kafka_config.update(_read_properties(Path(env["CHOREO_KAFKA_CONFIG_FILE"])))
        if "CHOREO_KAFKA_CONFIG" in env:
            try:
                loaded = json.loads(env["CHOREO_KAFKA_CONFIG"])
            except json.JSONDecodeError as exc:
                raise ConfigurationError(f"CHOREO_KAFKA_CONFIG is not valid JSON: {exc}") from None
            if not isinstance(loaded, dict):
                raise ConfigurationError("CHOREO_KAFKA_CONFIG must be a JSON object")
            kafka_config.update(loaded)
        if kafka_config:
            data["kafka_config"] = kafka_config
        skip = {"kafka_bootstrap", "redis_url", "kafka_config"}
        for name in cls.model_fields:
            var = f"CHOREO_{name.upper()}"
            if name not in skip and var in env:
                data[name] = env[var]
        data.update(overrides)
        try:
            return cls(**data)
        except ConfigurationError as exc:
            if not isinstance(exc.__cause__, ValidationError):
                raise
            raise ConfigurationError(
                _describe(exc.__cause__, "settings from environment", env_names=True)
            ) from None


def _read_properties(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"CHOREO_KAFKA_CONFIG_FILE {path}: {exc.strerror}") from None
    result: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigurationError(f"{path}:{number}: expected key=value, got {line!r}")
        result[key.strip()] = value.strip()
    return result


def _describe(exc: ValidationError, where: str, *, env_names: bool = False) -> str:
    problems = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        if env_names and error["loc"]:
            field = str(error["loc"][0])
            name = {"kafka_bootstrap": "CHOREO_KAFKA", "redis_url": "CHOREO_REDIS"}.get(
                field, f"CHOREO_{field.upper()}"
            )
        problems.append(f"{name}: {error['msg']}")
    return f"invalid {where}: " + "; ".join(problems)
