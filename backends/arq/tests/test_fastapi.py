"""A FastAPI app whose `Tasks` route to ARQ: a 2xx response means the worker gets the tasks."""

from __future__ import annotations

import socket
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.testclient import TestClient

from taskbridge import TaskBridge, Tasks

from .conftest import ArqApp, monitor, wait_until


def test_a_requests_tasks_go_in_one_round_trip_and_the_worker_runs_them(
    arq_app: ArqApp, redis_url: str, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    key = unique_name("signup")
    with TestClient(arq_app.module.app) as client, monitor(redis_url) as commands:
        response = client.post("/signup", params={"key": key})
    assert response.status_code == 200
    ids = response.json()["ids"]
    arq_jobs.extend(ids)

    # The 2xx came after Redis accepted all five, in a single command: the script.
    assert len(ids) == 5
    [script] = [c for c in commands if c.is_enqueue and ids[0] in c.command]
    assert all(job_id in script.command for job_id in ids)
    # Nothing else was sent about these jobs on the connection that sent the script (the
    # worker, which is quick, picks them up on its own connections meanwhile).
    sent = [c for c in commands if c.port == script.port and any(i in c.command for i in ids)]
    assert sent == [script]

    wait_until(lambda: len(arq_app.records(key)) == 5, 15, "the worker to run the 5 tasks")
    records = {record["id"]: record for record in arq_app.records(key)}
    assert set(records) == set(ids)
    assert {record["pid"] for record in records.values()} == {arq_app.worker.process.pid}
    assert sorted((r["args"][0], r["args"][1]) for r in records.values()) == [
        ("async", 0),
        ("async", 1),
        ("sync", 0),
        ("sync", 1),
        ("sync", 2),
    ]


def test_redis_down_answers_503_and_the_app_still_starts() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bridge = TaskBridge(
        settings={"backends": {"arq": {"redis_url": f"redis://127.0.0.1:{port}/9"}}}
    )

    @bridge.task(backend="arq", name="arqtest.unreachable")
    def unreachable() -> None: ...

    app = FastAPI(lifespan=bridge.lifespan)

    @app.post("/work")
    async def work(tasks: Tasks) -> dict[str, str]:
        return {"id": tasks.add_task(unreachable).id}

    with TestClient(app) as client:
        response = client.post("/work")
    assert response.status_code == 503
    assert "Retry-After" in response.headers
