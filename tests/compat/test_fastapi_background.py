"""FastAPI's own background-task tutorials and tests, run native, plain and registered.

Swapping `background_tasks: BackgroundTasks` for `tasks: Tasks` must change nothing. Each
scenario is written once and runs three ways (see ways.py) with the same assertions; the one
documented difference (a failing registered in-process task does not stop the ones after it) is
marked where an assertion depends on it.

Ported from FastAPI (tutorials in `docs_src/background_tasks/`, tests under `tests/`):

- `test_tutorial/test_background_tasks/test_tutorial001.py`: tutorial001, writing a log file.
- `test_tutorial/test_background_tasks/test_tutorial002.py`: tutorial002 and its Annotated
  variant, a dependency that also adds a task.
- `test_dependency_contextmanager.py`: `test_background_tasks` and `test_sync_background_tasks`
  (a task sees the state of `yield` dependencies that are still open; the `http` middleware
  gets the response before the task runs). That file's other tests have no background task.
- `test_response_dependency.py`: `test_background_tasks_with_depends_annotated` (the tasks
  parameter itself declared with `Annotated[..., Depends(...)]`).
- `test_frontend.py`: `test_frontend_dependency_response_headers_and_background_tasks` (an
  app-wide dependency adds a task to a frontend route), plus the same with a plain route.

Changed from upstream: the tutorial apps are built inside each test (with `way.Background`
where they declare `BackgroundTasks`), and each writes its log to the test's own `tmp_path`
instead of a `log.txt` in a locked working directory. Not ported: the other tests of
`test_dependency_contextmanager.py` and `test_frontend.py`, which have no background task.

The rest of the module covers what the drop-in promises beyond upstream's tests: order,
arguments, sync and async, tasks from every kind of dependency in one list, tasks after the
response body, nothing run when the handler raises, and how a failing task propagates.

This module must not use `from __future__ import annotations`: endpoints are annotated with
`way.Background`, which FastAPI has to see as an object, not as a string to resolve.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import Depends, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask

from tests.compat.ways import Way


class TaskError(Exception):
    """Raised by a failing background task."""


class OtherTaskError(Exception):
    """Raised by a second failing background task."""


class HandlerError(Exception):
    """Raised by an endpoint after it added tasks."""


# -- tutorials ------------------------------------------------------------------------------


def test_tutorial001(way: Way, tmp_path: Path) -> None:
    log = tmp_path / "log.txt"

    def write_notification(email: str, message: str = "") -> None:
        with open(log, mode="w") as email_file:
            content = f"notification for {email}: {message}"
            email_file.write(content)

    write = way.task(write_notification)
    app = way.app()

    @app.post("/send-notification/{email}")
    async def send_notification(email: str, background_tasks: way.Background) -> Any:
        background_tasks.add_task(write, email, message="some notification")
        return {"message": "Notification sent in the background"}

    with way.client(app) as client:
        response = client.post("/send-notification/foo@example.com")
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Notification sent in the background"}
    assert "notification for foo@example.com: some notification" in log.read_text()


@pytest.mark.parametrize("variant", ["tutorial002", "tutorial002_an"])
def test_tutorial002(way: Way, tmp_path: Path, variant: str) -> None:
    log = tmp_path / "log.txt"

    def write_log(message: str) -> None:
        with open(log, mode="a") as file:
            file.write(message)

    write = way.task(write_log)

    def get_query(background_tasks: way.Background, q: str | None = None) -> str | None:
        if q:
            message = f"found query: {q}\n"
            background_tasks.add_task(write, message)
        return q

    app = way.app()
    if variant == "tutorial002_an":

        @app.post("/send-notification/{email}")
        async def send_notification_an(
            email: str, background_tasks: way.Background, q: Annotated[str, Depends(get_query)]
        ) -> Any:
            message = f"message to {email}\n"
            background_tasks.add_task(write, message)
            return {"message": "Message sent"}

    else:

        @app.post("/send-notification/{email}")
        async def send_notification(
            email: str, background_tasks: way.Background, q: str = Depends(get_query)
        ) -> Any:
            message = f"message to {email}\n"
            background_tasks.add_task(write, message)
            return {"message": "Message sent"}

    with way.client(app) as client:
        response = client.post("/send-notification/foo@example.com?q=some-query")
        assert response.status_code == 200, response.text
        assert response.json() == {"message": "Message sent"}
        assert "found query: some-query\nmessage to foo@example.com" in log.read_text()
        # beyond upstream: without `q` the dependency adds nothing
        client.post("/send-notification/bar@example.com")
    assert log.read_text() == (
        "found query: some-query\nmessage to foo@example.com\nmessage to bar@example.com\n"
    )


# -- dependencies ---------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["async", "sync"])
def test_background_tasks_with_yield_dependencies(way: Way, endpoint: str) -> None:
    """Upstream's test_background_tasks and test_sync_background_tasks."""
    state: dict[str, str] = {
        "context_a": "not started a",
        "context_b": "not started b",
        "bg": "not set",
    }

    async def get_state() -> dict[str, str]:
        return state

    async def context_a(state: Annotated[dict[str, str], Depends(get_state)]) -> Any:
        state["context_a"] = "started a"
        try:
            yield state
        finally:
            state["context_a"] = "finished a"

    async def context_b(state: Annotated[dict[str, str], Depends(context_a)]) -> Any:
        state["context_b"] = "started b"
        try:
            yield state
        finally:
            state["context_b"] = f"finished b with a: {state['context_a']}"

    async def bg(state: dict[str, str]) -> None:
        state["bg"] = f"bg set - b: {state['context_b']} - a: {state['context_a']}"

    task = way.task(bg)
    app = way.app()
    if endpoint == "async":

        @app.get("/context_b_bg")
        async def get_context_b_bg(
            tasks: way.Background, state: Annotated[dict[str, str], Depends(context_b)]
        ) -> Any:
            tasks.add_task(task, state)
            return state

    else:

        @app.get("/context_b_bg")
        def get_sync_context_b_bg(
            tasks: way.Background, state: Annotated[dict[str, str], Depends(context_b)]
        ) -> Any:
            tasks.add_task(task, state)
            return state

    @app.middleware("http")
    async def middleware(request: Request, call_next: Any) -> Any:
        response: StreamingResponse = await call_next(request)
        response.headers["x-state"] = json.dumps(state.copy())
        return response

    with way.client(app) as client:
        response = client.get("/context_b_bg")
    data = response.json()
    assert data["context_b"] == "started b"
    assert data["context_a"] == "started a"
    assert data["bg"] == "not set"
    middleware_state = json.loads(response.headers["x-state"])
    assert middleware_state["context_b"] == "started b"
    assert middleware_state["context_a"] == "started a"
    assert middleware_state["bg"] == "not set"
    assert state["context_b"] == "finished b with a: started a"
    assert state["context_a"] == "finished a"
    assert state["bg"] == "bg set - b: started b - a: started a"


