"""The application the Celery test workers load: copied next to them and imported by the CLI.

`build()` registers the same tasks (explicit names) on a bridge; the test process calls it with
its own settings to dispatch, the worker gets `bridge`, built from TASKBRIDGE_* variables. Tasks
write what they saw into Redis (TBTEST_REDIS_URL, keys under TBTEST_PREFIX) for the tests to read.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis

from taskbridge import TaskBridge, current_task, report_progress

_local = threading.local()


def _store() -> redis.Redis:
    client: redis.Redis | None = getattr(_local, "client", None)
    if client is None:
        client = _local.client = redis.Redis.from_url(os.environ["TBTEST_REDIS_URL"])
    return client


def _key(name: str) -> str:
    return os.environ["TBTEST_PREFIX"] + name


def _record(key: str, **seen: Any) -> dict[str, Any]:
    context = current_task()
    assert context is not None
    entry = {
        "pid": os.getpid(),
        "id": context.id,
        "attempt": context.attempt,
        "at": time.time(),
        **seen,
    }
    _store().rpush(_key(key), json.dumps(entry))
    return entry


GATE_TIMEOUT = 20.0
"""Seconds a gated task waits for its gate before failing (so a failed test leaves no task
blocking a worker for long)."""


def _gate_open(gate: str) -> bool:
    return bool(_store().exists(_key(gate)))


def _wait_gate(gate: str) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT
    while not _gate_open(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(0.01)


async def _await_gate(gate: str) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT
    while not _gate_open(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        await asyncio.sleep(0.01)


def build(settings: Mapping[str, Any] | None = None, routed_queue: str | None = None) -> TaskBridge:
    """A bridge with every test task registered (all routed to the `celery` alias)."""
    bridge = TaskBridge(settings)
    routed_queue = routed_queue or os.environ.get("TBTEST_ROUTED_QUEUE")

    @bridge.task(name="tb.record", backend="celery")
    def record(key: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        entry = _record(key, args=list(args), kwargs=kwargs)
        return {"pid": entry["pid"], "args": list(args), "kwargs": kwargs}

    @bridge.task(name="tb.arecord", backend="celery")
    async def arecord(key: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        await asyncio.sleep(0)
        entry = _record(key, args=list(args), kwargs=kwargs, loop=id(asyncio.get_running_loop()))
        return {"pid": entry["pid"], "args": list(args), "kwargs": kwargs}

    @bridge.task(name="tb.fail", backend="celery")
    def fail(message: str) -> None:
        raise ValueError(message)

    @bridge.task(name="tb.afail", backend="celery")
    async def afail(message: str) -> None:
        await asyncio.sleep(0)
        raise KeyError(message)

    @bridge.task(
        name="tb.flaky", backend="celery", retries=3, retry_backoff=0.05, retry_jitter=False
    )
    def flaky(key: str, failures: int) -> int:
        attempt = len(_store().lrange(_key(key), 0, -1)) + 1
        _record(key)
        if attempt <= failures:
            raise RuntimeError(f"attempt {attempt} fails")
        return attempt

    @bridge.task(name="tb.once", backend="celery")
    def once(key: str, failures: int) -> int:
        """Like flaky, but with no retries of its own: the dispatcher's `.using()` adds them."""
        return flaky.func(key, failures)

    @bridge.task(name="tb.slow", backend="celery", timeout=0.3)
    async def slow(key: str, seconds: float) -> None:
        _record(key, phase="started")
        await asyncio.sleep(seconds)
        _record(key, phase="finished")

    @bridge.task(name="tb.sync_slow", backend="celery", timeout=0.5)
    def sync_slow(key: str, seconds: float) -> None:
        _record(key, phase="started")
        time.sleep(seconds)
        _record(key, phase="finished")

    @bridge.task(name="tb.not_json", backend="celery")
    def not_json() -> object:
        return {1, 2}

    @bridge.task(name="tb.routed", backend="celery", queue=routed_queue)
    def routed(key: str) -> str:
        _record(key)
        return "routed"

    @bridge.task(name="tb.gated", backend="celery")
    def gated(
        key: str, gate: str, fraction: float = 0.4, message: str = "loading"
    ) -> dict[str, Any]:
        """Reports progress, then waits until the test sets the Redis key `gate`."""
        report_progress(fraction, message)
        _record(key, phase="started")
        try:
            _wait_gate(gate)
        finally:
            _record(key, phase="cleanup")
        _record(key, phase="finished")
        return {"key": key, "pid": os.getpid()}

    @bridge.task(name="tb.agated", backend="celery")
    async def agated(
        key: str, gate: str, fraction: float = 0.6, message: str = "rendering"
    ) -> dict[str, Any]:
        """`tb.gated` as an async def task."""
        report_progress(fraction, message)
        _record(key, phase="started")
        try:
            await _await_gate(gate)
        finally:
            _record(key, phase="cleanup")
        _record(key, phase="finished")
        return {"key": key, "pid": os.getpid()}

    @bridge.task(name="tb.steps", backend="celery")
    def steps(key: str, first: str, second: str) -> str:
        """Waits for the gate `first`, reports progress, waits for `second`: a call whose
        changes the test can tell apart."""
        _wait_gate(first)
        report_progress(0.5, "halfway")
        _wait_gate(second)
        return key

    return bridge


bridge = build()
