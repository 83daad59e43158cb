"""The tasks API over HTTP on every backend that keeps status, with real workers: the list and
its counts, live events (Server-Sent Events through a real server), and retrying a failed call.

The harness (the contract app, its workers) is the one of `test_handle_contract`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import pytest
import uvicorn
from fastapi import FastAPI

from tests.contract.test_handle_contract import Harness, _until
from tests.contract.test_handle_contract import h as h
from tests.contract.test_handle_contract import harness as harness

pytestmark = pytest.mark.parametrize(
    "harness",
    ["inprocess", "inprocess-shared", "celery-redis", "celery-amqp", "arq"],
    indirect=True,
)


@pytest.fixture
async def api(h: Harness) -> AsyncIterator[tuple[httpx.AsyncClient, Harness]]:
    """A real uvicorn server on this test's loop serving `h.bridge.router()`, and a client."""
    app = FastAPI()
    app.include_router(h.bridge.router())
    server = uvicorn.Server(uvicorn.Config(app, port=0, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    await _until(lambda: server.started, 10, "the server to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        yield client, h
    server.should_exit = True
    await serving


async def _settled(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        body: dict[str, Any] = (await client.get(f"/tasks/{task_id}")).json()
        return body if body.get("state") in ("succeeded", "failed", "cancelled") else None

    settled: dict[str, Any] = await _until(done, 30, f"call {task_id} to settle")
    return settled


async def test_the_list_pages_newest_first_with_filters_and_counts(
    api: tuple[httpx.AsyncClient, Harness],
) -> None:
    client, h = api
    add, boom = h.task("add"), h.task("boom")
    ids = []
    for n in range(5):
        ids.append((await add.enqueue(n, 1)).id)
        ids.append((await boom.enqueue(f"no {n}")).id)
    for task_id in ids:
        await _settled(client, task_id)
    # page through this test's two tasks, two at a time: newest first, each call once
    seen: list[dict[str, Any]] = []
    for task in (add.name, boom.name):
        cursor: str | None = None
        while True:
            params = {"task": task, "limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/tasks", params=params)).json()
            seen += page["items"]
            cursor = page["next"]
            if cursor is None:
                break
    mine = [item for item in seen if item["id"] in ids]
    assert sorted(item["id"] for item in mine) == sorted(ids)
    assert {i["task_name"]: i["state"] for i in mine} == {
        add.name: "succeeded",
        boom.name: "failed",
    }
    newest_first = [i["enqueued_at"] for i in seen if i["task_name"] == boom.name]
    assert newest_first == sorted(newest_first, reverse=True)
    # a state filter only lists calls in that state; backend filters to one alias
    failed = (await client.get("/tasks", params={"state": "failed", "limit": 500})).json()
    assert {i["state"] for i in failed["items"]} == {"failed"}
    assert {i["id"] for i in mine if i["state"] == "failed"} <= {i["id"] for i in failed["items"]}
    backend = mine[0]["backend"]
    other = (await client.get("/tasks", params={"backend": "no-such-alias"})).json()
    assert other == {"items": [], "next": None}
    assert (await client.get("/tasks", params={"backend": backend})).json()["items"]
    stats = (await client.get("/tasks/stats")).json()
    assert stats["tasks"][boom.name]["failed"] >= 5
    assert stats["tasks"][add.name]["succeeded"] >= 5
    assert stats["total"] == sum(stats["states"].values())
    # bad input is a clear 4xx, not a 500
    assert (await client.get("/tasks", params={"cursor": "nonsense"})).status_code == 400
    assert (await client.get("/tasks", params={"state": "sleeping"})).status_code == 422
    assert (await client.get("/tasks", params={"limit": 0})).status_code == 422


async def _events(
    client: httpx.AsyncClient, task_id: str, last_event_id: str | None = None
) -> AsyncIterator[tuple[str | None, dict[str, Any]]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with client.stream("GET", f"/tasks/{task_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event_id, data = None, None
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "" and data is not None:
                yield event_id, data
                event_id, data = None, None


async def test_events_push_progress_and_end_with_the_final_state(
    api: tuple[httpx.AsyncClient, Harness],
) -> None:
    client, h = api
    key = h.unique("go")
    handle = await h.task("progress_then_wait").enqueue(key)
    received: list[tuple[str | None, dict[str, Any]]] = []
    async with contextlib.aclosing(_events(client, handle.id)) as stream:
        async for event_id, status in stream:
            received.append((event_id, status))
            if status.get("progress") == 0.5:
                h.record.set(key, 1)  # let it finish only once its progress came through
    states = [status["state"] for _, status in received]
    assert states[-1] == "succeeded", states
    assert any(s["progress"] == 0.5 and s["state"] == "running" for _, s in received), received
    assert len({event_id for event_id, _ in received}) == len(received)  # one id per change
    # a client that saw the final event and reconnects is told there is nothing more
    last = received[-1][0]
    assert last is not None
    answer = await client.get(f"/tasks/{handle.id}/events", headers={"Last-Event-ID": last})
    assert answer.status_code == 204
    # one that reconnects with an older id gets the current state at once, then the end
    again = [s async for _, s in _events(client, handle.id, received[0][0])]
    assert [s["state"] for s in again] == ["succeeded"]
    assert (await client.get("/tasks/not-a-call/events")).status_code == 404


async def test_a_failed_call_is_retried_with_its_arguments(
    api: tuple[httpx.AsyncClient, Harness],
) -> None:
    client, h = api
    failed = await h.task("boom").enqueue("first try")
    assert (await _settled(client, failed.id))["state"] == "failed"
    answer = await client.post(f"/tasks/{failed.id}/retry")
    assert answer.status_code == 200, answer.text
    again = answer.json()
    assert again["id"] != failed.id and again["retry_of"] == failed.id
    assert again["task_name"] == h.task("boom").name
    settled = await _settled(client, again["id"])
    assert settled["state"] == "failed"
    assert settled["retry_of"] == failed.id  # the link is kept in the call's own status too
    assert settled["error"]["message"] == "first try"  # the same arguments
    listed = (await client.get("/tasks", params={"task": h.task("boom").name})).json()
    assert {i["id"]: i["retry_of"] for i in listed["items"]}.get(again["id"]) == failed.id
    # a call that did not fail cannot be retried; an unknown one is not found
    fine = await h.task("add").enqueue(1, 1)
    await _settled(client, fine.id)
    refused = await client.post(f"/tasks/{fine.id}/retry")
    assert refused.status_code == 409
    assert "only failed or cancelled calls can be retried" in refused.json()["detail"]
    assert (await client.post("/tasks/not-a-call/retry")).status_code == 404


async def test_a_cancelled_call_is_retried(api: tuple[httpx.AsyncClient, Harness]) -> None:
    client, h = api
    key = h.unique("later")
    handle = await h.task("mark").using(delay=30).enqueue(key)
    assert (await client.delete(f"/tasks/{handle.id}")).status_code == 200
    assert (await _settled(client, handle.id))["state"] == "cancelled"
    answer = await client.post(f"/tasks/{handle.id}/retry")
    assert answer.status_code == 200, answer.text
    settled = await _settled(client, answer.json()["id"])
    assert settled["state"] == "succeeded"
    assert h.record.get(key) == b"1"
