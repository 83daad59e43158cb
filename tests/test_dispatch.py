"""Queued calls: buffered per request, sent after the handler returns, never when it raises."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient

from taskbridge import TaskBridge, TaskHandle, Tasks
from taskbridge.backends._builtin import RecordingBackend

SETTINGS = {"backends": {"rec": {"engine": "recording"}, "other": {"engine": "recording"}}}


def make_app() -> tuple[FastAPI, TaskBridge, list[Any]]:
    bridge = TaskBridge(SETTINGS)
    seen_pending: list[Any] = []

    @bridge.task(backend="rec", queue="mail")
    def send_mail(to: str, subject: str = "") -> None: ...

    @bridge.task(backend="other")
    async def sync_crm(user_id: int, fields: dict[str, Any]) -> None: ...

    app = FastAPI(lifespan=bridge.lifespan)

    @app.post("/signup/{mode}")
    async def signup(mode: str, tasks: Tasks) -> dict[str, list[str]]:
        handles = [
            tasks.add_task(send_mail, "a@example.com", subject="hi"),
            tasks.add_task(sync_crm, 7, {"plan": ("pro", 2)}),
            tasks.add_task(send_mail, "b@example.com"),
        ]
        # nothing leaves the process while the handler runs
        seen_pending.append(len(bridge.backend("rec").calls))  # type: ignore[attr-defined]
        if mode == "crash":
            raise RuntimeError("handler failed")
        if mode == "reject":
            raise HTTPException(status_code=422, detail="no")
        return {"ids": [h.id for h in handles]}

    return app, bridge, seen_pending


def test_a_2xx_response_means_every_queued_call_was_recorded_in_order() -> None:
    app, bridge, seen_pending = make_app()
    rec, other = bridge.backend("rec"), bridge.backend("other")
    assert isinstance(rec, RecordingBackend) and isinstance(other, RecordingBackend)
    with TestClient(app) as client:
        response = client.post("/signup/ok")
    assert response.status_code == 200
    ids = response.json()["ids"]
    assert seen_pending == [0]
    name = "tests.test_dispatch.make_app.<locals>.send_mail"
    assert [(c.id, c.name, c.args, c.kwargs) for c in rec.calls] == [
        (ids[0], name, ["a@example.com", "hi"], {}),
        (ids[2], name, ["b@example.com"], {}),
    ]
    # arguments were normalised to JSON at add_task time (the tuple became a list)
    assert [(c.id, c.args) for c in other.calls] == [(ids[1], [7, {"plan": ["pro", 2]}])]
    assert {c.policy.queue for c in rec.calls} == {"mail"}


@pytest.mark.parametrize(("mode", "status"), [("crash", 500), ("reject", 422)])
def test_a_handler_exception_dispatches_nothing(mode: str, status: int) -> None:
    app, bridge, _ = make_app()
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post(f"/signup/{mode}").status_code == status
    assert bridge.backend("rec").calls == []  # type: ignore[attr-defined]
    assert bridge.backend("other").calls == []  # type: ignore[attr-defined]


def test_each_backend_gets_one_batch_per_request() -> None:
    app, bridge, _ = make_app()
    batches: list[int] = []
    rec = bridge.backend("rec")
    original = rec.enqueue

    async def counting(calls: Any) -> None:
        batches.append(len(calls))
        await original(calls)

    rec.enqueue = counting  # type: ignore[method-assign]
    with TestClient(app) as client:
        client.post("/signup/ok")
        client.post("/signup/ok")
    assert batches == [2, 2]


def test_non_json_arguments_fail_the_request_before_anything_is_sent() -> None:
    bridge = TaskBridge(SETTINGS)

    @bridge.task(backend="rec")
    def store(blob: Any) -> None: ...

    app = FastAPI(lifespan=bridge.lifespan)

    @app.post("/")
    async def endpoint(tasks: Tasks) -> None:
        tasks.add_task(store, "fine")
        tasks.add_task(store, blob={"when": object()})

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/").status_code == 500
    assert bridge.backend("rec").calls == []  # type: ignore[attr-defined]


async def test_enqueue_outside_a_request_returns_a_handle() -> None:
    bridge = TaskBridge(SETTINGS)

    @bridge.task(backend="rec")
    async def nightly(day: str) -> None: ...

    handle = await nightly.enqueue("2026-11-25")
    assert isinstance(handle, TaskHandle)
    assert (handle.task_name, handle.backend) == (nightly.name, "rec")
    [recorded] = bridge.backend("rec").calls  # type: ignore[attr-defined]
    assert (recorded.id, recorded.args) == (handle.id, ["2026-11-25"])


async def test_inprocess_enqueue_outside_a_request_runs_and_close_waits_for_it() -> None:
    bridge = TaskBridge()
    done: list[int] = []

    @bridge.task
    async def job(n: int) -> None:
        done.append(n)

    await job.enqueue(1)
    await job.using(delay=0.01).enqueue(2)
    await bridge.close()
    assert sorted(done) == [1, 2]


async def test_immediate_runs_at_dispatch_with_json_arguments() -> None:
    bridge = TaskBridge({"default_backend": "immediate"})
    seen: list[Any] = []

    @bridge.task
    def job(items: Any) -> None:
        seen.append(items)

    await job.enqueue((1, 2))
    assert seen == [[1, 2]]


def test_tasks_works_in_an_app_without_a_bridge_or_lifespan() -> None:
    # No lifespan, no init_app, a TestClient not entered: plain callables need no bridge, and a
    # registered task brings its own, opened on first dispatch.
    bridge = TaskBridge(SETTINGS)
    ran: list[str] = []

    @bridge.task(backend="rec")
    def queued(n: int) -> None: ...

    app = FastAPI()

    @app.get("/")
    async def endpoint(tasks: Tasks) -> str:
        tasks.add_task(ran.append, "plain")
        return tasks.add_task(queued, 1).id

    client = TestClient(app)
    first, second = client.get("/"), client.get("/")
    assert first.status_code == second.status_code == 200
    assert ran == ["plain", "plain"]
    recorded = bridge.backend("rec")
    assert isinstance(recorded, RecordingBackend)
    assert [call.id for call in recorded.calls] == [first.json(), second.json()]


def test_init_app_keeps_the_apps_own_lifespan() -> None:
    from contextlib import asynccontextmanager

    bridge = TaskBridge(SETTINGS)
    order: list[str] = []

    @bridge.task(backend="rec")
    def job() -> None: ...

    @asynccontextmanager
    async def own(app: FastAPI) -> Any:
        order.append("own start")
        yield
        order.append("own stop")

    app = FastAPI(lifespan=own)
    bridge.init_app(app)

    @app.get("/")
    async def endpoint(tasks: Tasks) -> None:
        tasks.add_task(job)

    with TestClient(app) as client:
        client.get("/")
    assert order == ["own start", "own stop"]
    assert len(bridge.backend("rec").calls) == 1  # type: ignore[attr-defined]


def test_strict_arguments_checks_in_process_tasks_but_passes_the_originals() -> None:
    import datetime

    received: list[Any] = []
    for strict in (False, True):
        bridge = TaskBridge({"strict_arguments": strict})

        @bridge.task
        def log_event(when: Any, tags: tuple[str, ...]) -> None:
            received.append((when, tags))

        app = FastAPI(lifespan=bridge.lifespan)

        @app.post("/{kind}")
        def endpoint(kind: str, tasks: Tasks) -> None:  # a sync endpoint works the same
            when = datetime.date(2026, 1, 1) if kind == "date" else "2026-01-01"
            tasks.add_task(log_event, when, ("a", "b"))

        with TestClient(app, raise_server_exceptions=False) as client:
            assert client.post("/text").status_code == 200
            assert client.post("/date").status_code == (500 if strict else 200)
    # in-process tasks get the caller's own objects (the tuple stays a tuple)
    assert received == [
        ("2026-01-01", ("a", "b")),
        (datetime.date(2026, 1, 1), ("a", "b")),
        ("2026-01-01", ("a", "b")),
    ]


def test_a_queued_call_added_while_streaming_is_sent_once_the_stream_ends() -> None:
    # A generator endpoint's body runs after the endpoint's exit stack closed (FastAPI streams
    # it): calls added there cannot go before the response; they go when the response ends.
    from collections.abc import AsyncIterator

    bridge = TaskBridge(SETTINGS)

    @bridge.task(backend="rec")
    def queued(n: int) -> None: ...

    app = FastAPI()
    ids: list[str] = []

    @app.get("/items")
    async def items(tasks: Tasks) -> AsyncIterator[dict[str, int]]:
        for i in range(2):
            ids.append(tasks.add_task(queued, i).id)
            yield {"i": i}

    response = TestClient(app).get("/items")
    assert [json.loads(line) for line in response.text.splitlines()] == [{"i": 0}, {"i": 1}]
    recorded = bridge.backend("rec")
    assert isinstance(recorded, RecordingBackend)
    assert [call.id for call in recorded.calls] == ids
    assert [call.args for call in recorded.calls] == [[0], [1]]
