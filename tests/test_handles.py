"""Task handles on the built-in backends: status, result, progress, cancel, and the router."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from taskbridge import TaskBridge, TaskCancelled, TaskFailed, Tasks, report_progress


@pytest.fixture
def bridge() -> TaskBridge:
    return TaskBridge({"backends": {"rec": {"engine": "recording"}}})


async def test_status_result_and_progress_of_an_async_task(bridge: TaskBridge) -> None:
    step = asyncio.Event()
    go_on = asyncio.Event()

    @bridge.task
    async def render(pages: int) -> dict[str, int]:
        report_progress(0.5, "half way")
        step.set()
        await go_on.wait()
        return {"pages": pages}

    handle = await render.enqueue(3)
    await step.wait()
    assert await handle.status() == "running"
    assert await handle.progress() == (0.5, "half way")
    go_on.set()
    assert await handle.result(timeout=5) == {"pages": 3}
    info = await handle.info()
    assert (info.state, info.attempts, info.task_name, info.backend) == (
        "succeeded",
        1,
        render.name,
        "inprocess",
    )
    assert info.enqueued_at and info.started_at and info.finished_at
    assert info.enqueued_at <= info.started_at <= info.finished_at


async def test_a_failed_task_raises_its_error_type_and_message(bridge: TaskBridge) -> None:
    @bridge.task(backend="immediate", retries=1)
    def broken() -> None:
        raise LookupError("missing row")

    handle = await broken.enqueue()
    with pytest.raises(TaskFailed, match=r"builtins.LookupError: missing row") as info:
        await handle.result(timeout=1)
    assert (info.value.error_type, info.value.error_message) == (
        "builtins.LookupError",
        "missing row",
    )
    assert (await handle.info()).attempts == 2


async def test_result_times_out_while_the_call_is_pending(bridge: TaskBridge) -> None:
    @bridge.task(backend="rec")
    def later() -> None: ...

    handle = await later.enqueue()
    assert await handle.status() == "queued"
    with pytest.raises(TimeoutError, match="queued"):
        await handle.result(timeout=0.05)


async def test_cancel_a_running_async_task(bridge: TaskBridge) -> None:
    started = asyncio.Event()
    cleaned: list[str] = []

    @bridge.task
    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("cleaned up")

    handle = await forever.enqueue()
    await started.wait()
    answer = await handle.cancel()
    assert (answer.cancelled, answer.state) == (True, "cancelled")
    with pytest.raises(TaskCancelled):
        await handle.result(timeout=5)
    assert cleaned == ["cleaned up"]


async def test_a_running_sync_task_cannot_be_cancelled_and_says_so(bridge: TaskBridge) -> None:
    started, release = threading.Event(), threading.Event()

    @bridge.task
    def blocking() -> str:
        started.set()
        release.wait(10)
        return "finished"

    handle = await blocking.enqueue()
    await asyncio.to_thread(started.wait, 10)
    answer = await handle.cancel()
    assert answer.cancelled is False and "cannot be interrupted" in answer.detail
    release.set()
    assert await handle.result(timeout=5) == "finished"


def test_a_queued_inprocess_task_cancelled_before_it_starts_never_runs() -> None:
    bridge = TaskBridge()
    ran: list[str] = []

    @bridge.task
    def slow_first() -> None:
        ran.append("first")

    @bridge.task
    def second() -> None:
        ran.append("second")

    app = FastAPI(lifespan=bridge.lifespan)

    @app.post("/")
    async def endpoint(tasks: Tasks) -> None:
        tasks.add_task(slow_first)
        handle = tasks.add_task(second)
        answer = await handle.cancel()  # still queued: the response has not been sent
        assert (answer.cancelled, answer.detail) == (True, "cancelled before it started")

    with TestClient(app) as client:
        assert client.post("/").status_code == 200
    assert ran == ["first"]


async def test_a_recorded_call_is_queued_until_cancelled(bridge: TaskBridge) -> None:
    @bridge.task(backend="rec")
    def job() -> None: ...

    handle = await job.enqueue()
    found = bridge.handle(handle.id)
    assert await found.status() == "queued" and found.backend == "rec"
    assert (await found.cancel()).cancelled
    assert await found.status() == "unknown"
    assert bridge.backend("rec").calls == []  # type: ignore[attr-defined]


def test_report_progress_outside_a_task_is_a_no_op() -> None:
    report_progress(0.3, "nothing to see")


def test_router_reports_status_and_cancels_with_typed_models() -> None:
    bridge = TaskBridge({"backends": {"rec": {"engine": "recording"}}})

    @bridge.task
    def quick(n: int) -> int:
        return n * 2

    @bridge.task(backend="rec")
    def queued_job() -> None: ...

    app = FastAPI(lifespan=bridge.lifespan)
    app.include_router(bridge.router())

    @app.post("/work")
    async def work(tasks: Tasks) -> dict[str, str]:
        return {"quick": tasks.add_task(quick, 21).id, "queued": tasks.add_task(queued_job).id}

    with TestClient(app) as client:
        ids = client.post("/work").json()
        body: dict[str, Any] = client.get(f"/tasks/{ids['quick']}").json()
        assert (body["state"], body["result"], body["attempts"]) == ("succeeded", 42, 1)
        assert client.get(f"/tasks/{ids['queued']}").json()["state"] == "queued"
        assert client.delete(f"/tasks/{ids['queued']}").json()["cancelled"] is True
        conflict = client.delete(f"/tasks/{ids['quick']}")
        assert conflict.status_code == 409 and "already succeeded" in conflict.text
        assert client.get("/tasks/nope").status_code == 404
        schema = client.get("/openapi.json").json()
    assert {"TaskStatus", "CancelResult"} <= set(schema["components"]["schemas"])
    assert "/tasks/{task_id}" in schema["paths"]


def test_new_ids_are_random_uuid4_strings() -> None:
    import uuid

    from taskbridge._handle import new_task_id

    ids = {new_task_id() for _ in range(2000)}
    assert len(ids) == 2000
    for task_id in list(ids)[:200]:
        parsed = uuid.UUID(task_id)
        assert str(parsed) == task_id
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
