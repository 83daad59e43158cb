"""Real Celery workers for the tests: one per broker for the whole session, started with the CLI.

Each `Stack` is a worker process (`python -m taskbridge.cli worker celery tbapp:bridge ...`,
exactly what `spawn_worker` runs) configured by TASKBRIDGE_* variables, and the settings the test
process dispatches with. Queue names and Redis key prefixes contain the run id; RabbitMQ queues
are deleted at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from conftest import WorkerProcess, wait_until
from taskbridge import TaskBridge, TaskHandle, TaskStatus

HERE = Path(__file__).parent
APP_SOURCE = HERE / "tbapp.py"


def load_app_module(directory: Path) -> ModuleType:
    """Copy tbapp.py into `directory` (where the worker imports it) and import it here too."""
    target = directory / "tbapp.py"
    shutil.copy(APP_SOURCE, target)
    spec = importlib.util.spec_from_file_location(f"tbapp_{directory.name}", target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def celery_env(settings: dict[str, Any]) -> dict[str, str]:
    """The TASKBRIDGE_BACKENDS__CELERY__* variables for a `celery` alias's options."""
    return {
        f"TASKBRIDGE_BACKENDS__CELERY__{key.upper()}": str(value)
        for key, value in settings.items()
        if value is not None
    }


def run(coroutine_fn: Callable[[], Any]) -> Any:
    """Run an async test step to completion on a fresh event loop."""
    return asyncio.run(coroutine_fn())


@contextlib.asynccontextmanager
async def opened(bridge: TaskBridge) -> AsyncIterator[TaskBridge]:
    """The bridge, opened for the test's event loop and closed after."""
    await bridge.open()
    try:
        yield bridge
    finally:
        await bridge.close()


