"""ARQ's own tools next to taskbridge: `arq --check` on a taskbridge worker, ARQ's own worker
running taskbridge's tasks, and a plain ARQ function receiving a call dispatched by taskbridge.
Every process is real: the `arq` CLI, `taskbridge worker arq`, Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import redis

from conftest import WorkerProcess, wait_until
from taskbridge import TaskBridge

APP = """
import os

import redis

from taskbridge import TaskBridge

bridge = TaskBridge()


@bridge.task(name="native.add", backend="arq", retries=1)
def add(a: int, b: int = 0) -> int:
    redis.Redis.from_url(os.environ["NATIVE_RECORD_URL"]).rpush(
        os.environ["NATIVE_RECORD_KEY"], f"{a + b} {os.getpid()}"
    )
    return a + b
"""

SETTINGS = """
from taskbridge_arq import worker_settings

WorkerSettings = worker_settings("nativeapp:bridge")
"""

PLAIN = """
import os

from arq.connections import RedisSettings
from arq.worker import func

from taskbridge_arq import deserialize, serialize


async def add(ctx, a, b=0):
    # A plain ARQ function: no taskbridge in its signature, no reserved keyword.
    return {"sum": a + b, "job": ctx["job_id"]}


class WorkerSettings:
    functions = [func(add, name="native.add")]
    redis_settings = RedisSettings.from_dsn(os.environ["TASKBRIDGE_BACKENDS__ARQ__REDIS_URL"])
    queue_name = os.environ["TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME"]
    job_serializer = staticmethod(serialize)
    job_deserializer = staticmethod(deserialize)
"""


def _arq(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    arq = [sys.executable, "-c", "from arq.cli import cli; cli()"]
    return subprocess.run(
        [*arq, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _setup(
    tmp_path: Path, redis_url: str, unique_name: Callable[[str], str]
) -> tuple[dict[str, str], str]:
    (tmp_path / "nativeapp.py").write_text(APP)
    (tmp_path / "arqsettings.py").write_text(SETTINGS)
    (tmp_path / "plainarq.py").write_text(PLAIN)
    key = unique_name("ran")
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "TASKBRIDGE_BACKENDS__ARQ__REDIS_URL": redis_url,
        "TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME": unique_name("q"),
        "TASKBRIDGE_BACKENDS__ARQ__HEALTH_CHECK_INTERVAL": "1",
        "NATIVE_RECORD_URL": redis_url,
        "NATIVE_RECORD_KEY": key,
    }
    return env, key


def _bridge(env: dict[str, str]) -> TaskBridge:
    bridge = TaskBridge(
        settings={
            "backends": {
                "arq": {
                    "redis_url": env["TASKBRIDGE_BACKENDS__ARQ__REDIS_URL"],
                    "queue_name": env["TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME"],
                }
            }
        }
    )

    @bridge.task(name="native.add", backend="arq", retries=1)
    def add(a: int, b: int = 0) -> int: ...

    return bridge


async def _enqueue_and_wait(bridge: TaskBridge, *args: int, **kwargs: int) -> object:
    await bridge.open()
    try:
        handle = await bridge.get_task("native.add").enqueue(*args, **kwargs)
        return await handle.result(timeout=30)
    finally:
        await bridge.close()


def test_arq_check_reports_a_taskbridge_worker_healthy_only_while_it_runs(
    tmp_path: Path,
    redis_url: str,
    unique_name: Callable[[str], str],
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    env, _ = _setup(tmp_path, redis_url, unique_name)
    before = _arq(["--check", "arqsettings.WorkerSettings"], tmp_path, env)
    assert before.returncode == 1, before.stdout + before.stderr
    worker = spawn_worker(["worker", "arq", "nativeapp:bridge"], env=env)
    worker.wait_for_output("taskbridge ARQ worker ready")
    wait_until(
        lambda: _arq(["--check", "arqsettings.WorkerSettings"], tmp_path, env).returncode == 0,
        20,
        "arq --check to find the worker's health check",
    )
    checked = _arq(["--check", "arqsettings.WorkerSettings"], tmp_path, env)
    assert "j_complete=" in checked.stdout + checked.stderr


def test_arqs_own_worker_runs_taskbridge_tasks_from_the_exported_settings(
    tmp_path: Path,
    redis_url: str,
    unique_name: Callable[[str], str],
    spawn_process: Callable[..., WorkerProcess],
) -> None:
    env, key = _setup(tmp_path, redis_url, unique_name)
    arq = [sys.executable, "-c", "from arq.cli import cli; cli()", "arqsettings.WorkerSettings"]
    worker = spawn_process(arq, env=env, cwd=tmp_path)
    worker.wait_for_output("Starting worker for 1 functions: native.add")
    assert asyncio.run(_enqueue_and_wait(_bridge(env), 2, b=3)) == 5
    store = redis.Redis.from_url(redis_url)
    try:
        assert [item.decode() for item in store.lrange(key, 0, -1)] == [f"5 {worker.process.pid}"]
    finally:
        store.delete(key)
        store.close()


def test_a_plain_arq_function_receives_a_taskbridge_call_with_its_own_kwargs(
    tmp_path: Path,
    redis_url: str,
    unique_name: Callable[[str], str],
    spawn_process: Callable[..., WorkerProcess],
) -> None:
    env, _ = _setup(tmp_path, redis_url, unique_name)
    arq = [sys.executable, "-c", "from arq.cli import cli; cli()", "plainarq.WorkerSettings"]
    worker = spawn_process(arq, env=env, cwd=tmp_path)
    worker.wait_for_output("Starting worker for 1 functions: native.add")
    result = asyncio.run(_enqueue_and_wait(_bridge(env), 2, b=40))
    # add(ctx, a, b=0) takes no other keyword: a policy among the kwargs would fail the call
    assert isinstance(result, dict) and result["sum"] == 42
