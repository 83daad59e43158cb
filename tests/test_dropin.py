"""`Tasks` is a drop-in for `BackgroundTasks` for in-process tasks.

Every scenario runs twice, once through FastAPI's BackgroundTasks and once through Tasks, and
must record exactly the same events: order, args and kwargs, sync and async, after the response,
and nothing when the handler raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI, HTTPException

from taskbridge import TaskBridge, Tasks
from tests.asgi import call


def _app(via: str, events: list[Any], fail: bool = False) -> tuple[FastAPI, TaskBridge]:
    bridge = TaskBridge({"default_backend": "inprocess"})

    def sync_job(label: str, *, n: int = 0) -> None:
        events.append(("sync", label, n))

    async def async_job(label: str, n: int = 0) -> None:
        await asyncio.sleep(0)
        events.append(("async", label, n))

    wrapped_sync = bridge.task(sync_job)
    wrapped_async = bridge.task(async_job)
    app = FastAPI(lifespan=bridge.lifespan)

    def schedule(add: Callable[..., Any], sync: Any, asynchronous: Any) -> None:
        add(sync, "a", n=1)
        add(asynchronous, "b", 2)
        add(sync, "c")
        add(asynchronous, label="d", n=4)
        if fail == "http":
            raise HTTPException(status_code=409, detail="conflict")
        if fail:
            raise RuntimeError("handler failed")

    if via == "BackgroundTasks":

        @app.get("/")
        async def native(background: BackgroundTasks) -> dict[str, str]:
            schedule(background.add_task, sync_job, async_job)
            return {"ok": "yes"}

    else:

        @app.get("/")
        async def bridged(tasks: Tasks) -> dict[str, str]:
            schedule(tasks.add_task, wrapped_sync, wrapped_async)
            return {"ok": "yes"}

    return app, bridge


async def _scenario(via: str, fail: Any = False) -> list[Any]:
    events: list[Any] = []
    app, _ = _app(via, events, fail)
    async with app.router.lifespan_context(app):
        try:
            await call(app, "GET", "/", events)
        except RuntimeError as exc:  # the app re-raises unhandled errors after answering 500
            events.append(("raised", str(exc)))
    return events


@pytest.mark.parametrize("via", ["BackgroundTasks", "Tasks"])
async def test_tasks_run_in_order_with_their_arguments_after_the_response(via: str) -> None:
    events = await _scenario(via)
    assert events == [
        ("response-complete", 200),
        ("sync", "a", 1),
        ("async", "b", 2),
        ("sync", "c", 0),
        ("async", "d", 4),
    ]


@pytest.mark.parametrize("fail", [True, "http"], ids=["exception", "http-exception"])
async def test_nothing_runs_when_the_handler_raises(fail: Any) -> None:
    native = await _scenario("BackgroundTasks", fail)
    bridged = await _scenario("Tasks", fail)
    assert bridged == native
    assert not [e for e in bridged if e[0] in ("sync", "async")]


async def test_both_paths_record_identical_events() -> None:
    assert await _scenario("Tasks") == await _scenario("BackgroundTasks")


async def test_plain_callables_and_tasks_share_one_ordered_list() -> None:
    events: list[Any] = []
    bridge = TaskBridge()

    @bridge.task
    async def decorated(x: int) -> None:
        events.append(("decorated", x))

    app = FastAPI(lifespan=bridge.lifespan)

    @app.get("/")
    async def endpoint(tasks: Tasks) -> None:
        tasks.add_task(events.append, ("plain", 1))
        tasks.add_task(decorated, 2)
        tasks.add_task(events.append, ("plain", 3))

    async with app.router.lifespan_context(app):
        await call(app, "GET", "/", events)
    assert events == [("response-complete", 200), ("plain", 1), ("decorated", 2), ("plain", 3)]


async def test_a_failing_task_does_not_stop_the_next_is_logged_then_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[Any] = []
    bridge = TaskBridge()

    @bridge.task
    def explode() -> None:
        raise ValueError("kaboom")

    @bridge.task
    def after() -> None:
        events.append("after ran")

    app = FastAPI(lifespan=bridge.lifespan)
    handles: list[str] = []

    @app.get("/")
    async def endpoint(tasks: Tasks) -> None:
        handles.append(tasks.add_task(explode).id)
        tasks.add_task(after)

    async with app.router.lifespan_context(app):
        # Like BackgroundTasks, the error leaves the app once the response is sent; unlike it,
        # the tasks after the failing one ran first.
        with pytest.raises(ValueError, match="kaboom"):
            await call(app, "GET", "/", events)
    assert events == [("response-complete", 200), "after ran"]
    failure = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(failure) == 1
    assert explode.name in failure[0].getMessage()
    assert handles[0] in failure[0].getMessage()
    assert failure[0].exc_info is not None and "kaboom" in str(failure[0].exc_info[1])