async def until(
    read: Callable[[], Awaitable[TaskStatus]],
    predicate: Callable[[TaskStatus], bool],
    what: str,
    timeout: float = 15,
) -> TaskStatus:
    """Poll `read()` (e.g. `handle.info`) until `predicate` holds; return that status."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        found = await read()
        if predicate(found):
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; last status: {found!r}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


@dataclass
class Stack:
    """A broker, a running worker on it, and how to dispatch to it and read back."""

    broker: str
    options: dict[str, Any]
    """The `celery` alias's options (what the worker got as TASKBRIDGE_* variables)."""
    queue: str
    extra_queue: str
    routed_queue: str
    prefix: str
    """Prefix of the Redis keys the tasks record into."""
    redis_url: str
    app: ModuleType
    worker: WorkerProcess
    hostname: str = ""
    """The worker's Celery node name."""
    bridge: TaskBridge = field(init=False)

    def __post_init__(self) -> None:
        self.bridge = self.app.build(
            {"backends": {"celery": self.options}}, routed_queue=self.routed_queue
        )
        self._store = redis.Redis.from_url(self.redis_url)

    def send(self, name: str, *args: Any, **using: Any) -> TaskHandle:
        """Enqueue one call of task `name` (with `.using(**using)` if given)."""
        return self.send_many([(name, args, using)])[0]

    def send_many(self, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        """Enqueue calls one by one, with the bridge opened and closed around them."""

        async def go() -> list[TaskHandle]:
            await self.bridge.open()
            try:
                handles = []
                for name, args, using in calls:
                    task = self.bridge.get_task(name)
                    handles.append(await (task.using(**using) if using else task).enqueue(*args))
                return handles
            finally:
                await self.bridge.close()

        result: list[TaskHandle] = run(go)
        return result

    def result(self, task_id: str, timeout: float = 20) -> Any:
        """The Celery AsyncResult of `task_id`, once it is ready (polled, no pub/sub)."""
        found = self.bridge.backend("celery").app.AsyncResult(task_id)  # type: ignore[attr-defined]
        wait_until(found.ready, timeout, f"the result of task {task_id}")
        return found

    def records(self, key: str) -> list[dict[str, Any]]:
        """What the tasks recorded under `key`, in order."""
        return [json.loads(item) for item in self._store.lrange(self.prefix + key, 0, -1)]

    def wait_records(self, key: str, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        """Wait until `count` records are under `key`; return them."""
        wait_until(lambda: len(self.records(key)) >= count, timeout, f"{count} run(s) of {key}")
        return self.records(key)

    def open_gate(self, gate: str) -> None:
        """Let the gated tasks waiting on `gate` go on."""
        self._store.set(self.prefix + gate, 1, ex=600)

    def control(self, command: str, **arguments: Any) -> Any:
        """A Celery remote-control command to this stack's worker, with its reply."""
        app = self.bridge.backend("celery").app  # type: ignore[attr-defined]
        replies = app.control.broadcast(
            command, arguments=arguments, destination=[self.hostname], reply=True, timeout=5
        )
        assert replies, f"the worker did not answer {command}"
        return replies[0][self.hostname]

    def close(self) -> None:
        self.bridge.backend("celery").app.close()  # type: ignore[attr-defined]
        self._store.close()


def start_worker(
    directory: Path, cli_args: list[str], env: dict[str, str], timeout: float = 40
) -> WorkerProcess:
    """Start `taskbridge <cli_args>` as `spawn_worker` does, and wait until Celery is ready."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    worker = WorkerProcess([sys.executable, "-m", "taskbridge.cli", *cli_args], directory, full_env)
    try:
        worker.wait_for_output(r"@\S+ ready\.", timeout)
    except BaseException:
        stop(worker)
        raise
    return worker


def stop(worker: WorkerProcess) -> int:
    """Stop a worker and close its output pipe (WorkerProcess.stop leaves it open)."""
    code = worker.stop()
    if worker.process.stdout is not None:
        worker.process.stdout.close()
    return code


def delete_amqp_queues(url: str, names: list[str]) -> None:
    """Delete the RabbitMQ queues (and their same-named exchanges) a test created."""
    from kombu import Connection

    with Connection(url) as connection:
        channel = connection.channel()
        for name in names:
            channel.queue_delete(name)
            channel.exchange_delete(name)


def _stack(
    broker: str,
    broker_url: str,
    redis_url: str,
    run_id: str,
    tmp_path_factory: pytest.TempPathFactory,
    pool: list[str],
) -> Iterator[Stack]:
    base = f"{run_id}-{broker}"
    queue, extra, routed = f"{base}-default", f"{base}-extra", f"{base}-routed"
    prefix = f"{run_id}:{broker}:"
    options = {
        "broker_url": broker_url,
        "result_backend": redis_url,
        "default_queue": queue,
        "key_prefix": prefix,
    }
    directory = tmp_path_factory.mktemp(f"celery-{broker}")
    app = load_app_module(directory)
    env = {
        **celery_env(options),
        "TBTEST_REDIS_URL": redis_url,
        "TBTEST_PREFIX": prefix,
        "TBTEST_ROUTED_QUEUE": routed,
    }
    hostname = f"{base}@{socket.gethostname()}"
    args = ["worker", "celery", "tbapp:bridge", *pool, "--hostname", f"{base}@%h"]
    args += ["--without-mingle", "--without-gossip", "--loglevel", "INFO"]
    if broker == "redis":
        args += ["--queues", f"{queue},{extra},{routed}"]
    # The AMQP worker is given no --queues: it consumes the alias's default queue and the
    # queue of the task routed there (tb.routed), which the tests rely on.
    worker = start_worker(directory, args, env)
    stack = Stack(broker, options, queue, extra, routed, prefix, redis_url, app, worker, hostname)
    try:
        yield stack
    finally:
        stop(worker)
        stack.close()
        if broker == "amqp":
            delete_amqp_queues(broker_url, [queue, extra, routed])


@pytest.fixture(scope="session")
def redis_stack(
    redis_url: str, run_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A threads-pool worker on the Redis broker (results in Redis)."""
    yield from _stack(
        "redis", redis_url, redis_url, run_id, tmp_path_factory, ["--pool", "threads", "-c", "2"]
    )


@pytest.fixture(scope="session")
def amqp_stack(
    amqp_url: str, redis_url: str, run_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A solo-pool worker on RabbitMQ (results in Redis)."""
    yield from _stack("amqp", amqp_url, redis_url, run_id, tmp_path_factory, ["--pool", "solo"])


@pytest.fixture(params=["redis", "amqp"])
def stack(request: pytest.FixtureRequest) -> Stack:
    """Each broker's stack in turn (the AMQP one is skipped when no RabbitMQ can be had)."""
    found: Stack = request.getfixturevalue(f"{request.param}_stack")
    return found
