"""A broker that does not accept a request's calls: 503 with Retry-After, or in-process fallback.

The backends here are real Backend subclasses whose engine is "down" in two ways: refusing at
once (a connection error) and never answering (bounded by dispatch_timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from taskbridge import BackendUnavailable, TaskBridge, Tasks
from taskbridge.backends import Backend, TaskCall


class RefusingBackend(Backend):
    """Its broker refuses connections."""

    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        raise ConnectionRefusedError(111, "Connection refused")


class SilentBackend(Backend):
    """Its broker accepts the connection and never answers."""

    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        await asyncio.Event().wait()


def make_app(engine: str, on_unavailable: str) -> tuple[FastAPI, list[Any], TaskBridge]:
    bridge = TaskBridge(
        {
            "dispatch_timeout": 0.2,
            "unavailable_retry_after": 7,
            "backends": {
                "down": {"engine": f"{__name__}:{engine}"},
                "rec": {"engine": "recording"},
            },
        }
    )
    ran: list[Any] = []

    @bridge.task(backend="down", on_unavailable=on_unavailable)  # type: ignore[arg-type]
    def report(n: int) -> None:
        ran.append(n)

    @bridge.task(backend="rec")
    def other() -> None: ...

    app = FastAPI(lifespan=bridge.lifespan)

    @app.post("/")
    async def endpoint(tasks: Tasks) -> dict[str, str]:
        tasks.add_task(other)
        return {"id": tasks.add_task(report, 1).id}

    return app, ran, bridge


@pytest.mark.parametrize("engine", ["RefusingBackend", "SilentBackend"])
def test_fail_policy_answers_503_with_retry_after(engine: str) -> None:
    app, ran, _ = make_app(engine, "fail")
    with TestClient(app) as client:
        response = client.post("/")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert "try again later" in response.json()["detail"]
    assert ran == []


@pytest.mark.parametrize("engine", ["RefusingBackend", "SilentBackend"])
def test_inprocess_policy_runs_the_call_here_after_the_response(
    engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, ran, bridge = make_app(engine, "inprocess")
    with TestClient(app) as client:
        response = client.post("/")
    assert response.status_code == 200
    assert ran == [1]
    warning = next(r for r in caplog.records if "in-process instead" in r.getMessage())
    assert response.json()["id"] in warning.getMessage() and "'down'" in warning.getMessage()
    assert len(bridge.backend("rec").calls) == 1  # type: ignore[attr-defined]


async def test_enqueue_outside_a_request_raises_the_typed_error() -> None:
    _, ran, bridge = make_app("RefusingBackend", "fail")
    task = bridge.get_task(next(n for n in bridge.tasks if n.endswith("report")))
    with pytest.raises(BackendUnavailable, match="'down' is unreachable") as info:
        await task.enqueue(3)
    assert info.value.backend == "down"
    fallback = task.using(on_unavailable="inprocess")
    await fallback.enqueue(4)
    await bridge.close()
    for _ in range(100):  # the fallback runs as an asyncio task in this loop
        if ran:
            break
        await asyncio.sleep(0.01)
    assert ran == [4]