def test_background_tasks_with_depends_annotated(way: Way) -> None:
    """Upstream's test_background_tasks_with_depends_annotated."""
    task_results: list[str] = []

    def background_task(message: str) -> None:
        task_results.append(message)

    task = way.task(background_task)
    app = way.app()

    def add_background_task(background_tasks: way.Background) -> Any:
        background_tasks.add_task(task, "from dependency")
        return background_tasks

    @app.get("/")
    def endpoint(
        background_tasks: Annotated[way.queue_type, Depends(add_background_task)],
    ) -> Any:
        background_tasks.add_task(task, "from endpoint")
        return {"status": "ok"}

    with way.client(app) as client:
        resp = client.get("/")
    assert resp.status_code == 200
    # upstream checks membership only; the order is the dependency's first
    assert task_results == ["from dependency", "from endpoint"]


@pytest.mark.parametrize("route", ["frontend", "path-operation"])
def test_app_dependency_adds_a_task(way: Way, tmp_path: Path, route: str) -> None:
    """Upstream's test_frontend_dependency_response_headers_and_background_tasks."""
    calls: list[str] = []

    def record(what: str) -> None:
        calls.append(what)

    task = way.task(record)

    def frontend_dependency(response: Response, background_tasks: way.Background) -> None:
        response.headers["X-Frontend-Dependency"] = "applied"
        response.set_cookie("frontend", "dependency")
        background_tasks.add_task(task, "background")

    app = way.app(dependencies=[Depends(frontend_dependency)])
    if route == "frontend":
        dist = tmp_path / "dist"
        dist.mkdir()
        (dist / "index.html").write_text("app")
        app.frontend("/", directory=dist)
    else:

        @app.get("/", response_class=PlainTextResponse)
        def index() -> str:
            return "app"

    with way.client(app) as client:
        response = client.get("/")
    assert response.status_code == 200
    assert response.text == "app"
    assert response.headers["X-Frontend-Dependency"] == "applied"
    assert response.cookies["frontend"] == "dependency"
    assert calls == ["background"]


