"""Fixtures for the ARQ backend's tests: an app module, one real worker shared by the session,
job key clean-up, and a Redis MONITOR to count round trips."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.constants import result_key_prefix as result_prefix
from taskbridge_arq import DEDUP_KEY_PREFIX, PROGRESS_KEY_PREFIX, WAKE_CHANNEL_PREFIX, ArqBackend

import conftest as root  # the repository's conftest: WorkerProcess, wait_until

APP_SOURCE = '''\
"""Tasks for the ARQ backend's tests, imported by the worker process and by the tests."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

import redis
import redis.asyncio
from fastapi import FastAPI

from taskbridge import TaskBridge, Tasks, current_task, report_progress

PREFIX = {prefix!r}
REDIS_URL = {redis_url!r}
bridge = TaskBridge()
_clients: list[redis.Redis] = []


def _redis() -> redis.Redis:
    if not _clients:
        _clients.append(redis.Redis.from_url(REDIS_URL))
    return _clients[0]


def _record(key: str, **data: Any) -> None:
    context = current_task()
    assert context is not None
    data.update(
        pid=os.getpid(),
        attempt=context.attempt,
        id=context.id,
        backend=context.backend,
        at=time.time(),
        thread=threading.current_thread().name,
    )
    _redis().rpush(f"{{PREFIX}}:{{key}}", json.dumps(data))


