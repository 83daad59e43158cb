"""Starlette's background-task tests, as FastAPI endpoints, run native, plain and registered.

Starlette's tests attach a `BackgroundTask(s)` to a Response in a raw ASGI app or a Starlette
route. Here each becomes a FastAPI endpoint that adds the same calls through `BackgroundTasks`
or `Tasks` (see ways.py), with upstream's assertions.

Ported from Starlette:

- `tests/test_background.py`: all four tests (`test_async_task`, `test_sync_task`,
  `test_multiple_tasks`, `test_multi_tasks_failure_avoids_next_execution`). In the last one, a
  registered in-process task after the failing one still runs: the one documented difference.
- `tests/middleware/test_base.py` (BaseHTTPMiddleware, here FastAPI's `@app.middleware("http")`):
  `test_run_background_tasks_even_if_client_disconnects`,
  `test_run_background_tasks_raise_exceptions`, `test_do_not_block_on_background_tasks` and
  `test_run_context_manager_exit_even_if_client_disconnects`.

Not ported, from `tests/middleware/test_base.py`: `test_multiple_middlewares_stacked_client_
disconnected`, whose tasks are attached to the response by the middlewares themselves
(`response.background = ...`), not added by an endpoint, so `Tasks` has no part in it; the other
tests of that file have no background task.

`test_do_not_block_on_background_tasks` waits, in each task, until both responses are complete
instead of sleeping 0.1 s: a task that ran before its response was sent would never see that,
and the test fails on its deadline rather than depending on timing.

This module must not use `from __future__ import annotations`: endpoints are annotated with
`way.Background`, which FastAPI has to see as an object, not as a string to resolve.
"""

from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.compat.ways import Way


def _scope(path: str = "/", query: str = "") -> Scope:
    """An HTTP scope as Starlette's raw tests build it, with what FastAPI also reads."""
    return {
        "type": "http",
        "version": "3",
        "asgi": {"version": "3.0"},
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [],
    }