def test_dependencies_and_endpoint_share_one_ordered_list(way: Way) -> None:
    events: list[str] = []

    def record(what: str) -> None:
        events.append(f"task {what}")

    task = way.task(record)

    def sub(tasks: way.Background) -> None:
        tasks.add_task(task, "sub")

    async def request_scoped(tasks: way.Background, _: None = Depends(sub)) -> Any:
        tasks.add_task(task, "yield")
        yield
        events.append("request-scoped dependency closed")

    def function_scoped(tasks: way.Background) -> Any:
        tasks.add_task(task, "function-scoped yield")
        yield
        events.append("function-scoped dependency closed")

    app = way.app()

    @app.get("/")
    async def endpoint(
        tasks: way.Background,
        _a: None = Depends(request_scoped),
        _b: None = Depends(function_scoped, scope="function"),
    ) -> Any:
        tasks.add_task(task, "endpoint")
        events.append("endpoint returned")
        return {"ok": True}

    with way.client(app) as client:
        assert client.get("/").json() == {"ok": True}
    assert events == [
        "endpoint returned",
        "function-scoped dependency closed",
        "task sub",
        "task yield",
        "task function-scoped yield",
        "task endpoint",
        "request-scoped dependency closed",
    ]


# -- order, arguments, sync and async ------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["async", "sync"])
def test_order_arguments_sync_and_async(way: Way, endpoint: str) -> None:
    events: list[Any] = []

    def sync_job(label: str, *, n: int = 0) -> None:
        events.append(("sync", label, n))

    async def async_job(label: str, n: int = 0) -> None:
        await asyncio.sleep(0)
        events.append(("async", label, n))

    sync_task, async_task = way.task(sync_job), way.task(async_job)

    def schedule(tasks: Any) -> None:
        tasks.add_task(sync_task, "a", n=1)
        tasks.add_task(async_task, "b", 2)
        tasks.add_task(sync_task, "c")
        tasks.add_task(async_task, label="d", n=4)

    app = way.app()
    if endpoint == "async":

        @app.get("/")
        async def async_endpoint(tasks: way.Background) -> Any:
            schedule(tasks)
            return {"ok": True}

    else:

        @app.get("/")
        def sync_endpoint(tasks: way.Background) -> Any:
            schedule(tasks)
            return {"ok": True}

    with way.client(app) as client:
        assert client.get("/").json() == {"ok": True}
    assert events == [("sync", "a", 1), ("async", "b", 2), ("sync", "c", 0), ("async", "d", 4)]


def test_tasks_run_after_the_response_body_is_produced(way: Way) -> None:
    events: list[str] = []

    def record(what: str) -> None:
        events.append(what)

    task = way.task(record)
    app = way.app()

    @app.get("/")
    async def endpoint(tasks: way.Background) -> StreamingResponse:
        tasks.add_task(task, "task")

        async def body() -> Any:
            for chunk in ("one", "two"):
                events.append(f"body {chunk}")
                yield chunk

        return StreamingResponse(body())

    with way.client(app) as client:
        assert client.get("/").text == "onetwo"
    assert events == ["body one", "body two", "task"]


@pytest.mark.parametrize("fail", [False, True], ids=["succeeds", "task-fails"])
def test_a_streaming_endpoint_adds_tasks_while_it_streams(way: Way, fail: bool) -> None:
    """A generator endpoint (streamed as JSON lines) runs its body after FastAPI has closed
    the endpoint's own exit stack; the tasks it adds still run after the stream."""
    events: list[str] = []

    def record(what: str) -> None:
        events.append(what)
        if fail and what == "before":
            raise TaskError("boom")

    task = way.task(record)
    app = way.app()

    @app.get("/items")
    async def items(tasks: way.Background) -> AsyncIterator[dict[str, int]]:
        tasks.add_task(task, "before")
        for i in range(2):
            events.append(f"item {i}")
            yield {"i": i}
        tasks.add_task(task, "after")

    with way.client(app) as client:
        if fail:
            with pytest.raises(TaskError, match="boom"):
                client.get("/items")
        else:
            assert client.get("/items").text == '{"i":0}\n{"i":1}\n'
    if fail:
        # The one documented difference: taskbridge runs every registered in-process task
        # of the request, then raises the first error.
        expected = ["item 0", "item 1", "before", *(["after"] if way.runs_every_task else [])]
    else:
        expected = ["item 0", "item 1", "before", "after"]
    assert events == expected


def test_a_response_with_its_own_background_replaces_the_added_tasks(way: Way) -> None:
    """FastAPI keeps a returned Response's own `background` and drops the endpoint's list."""
    events: list[str] = []

    def record(what: str) -> None:
        events.append(what)

    task = way.task(record)
    app = way.app()

    @app.get("/")
    async def endpoint(tasks: way.Background) -> PlainTextResponse:
        tasks.add_task(task, "added")
        return PlainTextResponse("ok", background=BackgroundTask(record, "own"))

    with way.client(app) as client:
        assert client.get("/").text == "ok"
    assert events == ["own"]