@bridge.task(backend="arq")
def record_sync(key: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    _record(key, args=args, kwargs=kwargs)
    return {{"args": list(args), "kwargs": kwargs}}


@bridge.task(backend="arq")
async def record_async(key: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    _record(key, args=args, kwargs=kwargs)
    return {{"args": list(args), "kwargs": kwargs}}


class QuotaError(Exception):
    """An application's own exception, importable by the client."""


@bridge.task(backend="arq")
def fail(kind: str, message: str) -> None:
    if kind == "custom":
        raise QuotaError(message)
    if kind == "local":
        class LocalError(Exception):
            pass

        raise LocalError(message)
    raise ValueError(message)


@bridge.task(backend="arq")
def unserializable() -> object:
    return object()


@bridge.task(backend="arq", retries=3, retry_backoff=0.05, retry_jitter=False)
def flaky(key: str, failures: int) -> int:
    tries = int(_redis().incr(f"{{PREFIX}}:{{key}}"))
    if tries <= failures:
        raise RuntimeError(f"attempt {{tries}} fails")
    return tries


@bridge.task(backend="arq", timeout=0.5)
async def sleepy(key: str, seconds: float) -> str:
    _record(key, event="started")
    await asyncio.sleep(seconds)
    _record(key, event="finished")
    return "slept"


def _gate(key: str) -> str:
    """The list a test pushes to, to let a task waiting on `key` go on."""
    return f"{{PREFIX}}:{{key}}:gate"


@bridge.task(backend="arq")
async def steps_async(key: str) -> dict[str, str]:
    _record(key, event="started")
    report_progress(0.4, "halfway")
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.blpop([_gate(key)], timeout=10)
    finally:
        await client.aclose()
    return {{"done": key}}


@bridge.task(backend="arq")
def steps_sync(key: str) -> dict[str, str]:
    _record(key, event="started")
    report_progress(0.25, "a quarter")
    _redis().blpop([_gate(key)], timeout=10)
    _record(key, event="finished")
    return {{"done": key}}


@bridge.task(backend="arq", timeout=60)
async def guarded(key: str) -> None:
    _record(key, event="started")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        _record(key, event="cancelled")
        raise
    finally:
        _record(key, event="cleanup")


@bridge.task(backend="arq")
def count(key: str) -> int:
    return int(_redis().incr(f"{{PREFIX}}:{{key}}"))


app = FastAPI(lifespan=bridge.lifespan)
app.include_router(bridge.router())


@app.post("/signup")
async def signup(key: str, tasks: Tasks) -> dict[str, list[str]]:
    ids = [tasks.add_task(record_sync, key, "sync", i).id for i in range(3)]
    ids += [tasks.add_task(record_async, key, "async", i).id for i in range(2)]
    return {{"ids": ids}}


@app.post("/orders/{{order}}")
async def place_order(order: str, key: str, tasks: Tasks) -> dict[str, str]:
    return {{"id": tasks.add_task(count.using(key=f"order-{{order}}"), key).id}}
'''


@dataclass
class ArqApp:
    """The test app module, the worker serving its default queue, and how to reach both."""

    module: ModuleType
    worker: root.WorkerProcess
    queue: str
    directory: Path
    env: dict[str, str]
    prefix: str
    redis_url: str

    @property
    def backend(self) -> ArqBackend:
        backend = self.module.bridge.backend("arq")
        assert isinstance(backend, ArqBackend)
        return backend

    def records(self, key: str) -> list[dict[str, Any]]:
        """What the tasks recorded under `key`, oldest first."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            return [json.loads(item) for item in client.lrange(f"{self.prefix}:{key}", 0, -1)]
        finally:
            client.close()

    def events(self, key: str) -> list[str]:
        """The `event` of each record under `key`, oldest first."""
        return [record.get("event", "") for record in self.records(key)]

    def counter(self, key: str) -> int:
        """How many times `count(key)` ran."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            return int(client.get(f"{self.prefix}:{key}") or 0)
        finally:
            client.close()

    def open_gate(self, key: str) -> None:
        """Let the task waiting on `key` (steps_async, steps_sync) go on."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            client.rpush(f"{self.prefix}:{key}:gate", "go")
        finally:
            client.close()


@pytest.fixture(scope="session")
def arq_app(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, run_id: str
) -> Iterator[ArqApp]:
    """The app module in a directory on sys.path, and one real worker for the whole session.

    The worker runs `taskbridge worker arq MODULE:bridge --queue QUEUE` with its settings in
    the environment; poll_delay is 1 s, so anything faster shows the wake-ups at work.
    """
    directory = tmp_path_factory.mktemp("arqapp")
    module_name = f"tbarqapp_{run_id}"
    prefix = f"{run_id}:arq"
    (directory / f"{module_name}.py").write_text(
        APP_SOURCE.format(prefix=prefix, redis_url=redis_url)
    )
    queue = f"{run_id}:arq:shared"
    env = {
        "TASKBRIDGE_BACKENDS__ARQ__REDIS_URL": redis_url,
        "TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME": queue,
        "TASKBRIDGE_BACKENDS__ARQ__POLL_DELAY": "1",
    }
    sys.path.insert(0, str(directory))
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            module = importlib.import_module(module_name)
            module.bridge.settings  # noqa: B018 - read once, while the environment is set
        worker = root.WorkerProcess(
            [
                sys.executable,
                "-m",
                "taskbridge.cli",
                "worker",
                "arq",
                f"{module_name}:bridge",
                "--queue",
                queue,
            ],
            directory,
            {**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )
        try:
            worker.wait_for_output("taskbridge ARQ worker ready")
            yield ArqApp(module, worker, queue, directory, env, prefix, redis_url)
        finally:
            retire(worker)
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop(module_name, None)


def retire(worker: root.WorkerProcess) -> int:
    """Stop a worker (SIGTERM, then SIGKILL) and close its output pipe; return its exit code.

    WorkerProcess.stop() leaves the pipe open, which `filterwarnings = error` turns into a
    failure when it is garbage-collected.
    """
    code = worker.stop()
    if worker.process.stdout is not None:
        worker.process.stdout.close()
    return code


@pytest.fixture
def arq_jobs(redis_url: str) -> Iterator[list[str]]:
    """Collects the ids of the ARQ jobs a test causes; all their keys are deleted after it.

    ARQ's key names are fixed (`arq:job:<id>` ...), and so are taskbridge's progress and dedup
    keys, so the session clean-up by run_id cannot find them.
    """
    ids: list[str] = []
    yield ids
    if ids:
        client = redis.Redis.from_url(redis_url)
        try:
            prefixes = (
                job_key_prefix,
                result_prefix,
                in_progress_key_prefix,
                retry_key_prefix,
                PROGRESS_KEY_PREFIX,
                DEDUP_KEY_PREFIX,
            )
            client.delete(*(prefix + job_id for job_id in ids for prefix in prefixes))
            client.zrem(abort_jobs_ss, *ids)
        finally:
            client.close()


@dataclass
class Command:
    """A command seen by MONITOR: who sent it (`lua` for a script's own calls) and what."""

    client: str
    port: str
    command: str

    @property
    def is_enqueue(self) -> bool:
        """Whether this is a call of the enqueue script (whose first ARGV is the wake channel
        prefix), not of the worker's claim script."""
        return self.command.startswith("EVALSHA") and WAKE_CHANNEL_PREFIX in self.command


@contextlib.contextmanager
def monitor(redis_url: str) -> Iterator[list[Command]]:
    """Record every command Redis executes while the block runs (all clients, all databases)."""
    client = redis.Redis.from_url(redis_url)
    marker = f"end-of-monitor-{uuid.uuid4().hex}"
    seen: list[Command] = []
    ready = threading.Event()

    def read() -> None:
        with client.monitor() as commands:
            ready.set()
            for info in commands.listen():
                if marker in info["command"]:
                    return
                seen.append(Command(info["client_address"], info["client_port"], info["command"]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(5), "MONITOR did not start"
        yield seen
    finally:
        client.echo(marker)
        reader.join(10)
        client.close()
    assert not reader.is_alive(), "MONITOR did not see the end marker"


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """The repository's poll helper (re-exported for the test modules)."""
    root.wait_until(predicate, timeout, what)
