"""The in-process backend with `status_url`, on a real Redis: API processes see each other's
calls (status, list, counts, events), retry and cancel them; the writer sends off the request's
path and flushes on close; a lost or frozen Redis fails no request and no task, and what waited
is written once it is back. Two bridges in one test stand for two processes, and one test runs
the shop example under `uvicorn --workers 2`."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2 as httpx
import pytest
import redis
import redis.asyncio
from fastapi import FastAPI
from fastapi.testclient import TestClient

from conftest import WorkerProcess, wait_until
from taskbridge import (
    ConfigurationError,
    TaskBridge,
    TaskNotRetryable,
    Tasks,
    TaskStatus,
    report_progress,
)
from taskbridge._dev import free_port
from taskbridge._ledger import RedisIndex
from tests.faults.proxy import FaultProxy
from tests.faults.sentinel import MASTER_NAME, SentinelCluster
from tests.faults.servers import OwnRedis

ROOT = Path(__file__).resolve().parents[1]
GATES: dict[str, asyncio.Event] = {}
"""Events the test sets to let a waiting task go on, by key."""


@pytest.fixture
def prefix(unique_name: Callable[[str], str], redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted after it."""
    name = unique_name("shared")
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{name}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def settings(url: str, prefix: str, **options: Any) -> dict[str, Any]:
    inprocess = {"status_url": url, "status_prefix": prefix, **options}
    return {"backends": {"inprocess": inprocess}}