def _passthrough(app: FastAPI) -> None:
    @app.middleware("http")
    async def passthrough(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        return response


# -- tests/test_background.py ---------------------------------------------------------------


def test_async_task(way: Way) -> None:
    task_complete = False

    async def async_task() -> None:
        nonlocal task_complete
        task_complete = True

    task = way.task(async_task)
    app = way.app()

    @app.get("/")
    async def endpoint(tasks: way.Background) -> PlainTextResponse:
        tasks.add_task(task)
        return PlainTextResponse("task initiated")

    with way.client(app) as client:
        response = client.get("/")
    assert response.text == "task initiated"
    assert task_complete


def test_sync_task(way: Way) -> None:
    task_complete = False

    def sync_task() -> None:
        nonlocal task_complete
        task_complete = True

    task = way.task(sync_task)
    app = way.app()

    @app.get("/")
    async def endpoint(tasks: way.Background) -> PlainTextResponse:
        tasks.add_task(task)
        return PlainTextResponse("task initiated")

    with way.client(app) as client:
        response = client.get("/")
    assert response.text == "task initiated"
    assert task_complete


def test_multiple_tasks(way: Way) -> None:
    task_counter = 0

    def increment(amount: int) -> None:
        nonlocal task_counter
        task_counter += amount

    task = way.task(increment)
    app = way.app()

    @app.get("/")
    async def endpoint(tasks: way.Background) -> PlainTextResponse:
        tasks.add_task(task, amount=1)
        tasks.add_task(task, amount=2)
        tasks.add_task(task, amount=3)
        return PlainTextResponse("tasks initiated")

    with way.client(app) as client:
        response = client.get("/")
    assert response.text == "tasks initiated"
    assert task_counter == 1 + 2 + 3


def test_multi_tasks_failure_avoids_next_execution(way: Way) -> None:
    task_counter = 0

    def increment() -> None:
        nonlocal task_counter
        task_counter += 1
        if task_counter == 1:
            raise Exception("task failed")

    task = way.task(increment)
    app = way.app()

    @app.get("/")
    async def endpoint(tasks: way.Background) -> PlainTextResponse:
        tasks.add_task(task)
        tasks.add_task(task)
        return PlainTextResponse("tasks initiated")

    with way.client(app) as client, pytest.raises(Exception, match="task failed"):
        client.get("/")
    # The one documented difference: taskbridge runs every registered in-process task of the
    # request, then raises the first error; BackgroundTasks stops at the failing task.
    assert task_counter == (2 if way.runs_every_task else 1)


# -- tests/middleware/test_base.py ----------------------------------------------------------


async def test_run_background_tasks_even_if_client_disconnects(way: Way) -> None:
    # upstream: https://github.com/encode/starlette/issues/1438
    response_complete = anyio.Event()
    background_task_run = anyio.Event()

    async def sleep_and_set() -> None:
        # a small delay gives BaseHTTPMiddleware a chance to cancel the task (what the issue
        # was about); the task must still complete
        await anyio.sleep(0.05)
        background_task_run.set()

    task = way.task(sleep_and_set)
    app = way.app()
    _passthrough(app)

    @app.get("/")
    async def endpoint_with_background_task(tasks: way.Background) -> PlainTextResponse:
        tasks.add_task(task)
        return PlainTextResponse()

    async def receive() -> Message:
        raise NotImplementedError("Should not be called!")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            response_complete.set()

    async with way.running(app):
        await app(_scope(), receive, send)
    assert response_complete.is_set()
    assert background_task_run.is_set()


def test_run_background_tasks_raise_exceptions(way: Way) -> None:
    # upstream: https://github.com/encode/starlette/issues/2625

    async def sleep_and_set() -> None:
        await anyio.sleep(0.05)
        raise ValueError("TEST")

    task = way.task(sleep_and_set)
    app = way.app()
    _passthrough(app)

    @app.get("/")
    async def endpoint_with_background_task(tasks: way.Background) -> PlainTextResponse:
        tasks.add_task(task)
        return PlainTextResponse()

    with way.client(app) as client, pytest.raises(ValueError, match="TEST"):
        client.get("/")


async def test_do_not_block_on_background_tasks(way: Way) -> None:
    events: list[str] = []
    both_complete = anyio.Event()

    async def wait_for_both(n: int) -> None:
        events.append(f"task {n} started")
        with anyio.fail_after(5):
            await both_complete.wait()
        events.append(f"task {n} finished")

    task = way.task(wait_for_both)
    app = way.app()
    _passthrough(app)

    @app.get("/")
    async def endpoint_with_background_task(n: int, tasks: way.Background) -> PlainTextResponse:
        tasks.add_task(task, n)
        return PlainTextResponse(content="Hello")

    async def receive() -> Message:
        raise NotImplementedError("Should not be called!")

    bodies: dict[int, list[bytes]] = {1: [], 2: []}

    def sender(n: int) -> Send:
        async def send(message: Message) -> None:
            if message["type"] == "http.response.body":
                bodies[n].append(message["body"])
                if not message.get("more_body", False):
                    events.append(f"response {n} complete")
                    if all(f"response {m} complete" in events for m in (1, 2)):
                        both_complete.set()

        return send

    async with way.running(app), anyio.create_task_group() as tg:
        tg.start_soon(app, _scope(query="n=1"), receive, sender(1))
        tg.start_soon(app, _scope(query="n=2"), receive, sender(2))

    assert b"".join(bodies[1]) == b"".join(bodies[2]) == b"Hello"
    assert sorted(events) == [
        "response 1 complete",
        "response 2 complete",
        "task 1 finished",
        "task 1 started",
        "task 2 finished",
        "task 2 started",
    ]
    for n in (1, 2):
        # without the fix upstream, tasks started and finished before the last body was sent
        assert events.index(f"response {n} complete") < events.index(f"task {n} started")


async def test_run_context_manager_exit_even_if_client_disconnects(way: Way) -> None:
    # upstream: https://github.com/encode/starlette/issues/1678#issuecomment-1172916042
    response_complete = anyio.Event()
    context_manager_exited = anyio.Event()
    background_task_run = anyio.Event()

    async def exit_callback() -> None:
        # a small delay gives BaseHTTPMiddleware a chance to cancel us (the issue)
        await anyio.sleep(0.05)
        context_manager_exited.set()

    async def sleep_and_set() -> None:
        await anyio.sleep(0.05)
        background_task_run.set()

    class ContextManagerMiddleware:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            async with AsyncExitStack() as stack:
                stack.push_async_callback(exit_callback)
                await self.app(scope, receive, send)

    task = way.task(sleep_and_set)
    app = way.app()
    app.add_middleware(ContextManagerMiddleware)
    _passthrough(app)  # added last, so outermost, as upstream lists it first

    @app.get("/")
    async def simple_endpoint(tasks: way.Background) -> PlainTextResponse:
        tasks.add_task(task)
        return PlainTextResponse()

    async def receive() -> Message:
        raise NotImplementedError("Should not be called!")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            response_complete.set()

    async with way.running(app):
        await app(_scope(), receive, send)
    assert response_complete.is_set()
    assert context_manager_exited.is_set()
    assert background_task_run.is_set()