# -- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["http-exception", "exception"])
@pytest.mark.parametrize("endpoint", ["async", "sync"])
def test_nothing_runs_when_the_handler_raises(way: Way, failure: str, endpoint: str) -> None:
    events: list[str] = []

    def record(what: str) -> None:
        events.append(what)

    task = way.task(record)

    async def dependency(tasks: way.Background) -> Any:
        tasks.add_task(task, "from dependency")
        try:
            yield
        finally:
            events.append("dependency closed")

    def schedule_and_fail(tasks: Any) -> None:
        tasks.add_task(task, "from endpoint")
        if failure == "http-exception":
            raise HTTPException(status_code=409, detail="conflict")
        raise HandlerError("handler failed")

    app = way.app()
    if endpoint == "async":

        @app.get("/")
        async def async_endpoint(tasks: way.Background, _: None = Depends(dependency)) -> Any:
            schedule_and_fail(tasks)

    else:

        @app.get("/")
        def sync_endpoint(tasks: way.Background, _: None = Depends(dependency)) -> Any:
            schedule_and_fail(tasks)

    with way.client(app) as client:
        if failure == "http-exception":
            response = client.get("/")
            assert response.status_code == 409
            assert response.json() == {"detail": "conflict"}
        else:
            with pytest.raises(HandlerError, match="handler failed"):
                client.get("/")
    assert events == ["dependency closed"]


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("raise_server_exceptions", [True, False], ids=["raises", "500-handler"])
def test_a_failing_task_propagates_out_of_the_app(
    way: Way, kind: str, raise_server_exceptions: bool
) -> None:
    events: list[str] = []
    handled: list[BaseException] = []

    def record(what: str) -> None:
        events.append(what)

    def explode_sync() -> None:
        events.append("explode")
        raise TaskError("boom")

    async def explode_async() -> None:
        events.append("explode")
        raise TaskError("boom")

    task = way.task(record)
    explode = way.task(explode_sync if kind == "sync" else explode_async)
    app = way.app()

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> PlainTextResponse:
        handled.append(exc)
        return PlainTextResponse("handled", status_code=500)

    @app.get("/")
    async def endpoint(tasks: way.Background) -> Any:
        tasks.add_task(task, "before")
        tasks.add_task(explode)
        tasks.add_task(task, "after")
        return {"ok": True}

    with way.client(app, raise_server_exceptions=raise_server_exceptions) as client:
        if raise_server_exceptions:
            with pytest.raises(TaskError, match="boom") as raised:
                client.get("/")
            assert handled == [raised.value]
        else:
            # the response was sent before the task failed: the client still gets it
            response = client.get("/")
            assert response.status_code == 200
            assert response.json() == {"ok": True}
            assert [type(e) for e in handled] == [TaskError]
    # The one documented difference: taskbridge runs every registered in-process task of the
    # request, then raises the first error; BackgroundTasks stops at the failing task.
    if way.runs_every_task:
        assert events == ["before", "explode", "after"]
    else:
        assert events == ["before", "explode"]


def test_the_first_failure_is_raised(way: Way, caplog: pytest.LogCaptureFixture) -> None:
    events: list[str] = []

    def first() -> None:
        events.append("first")
        raise TaskError("first failure")

    async def second() -> None:
        events.append("second")
        raise OtherTaskError("second failure")

    tasks_in_order = [way.task(first), way.task(second)]
    app = way.app()

    @app.get("/")
    async def endpoint(tasks: way.Background) -> Any:
        for task in tasks_in_order:
            tasks.add_task(task)

    with (
        caplog.at_level(logging.ERROR),
        way.client(app) as client,
        pytest.raises(TaskError, match="first failure"),
    ):
        client.get("/")
    # The one documented difference: the registered second task still runs, and its error is
    # logged rather than raised.
    if way.runs_every_task:
        assert events == ["first", "second"]
        assert "second failure" in caplog.text
    else:
        assert events == ["first"]
        assert "second failure" not in caplog.text


# -- the registered way is what it says ----------------------------------------------------


@pytest.mark.parametrize("lifespan", [False, True], ids=["bare", "lifespan"])
def test_registered_calls_run_on_the_in_process_backend(lifespan: bool) -> None:
    """Guards the suite itself: `registered` calls go through the bridge, not around it."""
    way = Way("registered", lifespan)
    events: list[str] = []

    def record(what: str) -> None:
        events.append(what)

    task = way.task(record)
    app = way.app()

    @app.get("/")
    async def endpoint(tasks: way.Background) -> Any:
        handle = tasks.add_task(task, "ran")
        return {"id": handle.id, "backend": handle.backend}

    @app.get("/status/{task_id}")
    async def status(task_id: str) -> Any:
        return await way.bridge.handle(task_id).status()

    with way.client(app) as client:
        added = client.get("/").json()
        assert added["backend"] == "inprocess"
        assert client.get(f"/status/{added['id']}").json() == "succeeded"
    assert events == ["ran"]
