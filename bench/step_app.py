"""The choreo side of ``bench.step``: one service, one handler, one emitted event per input.

    choreo run bench.step_app:service   # settings from CHOREO_* (Settings.from_env() when it starts)

The events carry a saga id and a ~180-character string, so an Avro value is about 200 bytes.
``BENCH_STEP_MARK`` names a file the handler writes once, at its first call: the monotonic clock
and the process's CPU seconds, so the bench can start its clock and its CPU count at the first
event handled (the group join excluded), as the raw loops do at their first event received.
"""

from __future__ import annotations

import os
import resource
import time

from choreo import Context, Event, Service
from choreo.schemas import parse_schema

PAYLOAD_CHARS = 180


def _schema(name: str) -> dict[str, object]:
    return {"type": "record", "name": name, "namespace": "bench", "version": 1,
            "fields": [{"name": "saga_id", "type": "string"}, {"name": "payload", "type": "string"}]}


class StepRequested(Event, schema=parse_schema(_schema("StepRequested"))):
    saga_id: str
    payload: str


class StepDone(Event, schema=parse_schema(_schema("StepDone"))):
    saga_id: str
    payload: str


def cpu_seconds() -> float:
    """User + system CPU of this process, every thread included (librdkafka's too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# No settings here: Service reads Settings.from_env() when it starts, so importing this module for
# the event types (as bench.step does) needs no environment.
service = Service("step")

_mark_path: str | None = os.environ.get("BENCH_STEP_MARK") or None


@service.on(StepRequested, emits=[StepDone])
async def step(event: StepRequested, ctx: Context) -> None:
    global _mark_path
    if _mark_path is not None:
        path, _mark_path = _mark_path, None
        with open(path, "w") as f:
            f.write(f"{time.clock_gettime(time.CLOCK_MONOTONIC)!r} {cpu_seconds()!r}\n")
    ctx.emit(StepDone(saga_id=event.saga_id, payload=event.payload))
