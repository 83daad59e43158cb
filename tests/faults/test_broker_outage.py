"""Fault: the broker goes away while requests arrive.

A Redis server of the test's own (append-only file, fsync always, so a restart keeps what it
accepted) is the broker of both an ARQ and a Celery backend. Requests each queue one call on
each. Mid-run the broker is killed (connections refused) or frozen with SIGSTOP (connections
hang); later it comes back. Every request must answer promptly: 200 when its calls were
accepted, 503 with Retry-After otherwise. After the broker is back, real workers run every call
of every 200 request.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx2 as httpx
import pytest
import redis

from conftest import WorkerProcess
from tests.faults.servers import OwnRedis

APP = """
import os

import redis
from fastapi import FastAPI

from taskbridge import TaskBridge, Tasks

bridge = TaskBridge()
_clients = []


def _record(entry):
    if not _clients:
        _clients.append(redis.Redis.from_url(os.environ["RECORD_URL"]))
    _clients[0].sadd(os.environ["RECORD_KEY"], entry)


@bridge.task(backend="arq")
async def arq_job(n: int) -> None:
    _record(f"arq:{n}")


@bridge.task(backend="celery")
def celery_job(n: int) -> None:
    _record(f"celery:{n}")


app = FastAPI(lifespan=bridge.lifespan)


@app.post("/{n}")
async def endpoint(n: int, tasks: Tasks) -> dict[str, int]:
    tasks.add_task(arq_job, n)
    tasks.add_task(celery_job, n)
    return {"n": n}
"""

DISPATCH_TIMEOUT = 1.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "broker", persistent=True)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.workdir, ignore_errors=True)


def _load(path: Path) -> ModuleType:
    # the module's name is part of each task's name, so it must be the one workers import
    spec = importlib.util.spec_from_file_location("outage_app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _fire(client: httpx.AsyncClient, numbers: range, results: dict[int, Any]) -> None:
    async def one(n: int) -> None:
        started = time.monotonic()
        response = await client.post(f"/{n}")
        results[n] = (response.status_code, time.monotonic() - started, response.headers)

    for chunk in range(numbers.start, numbers.stop, 8):
        await asyncio.gather(*(one(n) for n in range(chunk, min(chunk + 8, numbers.stop))))


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_requests_during_a_broker_outage_get_503_and_accepted_calls_all_run(
    fault: str,
    broker: OwnRedis,
    redis_url: str,
    unique_name: Callable[[str], str],
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "outage_app.py").write_text(APP)
    env = {
        "RECORD_URL": redis_url,
        "RECORD_KEY": unique_name("ran"),
        "TASKBRIDGE_DISPATCH_TIMEOUT": str(DISPATCH_TIMEOUT),
        "TASKBRIDGE_UNAVAILABLE_RETRY_AFTER": "3",
        "TASKBRIDGE_BACKENDS__ARQ__REDIS_URL": broker.url(1),
        "TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME": unique_name("arq"),
        "TASKBRIDGE_BACKENDS__ARQ__SOCKET_TIMEOUT": str(DISPATCH_TIMEOUT),
        "TASKBRIDGE_BACKENDS__CELERY__BROKER_URL": broker.url(2),
        "TASKBRIDGE_BACKENDS__CELERY__DEFAULT_QUEUE": unique_name("celery"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    app_module = _load(tmp_path / "outage_app.py")
    results: dict[int, Any] = {}

    async def scenario() -> None:
        app = app_module.app
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                await _fire(client, range(0, 40), results)
                if fault == "killed":
                    broker.kill()
                else:
                    broker.signal(signal.SIGSTOP)
                await _fire(client, range(40, 64), results)
                if fault == "killed":
                    broker.start()
                else:
                    broker.signal(signal.SIGCONT)
                await _fire(client, range(64, 104), results)

    asyncio.run(scenario())

    statuses = {n: status for n, (status, _, _) in results.items()}
    assert set(statuses.values()) <= {200, 503}
    assert all(statuses[n] == 200 for n in range(0, 40)), "before the outage"
    assert all(statuses[n] == 503 for n in range(40, 64)), "during the outage"
    assert sum(statuses[n] == 200 for n in range(64, 104)) >= 32, "after the broker came back"
    assert all(results[n][2]["retry-after"] == "3" for n in statuses if statuses[n] == 503)
    slowest = max(duration for _, duration, _ in results.values())
    assert slowest < DISPATCH_TIMEOUT + 2, f"a request took {slowest:.1f}s: dispatch must not hang"

    workers = [
        spawn_worker(["worker", backend, "outage_app:bridge"], env=env)
        for backend in ("arq", "celery")
    ]
    accepted = [n for n, status in statuses.items() if status == 200]
    expected = {f"{kind}:{n}".encode() for n in accepted for kind in ("arq", "celery")}
    record = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 60
        while not expected <= (ran := record.smembers(env["RECORD_KEY"])):
            if time.monotonic() > deadline:
                missing = sorted(e.decode() for e in expected - ran)
                outputs = "\n\n".join(w.output[-3000:] for w in workers)
                pytest.fail(f"{len(missing)} accepted calls never ran: {missing}\n{outputs}")
            time.sleep(0.05)
    finally:
        record.close()
