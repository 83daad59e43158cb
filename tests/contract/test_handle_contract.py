"""One contract for every backend: result, status, progress, retries and cancellation.

The same scenarios run against the in-process backends and against Celery (Redis and RabbitMQ
brokers) and ARQ with real worker processes. Where an engine cannot do something, the test
states what the handle answers instead, as the README's table does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
import redis

from conftest import WorkerProcess
from taskbridge import TaskBridge, TaskCancelled, TaskFailed

APP = """
import asyncio
import os
import time

import redis
import redis.asyncio

from taskbridge import TaskBridge, current_task, report_progress

bridge = TaskBridge()
URL = os.environ["CONTRACT_RECORD_URL"]


def _client():
    return redis.Redis.from_url(URL)


@bridge.task
def add(a: int, b: int) -> int:
    return a + b


@bridge.task
async def add_async(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


@bridge.task
def boom(message: str) -> None:
    raise ValueError(message)


@bridge.task(retries=1, retry_backoff=0.01, retry_jitter=False)
def flaky(key: str) -> int:
    attempt = current_task().attempt
    with _client() as client:
        client.rpush(key, attempt)
    if attempt < 2:
        raise ConnectionError("first attempt fails")
    return attempt


@bridge.task
def progress_then_wait(key: str) -> str:
    report_progress(0.5, "half way")
    with _client() as client:
        deadline = time.monotonic() + 30
        while not client.exists(key) and time.monotonic() < deadline:
            time.sleep(0.01)
    return "done"


@bridge.task
async def async_progress_then_wait(key: str) -> str:
    report_progress(0.5, "half way")
    client = redis.asyncio.Redis.from_url(URL)
    try:
        deadline = time.monotonic() + 30
        while not await client.exists(key) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await client.aclose()
    return "done"


@bridge.task
def mark(key: str) -> None:
    with _client() as client:
        client.incr(key)


@bridge.task
async def run_until_cancelled(key: str) -> None:
    client = redis.asyncio.Redis.from_url(URL)
    try:
        await client.set(key + ":started", 1)
        await asyncio.sleep(60)
        await client.set(key + ":finished", 1)
    except asyncio.CancelledError:
        await client.set(key + ":cancelled", 1)
        raise
    finally:
        await client.aclose()
"""


@dataclass
class Harness:
    """The contract app, configured for one backend, and a client to the record Redis."""

    name: str
    module: ModuleType
    record: redis.Redis
    unique: Callable[[str], str]

    @property
    def bridge(self) -> TaskBridge:
        bridge: TaskBridge = self.module.bridge
        return bridge

    def task(self, name: str) -> Any:
        return getattr(self.module, name)


def _backend_env(name: str, redis_url: str, amqp_url: str | None, run_id: str) -> dict[str, str]:
    if name in ("inprocess", "immediate"):
        return {"TASKBRIDGE_DEFAULT_BACKEND": name}
    if name == "inprocess-shared":  # status shared through Redis (`status_url`)
        return {
            "TASKBRIDGE_DEFAULT_BACKEND": "inprocess",
            "TASKBRIDGE_BACKENDS__INPROCESS__STATUS_URL": redis_url,
            "TASKBRIDGE_BACKENDS__INPROCESS__STATUS_PREFIX": f"{run_id}-contract-shared",
        }
    if name == "arq":
        return {
            "TASKBRIDGE_DEFAULT_BACKEND": "arq",
            "TASKBRIDGE_BACKENDS__ARQ__REDIS_URL": redis_url,
            "TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME": f"{run_id}-contract-arq",
            "TASKBRIDGE_BACKENDS__ARQ__HEALTH_CHECK_KEY": f"{run_id}-contract-arq-health",
            # ARQ's job keys cannot carry the run id: let results and progress expire soon
            "TASKBRIDGE_BACKENDS__ARQ__KEEP_RESULT": "30",
            "TASKBRIDGE_BACKENDS__ARQ__JOB_TIMEOUT": "60",
        }
    broker = amqp_url if name == "celery-amqp" else redis_url
    return {
        "TASKBRIDGE_DEFAULT_BACKEND": "celery",
        "TASKBRIDGE_BACKENDS__CELERY__BROKER_URL": str(broker),
        "TASKBRIDGE_BACKENDS__CELERY__RESULT_BACKEND": redis_url,
        "TASKBRIDGE_BACKENDS__CELERY__DEFAULT_QUEUE": f"{run_id}-contract-{name}",
        "TASKBRIDGE_BACKENDS__CELERY__KEY_PREFIX": f"{run_id}-contract-{name}:",
    }


BACKENDS = ["inprocess", "inprocess-shared", "immediate", "celery-redis", "celery-amqp", "arq"]


@pytest.fixture(scope="module", params=BACKENDS)
def harness(
    request: pytest.FixtureRequest,
    redis_url: str,
    run_id: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Harness]:
    name: str = request.param
    amqp_url = request.getfixturevalue("amqp_url") if name == "celery-amqp" else None
    module_name = f"contract_app_{name.replace('-', '_')}"
    directory = tmp_path_factory.mktemp(module_name)
    (directory / f"{module_name}.py").write_text(APP)
    env = {"CONTRACT_RECORD_URL": redis_url, **_backend_env(name, redis_url, amqp_url, run_id)}
    saved = {key: sys.modules.get(key) for key in (module_name,)}
    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)
    spec = importlib.util.spec_from_file_location(module_name, directory / f"{module_name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    worker: WorkerProcess | None = None
    if name not in ("inprocess", "inprocess-shared", "immediate"):
        engine = "arq" if name == "arq" else "celery"
        extra = ["--pool", "threads", "--concurrency", "4"] if engine == "celery" else []
        worker = WorkerProcess(
            [
                sys.executable,
                "-m",
                "taskbridge.cli",
                "worker",
                engine,
                f"{module_name}:bridge",
                *extra,
            ],
            directory,
            {**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    record = redis.Redis.from_url(redis_url)

    def unique(suffix: str) -> str:
        return f"{run_id}-contract-{name}-{suffix}-{uuid.uuid4().hex[:8]}"

    try:
        yield Harness(name, module, record, unique)
    finally:
        if worker is not None:
            worker.stop()
        if amqp_url is not None:
            from kombu import Connection

            with Connection(amqp_url) as connection:
                channel = connection.channel()
                queue = env["TASKBRIDGE_BACKENDS__CELERY__DEFAULT_QUEUE"]
                channel.queue_delete(queue)
                channel.exchange_delete(queue)
        record.close()
        patch.undo()
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)


@pytest.fixture
async def h(harness: Harness) -> AsyncIterator[Harness]:
    """The harness with its bridge open on this test's event loop."""
    await harness.bridge.open()
    try:
        yield harness
    finally:
        await harness.bridge.close()


async def _until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def test_results_of_sync_and_async_tasks(h: Harness) -> None:
    for name in ("add", "add_async"):
        handle = await h.task(name).enqueue(2, 3)
        assert await handle.result(timeout=30) == 5, name
        info = await handle.info()
        assert (info.state, info.attempts, info.task_name) == ("succeeded", 1, h.task(name).name)
        assert info.finished_at is not None


async def test_a_failure_comes_back_typed(h: Harness) -> None:
    handle = await h.task("boom").enqueue("it broke")
    with pytest.raises(TaskFailed) as failure:
        await handle.result(timeout=30)
    assert failure.value.error_type.endswith("ValueError")
    assert failure.value.error_message == "it broke"
    assert await handle.status() == "failed"


async def test_retries_are_counted(h: Harness) -> None:
    key = h.unique("flaky")
    handle = await h.task("flaky").enqueue(key)
    assert await handle.result(timeout=30) == 2
    assert (await handle.info()).attempts == 2
    assert h.record.lrange(key, 0, -1) == [b"1", b"2"]


@pytest.mark.parametrize("task", ["progress_then_wait", "async_progress_then_wait"])
async def test_progress_is_visible_while_running(h: Harness, task: str) -> None:
    if h.name == "immediate":
        pytest.skip("immediate runs at dispatch: enqueue returns after the task has finished")
    key = h.unique("go")
    handle = await h.task(task).enqueue(key)
    progress = await _until(lambda: _progress(handle), 30, f"progress of {task} on {h.name}")
    assert progress == (0.5, "half way")
    assert await handle.status() == "running"
    h.record.set(key, 1)
    assert await handle.result(timeout=30) == "done"


async def _progress(handle: Any) -> tuple[float | None, str | None] | None:
    found = await handle.progress()
    return found if found[0] is not None else None


async def test_a_cancelled_queued_call_never_runs(h: Harness) -> None:
    key = h.unique("never")
    handle = await h.task("mark").using(delay=30).enqueue(key)
    answer = await handle.cancel()
    if h.name == "immediate":
        assert answer.cancelled is False and "already" in answer.detail
        return
    assert answer.cancelled is True, answer.detail
    await _until(lambda: _is(handle, "cancelled"), 30, "the cancelled state")
    with pytest.raises(TaskCancelled):
        await handle.result(timeout=5)
    # a later call on the same queue has run, so the cancelled one would have too
    later = await h.task("add").enqueue(1, 1)
    assert await later.result(timeout=30) == 2
    assert h.record.get(key) is None


async def _is(handle: Any, state: str) -> bool:
    return bool(await handle.status() == state)


async def test_cancelling_a_running_async_call(h: Harness) -> None:
    if h.name == "immediate":
        pytest.skip("immediate runs at dispatch: nothing is ever running to cancel")
    key = h.unique("running")
    handle = await h.task("run_until_cancelled").enqueue(key)
    await _until(lambda: h.record.exists(key + ":started"), 30, "the task to start")
    answer = await handle.cancel()
    if not answer.cancelled:
        # an engine that cannot stop a running call must say so, and the call goes on
        assert answer.detail and answer.state == "running", answer
        return
    await _until(lambda: h.record.exists(key + ":cancelled"), 30, "the task to be cancelled")
    await _until(lambda: _is(handle, "cancelled"), 30, "the cancelled state")
    assert not h.record.exists(key + ":finished")


async def test_an_unknown_id_is_unknown(h: Harness) -> None:
    handle = h.bridge.handle(str(uuid.uuid4()))
    assert await handle.status() == "unknown"
    assert (await handle.cancel()).cancelled is False
