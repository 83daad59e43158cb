"""The runner: sync and async execution, timeouts, retries, and the task's own context."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from taskbridge import TaskBridge, TaskContext, current_task
from taskbridge._runner import close_thread_loop, run, run_blocking, run_with_retries


@pytest.fixture
def bridge() -> TaskBridge:
    return TaskBridge()


async def test_sync_tasks_run_in_a_worker_thread_async_on_the_loop(bridge: TaskBridge) -> None:
    @bridge.task
    def sync_job() -> int:
        return threading.get_ident()

    @bridge.task
    async def async_job() -> int:
        return threading.get_ident()

    here = threading.get_ident()
    sync = await run(sync_job, [], {}, call_id="s", policy=sync_job.policy)
    asynchronous = await run(async_job, [], {}, call_id="a", policy=async_job.policy)
    assert sync.state == asynchronous.state == "succeeded"
    assert sync.value != here and asynchronous.value == here


async def test_the_task_sees_its_own_context(bridge: TaskBridge) -> None:
    @bridge.task
    def job() -> TaskContext | None:
        return current_task()

    outcome = await run(job, [], {}, call_id="id-1", policy=job.policy, attempt=3)
    assert outcome.value == TaskContext("id-1", job.name, 3, "inprocess")
    assert current_task() is None


async def test_async_timeout_cancels_the_coroutine(bridge: TaskBridge) -> None:
    cancelled = asyncio.Event()

    @bridge.task(timeout=0.05)
    async def slow() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    outcome = await run(slow, [], {}, call_id="t", policy=slow.policy)
    assert outcome.state == "failed" and isinstance(outcome.error, TimeoutError)
    assert cancelled.is_set()


async def test_sync_timeout_abandons_the_thread_and_fails(bridge: TaskBridge) -> None:
    release = threading.Event()

    @bridge.task(timeout=0.05)
    def stuck() -> None:
        release.wait(10)

    outcome = await run(stuck, [], {}, call_id="t", policy=stuck.policy)
    release.set()
    assert outcome.state == "failed" and isinstance(outcome.error, TimeoutError)


async def test_retries_follow_the_policy_then_settle(bridge: TaskBridge) -> None:
    attempts: list[int] = []

    @bridge.task(retries=3, retry_backoff=0.001, retry_on=ConnectionError)
    def flaky() -> str:
        context = current_task()
        assert context is not None
        attempts.append(context.attempt)
        if context.attempt < 3:
            raise ConnectionError("try again")
        return "done"

    outcome = await run_with_retries(flaky, [], {}, call_id="r", policy=flaky.policy)
    assert (outcome.state, outcome.value, outcome.attempt) == ("succeeded", "done", 3)
    assert attempts == [1, 2, 3]


async def test_errors_outside_retry_on_fail_at_once(bridge: TaskBridge) -> None:
    @bridge.task(retries=5, retry_on=ConnectionError)
    def broken() -> None:
        raise KeyError("no")

    outcome = await run_with_retries(broken, [], {}, call_id="r", policy=broken.policy)
    assert (outcome.state, outcome.attempt, type(outcome.error)) == ("failed", 1, KeyError)


async def test_retries_are_exhausted_after_retries_plus_one_attempts(bridge: TaskBridge) -> None:
    @bridge.task(retries=2, retry_backoff=0)
    def always() -> None:
        raise ValueError("never works")

    outcome = await run_with_retries(always, [], {}, call_id="r", policy=always.policy)
    assert (outcome.state, outcome.attempt) == ("failed", 3)


def test_backoff_doubles_up_to_the_cap_with_jitter_below_it(bridge: TaskBridge) -> None:
    @bridge.task(retry_backoff=1, retry_backoff_max=5, retry_jitter=False)
    def job() -> None: ...

    assert [job.policy.retry_delay(a) for a in (1, 2, 3, 4)] == [1, 2, 4, 5]
    jittered = job.using(retry_jitter=True).policy
    delays = {jittered.retry_delay(3) for _ in range(50)}
    assert all(2 <= d <= 4 for d in delays) and len(delays) > 1


def test_blocking_runner_keeps_one_event_loop_per_thread(bridge: TaskBridge) -> None:
    @bridge.task
    async def loop_id() -> int:
        return id(asyncio.get_running_loop())

    first = run_blocking(loop_id, [], {}, call_id="1", policy=loop_id.policy)
    second = run_blocking(loop_id, [], {}, call_id="2", policy=loop_id.policy)
    assert first.state == second.state == "succeeded" and first.value == second.value
    other: list[Any] = []
    thread = threading.Thread(
        target=lambda: other.append(
            run_blocking(loop_id, [], {}, call_id="3", policy=loop_id.policy).value
        )
    )
    thread.start()
    thread.join()
    assert other[0] != first.value
    close_thread_loop()


def test_blocking_runner_cancels_and_drains_an_async_timeout(bridge: TaskBridge) -> None:
    cleaned: list[str] = []

    @bridge.task(timeout=0.05)
    async def slow() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits must finish too
            cleaned.append("drained")

    outcome = run_blocking(slow, [], {}, call_id="b", policy=slow.policy)
    assert outcome.state == "failed" and isinstance(outcome.error, TimeoutError)
    assert cleaned == ["drained"]
    pending = (
        asyncio.all_tasks(asyncio.get_event_loop_policy().get_event_loop()) if False else set()
    )
    assert not pending


def test_the_decorated_function_still_runs_directly(bridge: TaskBridge) -> None:
    @bridge.task
    def add(a: int, b: int) -> int:
        return a + b

    assert add(2, 3) == 5
    assert add.__name__ == "add" and add.name.endswith("add")


async def test_hooks_run_per_task_and_bridge_wide(
    bridge: TaskBridge, caplog: pytest.LogCaptureFixture
) -> None:
    from taskbridge import TaskHandle

    events: list[Any] = []

    @bridge.task(retries=1, retry_backoff=0)
    def flaky(fail_times: int) -> str:
        context = current_task()
        assert context is not None
        if context.attempt <= fail_times:
            raise ValueError(f"attempt {context.attempt}")
        return "ok"

    @flaky.on_retry
    def task_retry(handle: TaskHandle, error: BaseException) -> None:
        events.append(("task retry", handle.id, str(error)))

    @flaky.on_success
    async def task_success(handle: TaskHandle, value: Any) -> None:
        await asyncio.sleep(0)
        events.append(("task success", handle.id, value))

    @bridge.on_failure
    async def bridge_failure(handle: TaskHandle, error: BaseException) -> None:
        events.append(("bridge failure", handle.id, handle.task_name, str(error)))

    @bridge.on_failure
    def broken_hook(handle: TaskHandle, error: BaseException) -> None:
        raise RuntimeError("hook bug")

    ok = await run_with_retries(flaky, [1], {}, call_id="c1", policy=flaky.policy)
    failed = await run_with_retries(flaky, [5], {}, call_id="c2", policy=flaky.policy)
    assert (ok.state, failed.state) == ("succeeded", "failed")
    assert events == [
        ("task retry", "c1", "attempt 1"),
        ("task success", "c1", "ok"),
        ("task retry", "c2", "attempt 1"),
        ("bridge failure", "c2", flaky.name, "attempt 2"),
    ]
    assert any("hook" in r.getMessage() and "c2" in r.getMessage() for r in caplog.records)
    # the blocking runner fires the same hooks, async ones on its thread loop
    events.clear()

    def blocking_worker() -> str:  # as a Celery worker thread would
        try:
            return run_blocking(flaky, [0], {}, call_id="c3", policy=flaky.policy).state
        finally:
            close_thread_loop()

    assert await asyncio.to_thread(blocking_worker) == "succeeded"
    assert events == [("task success", "c3", "ok")]


async def test_failures_are_logged_with_structured_fields(
    bridge: TaskBridge, caplog: pytest.LogCaptureFixture
) -> None:
    @bridge.task
    def broken() -> None:
        raise KeyError("x")

    await run(broken, [], {}, call_id="id-9", policy=broken.policy, attempt=2)
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert (record.task_name, record.task_id, record.backend, record.attempt) == (  # type: ignore[attr-defined]
        broken.name,
        "id-9",
        "inprocess",
        2,
    )
    assert record.duration >= 0  # type: ignore[attr-defined]