class Process:
    """What one API process holds: a bridge with the test's tasks, registered by name."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.bridge = bridge = TaskBridge(config)
        self.ran: list[tuple[str, Any]] = []

        @bridge.task(name="shared.add")
        def add(a: int, b: int) -> int:
            return a + b

        @bridge.task(name="shared.boom")
        async def boom(message: Any, *, code: int = 0) -> None:
            self.ran.append(("boom", message))
            raise ValueError(str(message))

        @bridge.task(name="shared.wait")
        async def wait(key: str) -> str:
            await GATES[f"{key}:1"].wait()
            report_progress(0.5, key)
            await GATES[f"{key}:2"].wait()
            return key

        @bridge.task(name="shared.block")
        def block(seconds: float) -> None:
            time.sleep(seconds)

        self.add, self.boom, self.wait, self.block = add, boom, wait, block


async def until(
    read: Callable[[], Awaitable[TaskStatus]], done: Callable[[TaskStatus], bool], what: str
) -> TaskStatus:
    deadline = time.monotonic() + 10
    while True:
        status = await read()
        if done(status):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last: {status}")
        await asyncio.sleep(0.01)


def settled(status: TaskStatus) -> bool:
    return status.done


def gates(key: str) -> tuple[asyncio.Event, asyncio.Event]:
    GATES[f"{key}:1"], GATES[f"{key}:2"] = first, second = asyncio.Event(), asyncio.Event()
    return first, second


async def test_two_processes_see_each_others_calls(redis_url: str, prefix: str) -> None:
    a, b = Process(settings(redis_url, prefix)), Process(settings(redis_url, prefix))
    await a.bridge.open()
    await b.bridge.open()
    try:
        ok = await a.add.enqueue(1, 2)
        bad = await a.boom.enqueue("no", code=3)
        key = uuid.uuid4().hex
        first, second = gates(key)
        slow = await a.wait.enqueue(key)
        mine = await b.add.enqueue(5, 5)
        # status of A's calls, read in B (from Redis), and of B's, read in A
        done = await until(b.bridge.handle(ok.id).info, settled, "A's call, seen from B")
        assert (done.state, done.result, done.backend, done.task_name) == (
            "succeeded",
            3,
            "inprocess",
            "shared.add",
        )
        failed = await until(b.bridge.handle(bad.id).info, settled, "A's failure, from B")
        assert failed.state == "failed" and failed.error is not None
        assert failed.error.message == "no" and failed.error.traceback is not None
        assert "in boom" in failed.error.traceback
        assert (failed.args, failed.kwargs) == (["no"], {"code": 3})
        assert (await until(a.bridge.handle(mine.id).info, settled, "B's, from A")).result == 10
        # the list and the counts are every process's, from either
        for bridge in (a.bridge, b.bridge):
            page = await bridge.list_calls(limit=50)
            assert {item.id for item in page.items} == {ok.id, bad.id, slow.id, mine.id}
            order = [(item.enqueued_at, item.id) for item in page.items]
            assert order == sorted(order, reverse=True)
            failures = await bridge.list_calls(state="failed")
            assert [item.id for item in failures.items] == [bad.id]
            stats = await bridge.stats()
            assert stats.tasks["shared.add"] == {"succeeded": 2}
            assert stats.tasks["shared.boom"] == {"failed": 1}
        # B watches A's running call: woken by its progress and by its end, as A publishes them
        running = await until(
            b.bridge.handle(slow.id).info, lambda s: s.state == "running", "A's call to run"
        )
        assert running.progress is None
        watching = b.bridge.watch(slow.id, "inprocess")
        assert watching is not None
        async with watching as changed:
            changed.clear()
            first.set()
            await asyncio.wait_for(changed.wait(), 5)
            changed.clear()
            progressed = await b.bridge.handle(slow.id).info()
            assert (progressed.progress, progressed.progress_message) == (0.5, key)
            second.set()
            while (status := await b.bridge.handle(slow.id).info()).state != "succeeded":
                await asyncio.wait_for(changed.wait(), 5)
                changed.clear()
        assert status.result == key
    finally:
        await a.bridge.close()
        await b.bridge.close()


async def test_retry_and_cancel_from_another_process(redis_url: str, prefix: str) -> None:
    a, b = Process(settings(redis_url, prefix)), Process(settings(redis_url, prefix))
    await a.bridge.open()
    await b.bridge.open()
    try:
        bad = await a.boom.enqueue("again", code=1)
        opaque = await a.boom.enqueue(object())  # not JSON: kept in A only
        for handle in (bad, opaque):
            await until(b.bridge.handle(handle.id).info, settled, "A's failure, from B")
        retried = await b.bridge.retry(bad.id)  # runs in B, with the arguments A kept
        status = await until(b.bridge.handle(retried.id).info, settled, "the retry")
        assert (status.state, status.retry_of, status.args) == ("failed", bad.id, ["again"])
        assert ("boom", "again") in b.ran
        with pytest.raises(TaskNotRetryable, match="arguments were not kept"):
            await b.bridge.retry(opaque.id)
        again = await a.bridge.retry(opaque.id)  # where they were kept, it runs again
        await until(a.bridge.handle(again.id).info, settled, "the retry in A")
        assert [kind for kind, _ in a.ran] == ["boom", "boom", "boom"]
        # cancel from B: A cancels its running async call, and B answers what A did
        key = uuid.uuid4().hex
        gates(key)
        slow = await a.wait.enqueue(key)
        await until(b.bridge.handle(slow.id).info, lambda s: s.state == "running", "running")
        result = await b.bridge.handle(slow.id).cancel()
        assert (result.cancelled, result.state, result.detail) == (
            True,
            "cancelled",
            "cancelled while running",
        )
        assert (await a.bridge.handle(slow.id).info()).state == "cancelled"
        await until(b.bridge.handle(slow.id).info, settled, "the cancellation, seen from B")
        kept = await b.bridge.backend("inprocess").kept_call(slow.id)
        assert kept is not None and kept.args == (key,)
        # a running def task cannot be interrupted: A says so, B passes it on
        blocking = await a.block.enqueue(1.0)
        await until(b.bridge.handle(blocking.id).info, lambda s: s.state == "running", "running")
        refused = await b.bridge.handle(blocking.id).cancel()
        assert not refused.cancelled and "cannot be interrupted" in refused.detail
        # finished, unknown, and a call whose process does not answer (gone)
        finished = await b.bridge.handle(bad.id).cancel()
        assert (finished.cancelled, finished.detail) == (False, "already failed")
        unknown = await b.bridge.handle(str(uuid.uuid4())).cancel()
        assert (unknown.cancelled, unknown.state) == (False, "unknown")
        orphan = str(uuid.uuid4())
        record = {"task_name": "shared.wait", "backend": "inprocess", "state": "running"}
        client = redis.Redis.from_url(redis_url)
        client.set(f"{prefix}:call:{orphan}", json.dumps(record), ex=60)
        client.close()
        silent = await b.bridge.handle(orphan).cancel()
        assert (silent.cancelled, silent.state) == (False, "running")
        assert "did not answer" in silent.detail
    finally:
        await a.bridge.close()
        await b.bridge.close()


async def test_the_writer_gathers_changes_and_flushes_on_close(redis_url: str, prefix: str) -> None:
    process = Process(settings(redis_url, prefix, status_flush_interval=60))
    client = redis.asyncio.Redis.from_url(redis_url)
    await process.bridge.open()
    try:
        first = await process.add.enqueue(1, 1)  # the first change after a quiet spell: at once
        deadline = time.monotonic() + 5
        while not await client.exists(f"{prefix}:call:{first.id}"):
            assert time.monotonic() < deadline, "the first call was not written"
            await asyncio.sleep(0.01)
        others = [(await process.add.enqueue(n, 1)).id for n in range(5)]
        for task_id in others:
            await until(process.bridge.handle(task_id).info, settled, "the calls to run")
        await asyncio.sleep(0.1)
        assert await client.exists(*(f"{prefix}:call:{i}" for i in others)) == 0  # waiting
    finally:
        await process.bridge.close()
    try:
        for task_id in [first.id, *others]:
            raw = await client.get(f"{prefix}:call:{task_id}")
            assert raw is not None and json.loads(raw)["state"] == "succeeded"
            assert 0 < await client.pttl(f"{prefix}:call:{task_id}") <= 3_600_000
        index = RedisIndex(client, prefix, ttl=3600, max_entries=100)
        page = await index.page(state="succeeded", task=None, after=None, limit=10)
        assert {e.id for e in page.entries} == {first.id, *others}
    finally:
        await client.aclose()


def _app(config: dict[str, Any]) -> tuple[FastAPI, TaskBridge]:
    bridge = TaskBridge(config)

    @bridge.task(name="down.double")
    def double(n: int) -> int:
        return 2 * n

    app = FastAPI(lifespan=bridge.lifespan)
    app.include_router(bridge.router())

    @app.post("/double/{n}")
    async def post(n: int, tasks: Tasks) -> dict[str, str]:
        return {"id": tasks.add_task(double, n).id}

    return app, bridge


def test_losing_redis_fails_no_request_and_no_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    own = OwnRedis(tmp_path / "redis")
    own.start()
    app, _ = _app(settings(own.url(9), "down"))
    direct = own.client(9)
    try:
        with TestClient(app) as client, caplog.at_level(logging.INFO, "taskbridge"):
            before = client.post("/double/1").json()["id"]
            wait_until(lambda: direct.get(f"down:call:{before}"), 5, "the first record")
            own.kill()
            ids = []
            for n in range(2, 7):
                began = time.monotonic()
                answer = client.post(f"/double/{n}")
                assert answer.status_code == 200 and time.monotonic() - began < 1
                ids.append(answer.json()["id"])
            for n, task_id in enumerate(ids, start=2):
                status = client.get(f"/tasks/{task_id}").json()  # this process's own store
                assert (status["state"], status["result"]) == ("succeeded", 2 * n)
            listed = client.get("/tasks", params={"limit": 50})
            assert listed.status_code == 200  # this process's calls, while Redis is away
            assert set(ids) <= {item["id"] for item in listed.json()["items"]}
            assert client.get("/tasks/stats").json()["states"]["succeeded"] >= 5
            time.sleep(1.0)  # several writes fail meanwhile (backoff 0.1, 0.2, 0.4 s)
            kept_here = "status is kept in this process"
            assert sum(kept_here in r.getMessage() for r in caplog.records) == 1
            own.start()  # empty: what waited is written again, the index rebuilt
            for task_id in ids:
                key = f"down:call:{task_id}"
                wait_until(partial(direct.exists, key), 10, "the records")
                raw = direct.get(key)
                assert isinstance(raw, bytes) and json.loads(raw)["state"] == "succeeded"
            assert any("reachable again" in r.getMessage() for r in caplog.records)
            wait_until(
                lambda: (
                    set(ids)
                    <= {i["id"] for i in client.get("/tasks", params={"limit": 50}).json()["items"]}
                ),
                10,
                "the index to list them again",
            )
    finally:
        direct.close()
        own.stop()


async def test_a_frozen_redis_holds_up_nothing(redis_url: str, prefix: str) -> None:
    parts = urlsplit(redis_url)
    proxy = FaultProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    proxy.start()
    url = f"redis://127.0.0.1:{proxy.port}{parts.path}"
    process = Process(settings(url, prefix))
    await process.bridge.open()
    try:
        await until(
            process.bridge.handle((await process.add.enqueue(0, 0)).id).info, settled, "a call"
        )
        proxy.freeze()
        began = time.monotonic()
        handles = [await process.add.enqueue(n, 1) for n in range(3)]
        for handle in handles:
            status = await until(handle.info, settled, "the calls, while Redis hangs")
            assert status.state == "succeeded"
        assert time.monotonic() - began < 1.5  # (the store's timeout is 2 s)
        proxy.heal()
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            keys = [f"{prefix}:call:{handle.id}" for handle in handles]
            deadline = time.monotonic() + 10
            while await client.exists(*keys) < len(keys):
                assert time.monotonic() < deadline, "the records were not written after the heal"
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()
    finally:
        proxy.heal()
        await process.bridge.close()
        proxy.close()


async def test_through_redis_sentinel(tmp_path: Path) -> None:
    with SentinelCluster(tmp_path / "sentinel") as cluster:
        config = settings(cluster.url(3), "sentinel", status_sentinel_master=MASTER_NAME)
        a, b = Process(config), Process(config)
        await a.bridge.open()
        await b.bridge.open()
        try:
            handle = await a.add.enqueue(20, 22)
            status = await until(b.bridge.handle(handle.id).info, settled, "via the Sentinel")
            assert status.result == 42
            assert "sentinel://127.0.0.1" in await b.bridge.backend("inprocess").ping()
        finally:
            await a.bridge.close()
            await b.bridge.close()


def test_options_are_checked_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    variable = "TASKBRIDGE_BACKENDS__INPROCESS__STATUS_URL"
    for url, expected in [
        ("http://localhost:6379", "is not a Redis URL"),
        ("redis://", "names no host"),
        ("sentinel://localhost", "with its port"),
        ("sentinel://a:1/1;sentinel://b:2/2", "read from the first sentinel:// URL only"),
    ]:
        with pytest.raises(ConfigurationError, match=variable) as error:
            TaskBridge(settings(url, "x")).validate()
        assert expected in str(error.value)
    # without redis-py installed: the option names the extra to install
    for module in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, module)
    for module in ("taskbridge.backends._shared", "taskbridge.backends._status_writer"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigurationError, match=re.escape("fastapi-taskbridge[redis]")) as error:
        TaskBridge(settings("redis://localhost:6379/0", "x")).validate()
    assert variable in str(error.value)
    TaskBridge().validate()  # without status_url, redis-py is not needed


ACCESS = re.compile(r'pid=(\d+) uvicorn\.access .*"(GET|POST) (\S+) HTTP/1\.1" (\d+)')


def test_two_uvicorn_workers_answer_for_each_others_calls(
    redis_url: str, prefix: str, spawn_process: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """The shop example under `uvicorn --workers 2`: a status URL answers 200 whichever
    process gets the GET (the access log, with each line's pid, says which one did)."""
    log_config = tmp_path / "log.json"
    log_config.write_text(json.dumps(_LOGGING))
    port = free_port()
    server = spawn_process(
        [
            *(sys.executable, "-m", "uvicorn", "examples.shop.app:app", "--workers", "2"),
            *("--host", "127.0.0.1", "--port", str(port), "--log-config", str(log_config)),
        ],
        env={
            "TASKBRIDGE_BACKENDS__INPROCESS__STATUS_URL": redis_url,
            "TASKBRIDGE_BACKENDS__INPROCESS__STATUS_PREFIX": prefix,
        },
        cwd=ROOT,
    )
    server.wait_for_output(r"(?s)(Application startup complete.*){2}", timeout=60)
    seen = 0

    def answered_by() -> int:
        """The pid that answered the last request (requests are sequential, and uvicorn logs
        each before it sends the answer)."""
        nonlocal seen
        seen += 1
        wait_until(lambda: len(ACCESS.findall(server.output)) >= seen, 10, "the access log")
        return int(ACCESS.findall(server.output)[seen - 1][0])

    # a new connection per request, so that requests spread over both processes
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Connection": "close"}, timeout=10
    ) as client:
        calls = []
        for n in range(10):
            answer = client.post(f"/reports/2026-{n + 1:02d}", params={"rounds": 1000})
            assert answer.status_code == 200, answer.text
            calls.append((answer.json(), answered_by()))
        # another process sees a call once its writer sent it: a moment after the dispatch
        # (a worker's first call waits for its loop's first hand-off to a thread, ~0.1 s)
        store = redis.Redis.from_url(redis_url)
        try:
            for body, _ in calls:
                key = f"{prefix}:call:{body['report']}"
                wait_until(partial(store.exists, key), 10, "the calls' records")
        finally:
            store.close()
        answers = []
        for body, dispatched_by in calls:
            for _ in range(10):
                answer = client.get(body["status"])
                answers.append((answer, body["report"], dispatched_by, answered_by()))
        for extra in range(200):  # should every GET have landed where the call ran: more
            if any(pid != owner for _, _, owner, pid in answers):
                break
            body, dispatched_by = calls[extra % len(calls)]
            answer = client.get(body["status"])
            answers.append((answer, body["report"], dispatched_by, answered_by()))
    for answer, task_id, _, _ in answers:
        assert answer.status_code == 200, answer.text
        status = answer.json()
        assert (status["id"], status["task_name"]) == (
            task_id,
            "examples.shop.app.build_sales_report",
        )
    assert len({pid for _, _, _, pid in answers}) == 2
    assert sum(pid != owner for _, _, owner, pid in answers) >= 1


_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"pid": {"format": "pid=%(process)d %(name)s %(message)s"}},
    "handlers": {
        "out": {"class": "logging.StreamHandler", "formatter": "pid", "stream": "ext://sys.stdout"}
    },
    "loggers": {
        "uvicorn": {"handlers": ["out"], "level": "INFO", "propagate": False},
        "uvicorn.access": {"handlers": ["out"], "level": "INFO", "propagate": False},
        "taskbridge": {"handlers": ["out"], "level": "WARNING", "propagate": False},
    },
}
"""uvicorn's logging, with each line's pid (the app itself is left as it is)."""
