"""Redis Sentinel: the API and a worker find the master through a Sentinel, and carry on after
its master is killed and the replica promoted, without a restart.

A real `redis-server --sentinel` watches a master and a replica on loopback. Calls go through
the API side (a bridge in this process) and run in a real `taskbridge worker` process; each
run is recorded in a Redis the failover does not touch. After the master is SIGKILLed, the
dispatches answer BackendUnavailable (a 503) until the Sentinel has promoted the replica, then
go through again, and the same worker process runs them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from conftest import WorkerProcess, wait_until
from taskbridge import BackendUnavailable, TaskBridge

from .sentinel import MASTER_NAME, SentinelCluster

pytestmark = pytest.mark.timeout(90)

APP = """
import os

import redis

from taskbridge import TaskBridge

bridge = TaskBridge()
_clients = []


@bridge.task(name="sentinel.record", backend="{alias}")
def record(label: str) -> None:
    if not _clients:
        _clients.append(redis.Redis.from_url(os.environ["SENTINEL_RECORD_URL"]))
    _clients[0].rpush(os.environ["SENTINEL_RECORD_KEY"], f"{{label}} {{os.getpid()}}")
"""


async def _send_until_accepted(bridge: TaskBridge, label: str, timeout: float) -> float:
    """Dispatch one call, again until it is accepted; return when it was accepted."""
    task = bridge.get_task("sentinel.record")
    deadline = time.monotonic() + timeout
    while True:
        try:
            await task.enqueue(label)
            return time.monotonic()
        except BackendUnavailable:
            assert time.monotonic() < deadline, f"{label} was never accepted"
            await asyncio.sleep(0.1)


def _scenario(
    alias: str,
    options: dict[str, str],
    tmp_path: Path,
    redis_url: str,
    record_key: str,
    cluster: SentinelCluster,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    (tmp_path / "sentinel_app.py").write_text(APP.format(alias=alias))
    env = {
        "SENTINEL_RECORD_URL": redis_url,
        "SENTINEL_RECORD_KEY": record_key,
        **{f"TASKBRIDGE_BACKENDS__{alias.upper()}__{k.upper()}": v for k, v in options.items()},
    }
    worker = spawn_worker(["worker", alias, "sentinel_app:bridge"], env=env)
    bridge = TaskBridge(settings={"backends": {alias: options}, "dispatch_timeout": 1.0})

    @bridge.task(name="sentinel.record", backend=alias)
    def record(label: str) -> None: ...

    store = redis.Redis.from_url(redis_url)

    def ran() -> list[str]:
        return [item.decode() for item in store.lrange(record_key, 0, -1)]

    async def run() -> tuple[float, float]:
        await bridge.open()
        try:
            for n in range(5):
                await _send_until_accepted(bridge, f"before-{n}", 30)
            wait_until(lambda: len(ran()) == 5, 30, "the calls before the failover")
            killed = time.monotonic()
            cluster.kill_master()
            accepted = await _send_until_accepted(bridge, "after-0", 40)
            for n in range(1, 5):
                await _send_until_accepted(bridge, f"after-{n}", 10)
            return killed, accepted
        finally:
            await bridge.close()

    try:
        killed, accepted = asyncio.run(run())
        assert cluster.current_master() == cluster.replica_port
        wait_until(lambda: len(ran()) >= 10, 40, "the calls after the failover")
        runs = ran()
        labels = sorted(entry.split()[0] for entry in runs)
        assert labels == sorted(
            [f"before-{n}" for n in range(5)] + [f"after-{n}" for n in range(5)]
        )
        assert {entry.split()[1] for entry in runs} == {str(worker.process.pid)}
        assert worker.process.poll() is None, "the worker must carry on without a restart"
        assert accepted - killed < 30
    finally:
        store.delete(record_key)
        store.close()


def test_arq_api_and_worker_follow_a_sentinel_failover(
    tmp_path: Path,
    redis_url: str,
    unique_name: Callable[[str], str],
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    with SentinelCluster(tmp_path / "redis") as cluster:
        options = {
            "redis_url": cluster.url(1),
            "sentinel_master": MASTER_NAME,
            "queue_name": unique_name("arq"),
            "socket_timeout": "1",
        }
        _scenario("arq", options, tmp_path, redis_url, unique_name("ran"), cluster, spawn_worker)
