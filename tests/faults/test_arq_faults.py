"""Faults on ARQ workers: SIGKILL mid-batch loses nothing; SIGTERM lets the running task finish.

Every task records its id in a Redis set (and counts its runs), so the test sees exactly which
calls ran and how often. ARQ re-runs a job whose worker died once the job's in-progress lock
expires: its `job_timeout` plus ARQ's 10 s, plus our 1 s grace (the bound the README states).
"""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis

from conftest import WorkerProcess, wait_until

APP = """
import asyncio
import os

import redis.asyncio

from taskbridge import TaskBridge, current_task

bridge = TaskBridge()
_clients = []


def _client():
    if not _clients:
        _clients.append(redis.asyncio.Redis.from_url(os.environ["RECORD_URL"]))
    return _clients[0]


@bridge.task(backend="arq")
async def work(n: int, seconds: float) -> int:
    key = os.environ["RECORD_KEY"]
    await _client().hincrby(key + ":started", current_task().id, 1)
    await asyncio.sleep(seconds)
    await _client().hincrby(key + ":runs", current_task().id, 1)
    return n
"""

JOB_TIMEOUT = 3  # seconds; a dead worker's jobs come back after 3 + 1 + 10 s


@pytest.fixture
def arq_app(
    tmp_path: Path,
    redis_url: str,
    unique_name: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[ModuleType, dict[str, str]]]:
    (tmp_path / "faulty_arq_app.py").write_text(APP)
    env = {
        "RECORD_URL": redis_url,
        "RECORD_KEY": unique_name("record"),
        "TASKBRIDGE_BACKENDS__ARQ__REDIS_URL": redis_url,
        "TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME": unique_name("queue"),
        "TASKBRIDGE_BACKENDS__ARQ__HEALTH_CHECK_KEY": unique_name("health"),
        "TASKBRIDGE_BACKENDS__ARQ__JOB_TIMEOUT": str(JOB_TIMEOUT),
        "TASKBRIDGE_BACKENDS__ARQ__MAX_JOBS": "20",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("faulty_arq_app", tmp_path / "faulty_arq_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["faulty_arq_app"] = module
    spec.loader.exec_module(module)
    yield module, env
    sys.modules.pop("faulty_arq_app", None)


def _enqueue(module: ModuleType, count: int, seconds: float) -> list[str]:
    async def go() -> list[str]:
        bridge = module.bridge
        await bridge.open()
        try:
            handles = [await module.work.enqueue(n, seconds) for n in range(count)]
        finally:
            await bridge.close()
        return [h.id for h in handles]

    return asyncio.run(go())


def test_sigkill_mid_batch_loses_no_task(
    arq_app: tuple[ModuleType, dict[str, str]],
    redis_url: str,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    module, env = arq_app
    ids = _enqueue(module, 200, 0.05)
    record = redis.Redis.from_url(redis_url)
    key = env["RECORD_KEY"]
    try:
        first = spawn_worker(["worker", "arq", "faulty_arq_app:bridge"], env=env)
        wait_until(lambda: record.hlen(key + ":runs") >= 40, 30, "the first worker to get going")
        first.signal(signal.SIGKILL)
        first.process.wait(10)
        killed_at = time.monotonic()
        finished_before_kill = set(record.hkeys(key + ":runs"))
        assert len(finished_before_kill) < 200, "the kill must land mid-batch"
        # a job counts as done for ARQ once its result is stored; any other may run again
        unsettled = {job for job in ids if not record.exists(f"arq:result:{job}")}

        spawn_worker(["worker", "arq", "faulty_arq_app:bridge"], env=env)
        bound = JOB_TIMEOUT + 1 + 10 + 15
        wait_until(lambda: record.hlen(key + ":runs") == 200, bound, "every task to have run")
        recovered_in = time.monotonic() - killed_at
        runs = {k.decode(): int(v) for k, v in record.hgetall(key + ":runs").items()}
    finally:
        record.delete(key + ":started", key + ":runs")
        _forget_jobs(record, ids)
        record.close()
    assert set(runs) == set(ids)
    twice = {job for job, count in runs.items() if count > 1}
    # at-least-once: only a job whose worker died before storing its result may run again
    assert twice <= unsettled
    assert recovered_in < bound


def _forget_jobs(record: redis.Redis, ids: list[str]) -> None:
    prefixes = ("arq:job:", "arq:result:", "arq:in-progress:", "arq:retry:", "taskbridge:progress:")
    record.delete(*(prefix + job for job in ids for prefix in prefixes))


def test_sigterm_lets_the_running_task_finish(
    arq_app: tuple[ModuleType, dict[str, str]],
    redis_url: str,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    module, env = arq_app
    env = {**env, "TASKBRIDGE_BACKENDS__ARQ__JOB_COMPLETION_WAIT": "10"}
    [job] = _enqueue(module, 1, 1.0)
    record = redis.Redis.from_url(redis_url)
    key = env["RECORD_KEY"]
    try:
        worker = spawn_worker(["worker", "arq", "faulty_arq_app:bridge"], env=env)
        wait_until(lambda: record.hexists(key + ":started", job), 30, "the task to start")
        worker.signal(signal.SIGTERM)
        assert worker.process.wait(20) == 0
        # it finished before the worker exited: drained, not cancelled and lost
        assert record.hget(key + ":runs", job) == b"1"
    finally:
        record.delete(key + ":started", key + ":runs")
        _forget_jobs(record, [job])
        record.close()
