"""OpenTelemetry: the request's trace travels with each call; the task's span joins it, in the
API process and in Celery and ARQ workers."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from conftest import WorkerProcess, wait_until

trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from taskbridge import TaskBridge  # noqa: E402

EXPORTER = InMemorySpanExporter()
_provider = sdk_trace.TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
TRACER = _provider.get_tracer("tests")


@pytest.fixture(autouse=True)
def tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    # the global provider can be set once per process; route the API's lookups to ours instead
    monkeypatch.setattr(trace, "get_tracer", _provider.get_tracer)
    EXPORTER.clear()


async def test_in_process_task_spans_join_the_dispatching_trace() -> None:
    bridge = TaskBridge({"backends": {"rec": {"engine": "recording"}}})

    @bridge.task
    async def job() -> None: ...

    @bridge.task(backend="rec")
    def queued() -> None: ...

    with TRACER.start_as_current_span("request") as request_span:
        await job.enqueue()
        await queued.enqueue()
    await bridge.close()
    [recorded] = bridge.backend("rec").calls  # type: ignore[attr-defined]
    assert recorded.trace and "traceparent" in recorded.trace
    spans = {s.name: s for s in EXPORTER.get_finished_spans()}
    task_span = spans[f"taskbridge {job.name}"]
    assert task_span.context.trace_id == request_span.get_span_context().trace_id
    assert task_span.parent is not None
    assert task_span.parent.span_id == request_span.get_span_context().span_id
    assert task_span.attributes["taskbridge.attempt"] == 1


async def test_no_trace_no_context_travels() -> None:
    bridge = TaskBridge({"backends": {"rec": {"engine": "recording"}}})

    @bridge.task(backend="rec")
    def queued() -> None: ...

    await queued.enqueue()
    assert bridge.backend("rec").calls[0].trace is None  # type: ignore[attr-defined]


APP = """
import os

import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from taskbridge import TaskBridge

trace.set_tracer_provider(TracerProvider())
bridge = TaskBridge()


@bridge.task
def traced(key: str) -> None:
    context = trace.get_current_span().get_span_context()
    with redis.Redis.from_url(os.environ["RECORD_URL"]) as client:
        client.set(key, format(context.trace_id, "032x"))
"""


@pytest.mark.parametrize("engine", ["celery", "arq"])
def test_worker_spans_join_the_request_trace(
    engine: str,
    tmp_path: Path,
    redis_url: str,
    unique_name: Callable[[str], str],
    spawn_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    (tmp_path / "traced_app.py").write_text(APP)
    env = {
        "RECORD_URL": redis_url,
        "TASKBRIDGE_DEFAULT_BACKEND": engine,
        "TASKBRIDGE_BACKENDS__CELERY__BROKER_URL": redis_url,
        "TASKBRIDGE_BACKENDS__CELERY__DEFAULT_QUEUE": unique_name("celery"),
        "TASKBRIDGE_BACKENDS__CELERY__KEY_PREFIX": unique_name("celery") + ":",
        "TASKBRIDGE_BACKENDS__ARQ__REDIS_URL": redis_url,
        "TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME": unique_name("arq"),
        "TASKBRIDGE_BACKENDS__ARQ__HEALTH_CHECK_KEY": unique_name("arq-health"),
        "TASKBRIDGE_BACKENDS__ARQ__KEEP_RESULT": "30",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("traced_app", tmp_path / "traced_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "traced_app", module)
    spec.loader.exec_module(module)
    spawn_worker(["worker", engine, "traced_app:bridge"], env=env)
    key = unique_name("trace-id")

    async def dispatch() -> str:
        await module.bridge.open()
        try:
            with TRACER.start_as_current_span("request") as request_span:
                await module.traced.enqueue(key)
        finally:
            await module.bridge.close()
        return format(request_span.get_span_context().trace_id, "032x")

    expected = asyncio.run(dispatch())
    record = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: record.get(key), 30, f"the task to run on the {engine} worker")
        assert record.get(key) == expected.encode()
    finally:
        record.delete(key)
        record.close()
