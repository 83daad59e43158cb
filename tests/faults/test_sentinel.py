"""Redis Sentinel: the API and a worker find the master through a Sentinel, and carry on after
its master is killed and the replica promoted, without a restart.

A real `redis-server --sentinel` watches a master and a replica on loopback. Calls go through
the API side (a bridge in this process) and run in a real `taskbridge worker` process; each
run is recorded in a Redis the failover does not touch. After the master is SIGKILLed, the
dispatches answer BackendUnavailable (a 503) until the Sentinel has promoted the replica, then
go through again, and the same worker process runs them. Where the backend has status, the
calls sent after the failover are then read back through their handles (status and result
from the promoted master).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import WorkerProcess, wait_until
from taskbridge import BackendUnavailable, TaskBridge, TaskHandle

from .sentinel import MASTER_NAME, SentinelCluster

pytestmark = pytest.mark.timeout(90)

APP = """
import os
import time

import redis

from taskbridge import TaskBridge

bridge = TaskBridge()
_clients = []


@bridge.task(name="sentinel.record", backend="{alias}")
def record(label: str) -> None:
    if not _clients:
        _clients.append(redis.Redis.from_url(os.environ["SENTINEL_RECORD_URL"]))
    _clients[0].rpush(
        os.environ["SENTINEL_RECORD_KEY"], f"{{label}} {{os.getpid()}} {{time.time()}}"
    )
"""


async def _send_until_accepted(
    bridge: TaskBridge, label: str, timeout: float
) -> tuple[float, TaskHandle]:
    """Dispatch one call, again until it is accepted; return when it was accepted (wall clock)
    and its handle."""
    task = bridge.get_task("sentinel.record")
    deadline = time.monotonic() + timeout
    while True:
        try:
            handle = await task.enqueue(label)
            return time.time(), handle
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
    worker_args: Sequence[str] = (),
    check_results: bool = False,
) -> None:
    """`worker_args` are added to `taskbridge worker`; `check_results` also reads the status
    and result of each call sent after the failover through its handle."""
    (tmp_path / "sentinel_app.py").write_text(APP.format(alias=alias))
    env = {
        "SENTINEL_RECORD_URL": redis_url,
        "SENTINEL_RECORD_KEY": record_key,
        **{f"TASKBRIDGE_BACKENDS__{alias.upper()}__{k.upper()}": v for k, v in options.items()},
    }
    worker = spawn_worker(["worker", alias, "sentinel_app:bridge", *worker_args], env=env)
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
            killed = time.time()
            cluster.kill_master()
            accepted, first = await _send_until_accepted(bridge, "after-0", 40)
            handles = [first]
            for n in range(1, 5):
                handles.append((await _send_until_accepted(bridge, f"after-{n}", 10))[1])
            if check_results:  # read back from the promoted master, through the API side
                for handle in handles:
                    assert await handle.result(timeout=40) is None
                    assert await handle.status() == "succeeded"
                    info = await handle.info()
                    assert info.task_name == "sentinel.record" and info.finished_at is not None
            return killed, accepted
        finally:
            await bridge.close()

    try:
        killed, accepted = asyncio.run(run())
        assert cluster.current_master() == cluster.replica_port
        wait_until(lambda: len(ran()) >= 10, 40, "the calls after the failover")
        runs = ran()
        first_run = min(float(e.split()[2]) for e in runs if e.startswith("after-"))
        print(  # shown with -s: the failover as the application saw it
            f"\n{alias}: kill -> first dispatch accepted {accepted - killed:.2f}s, "
            f"-> first call run {first_run - killed:.2f}s"
        )
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


def test_celery_api_and_worker_follow_a_sentinel_failover(
    tmp_path: Path,
    redis_url: str,
    unique_name: Callable[[str], str],
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    """Broker and result backend both behind the Sentinel (two databases of its master): the
    API side's publisher and status store (redis.asyncio's Sentinel client), and the worker's
    guarded Sentinel transport and Sentinel result backend (kombu's and Celery's own) find the
    promoted replica. A malformed message waiting in the queue is dropped by the guard."""
    pytest.importorskip("taskbridge_celery")
    workers: list[WorkerProcess] = []

    def spawn(*args: Any, **kwargs: Any) -> WorkerProcess:
        workers.append(spawn_worker(*args, **kwargs))
        return workers[-1]

    queue = unique_name("celery")
    with SentinelCluster(tmp_path / "redis") as cluster:
        options = {
            "broker_url": cluster.url(1),
            "result_backend": cluster.url(2),
            "sentinel_master": MASTER_NAME,
            "default_queue": queue,
        }
        broker = cluster.client(1)
        broker.lpush(queue, b"not a kombu envelope")  # taken first, before the calls
        broker.close()
        _scenario(
            "celery",
            options,
            tmp_path,
            redis_url,
            unique_name("ran"),
            cluster,
            spawn,
            worker_args=["--pool", "threads", "--concurrency", "2", "--without-mingle"],
            check_results=True,
        )
        assert f"dropped a message from queue {queue} that is not a JSON envelope" in (
            workers[0].output
        )


async def _until_accepted(send: Callable[[], Awaitable[TaskHandle]], timeout: float) -> TaskHandle:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await send()
        except BackendUnavailable:
            assert time.monotonic() < deadline, "never accepted"
            await asyncio.sleep(0.1)


def _replicated(cluster: SentinelCluster) -> None:
    """Block until the replica has everything the master was sent (Redis WAIT after a write on
    the same connection), so that what the API side wrote survives the failover."""
    client = cluster.client(0)
    try:
        client.set("taskbridge:test:sync", "1")  # never read: database 0 of the throwaway master
        assert client.execute_command("WAIT", 1, 5000) == 1
    finally:
        client.close()


@pytest.mark.parametrize("broker", ["sentinel", "amqp"])
def test_celery_keys_status_and_cancel_follow_a_sentinel_failover(
    broker: str,
    tmp_path: Path,
    unique_name: Callable[[str], str],
    request: pytest.FixtureRequest,
) -> None:
    """The API side alone (no worker): idempotency keys (taken in the dispatch script on a
    Sentinel broker, in the result backend's Redis with RabbitMQ), `queued` status and the
    cancellation script all reach the promoted replica after a failover."""
    pytest.importorskip("taskbridge_celery")
    queue = unique_name("celery")
    with SentinelCluster(tmp_path / "redis") as cluster:
        options = {
            "broker_url": cluster.url(1),
            "result_backend": cluster.url(2),
            "sentinel_master": MASTER_NAME,
            "default_queue": queue,
        }
        if broker == "amqp":
            options["broker_url"] = request.getfixturevalue("amqp_url")
        bridge = TaskBridge(settings={"backends": {"celery": options}, "dispatch_timeout": 1.0})

        @bridge.task(name="sentinel.keyed", backend="celery")
        def keyed(order: int) -> None: ...

        def send(order: int) -> Callable[[], Awaitable[TaskHandle]]:
            return lambda: keyed.using(key=f"order-{order}", key_ttl=600).enqueue(order)

        async def run() -> int:
            await bridge.open()
            try:
                first = await _until_accepted(send(1), 10)
                assert await first.status() == "queued"
                _replicated(cluster)
                cluster.kill_master()
                again = await _until_accepted(send(1), 40)  # the key is held on the new master
                assert again.id == first.id
                assert await again.status() == "queued"
                other = await _until_accepted(send(2), 10)
                assert await other.status() == "queued"
                answer = await other.cancel()
                assert answer.cancelled and answer.state == "cancelled", answer
                assert await other.status() == "cancelled"
                return await asyncio.to_thread(_queued_messages, bridge, cluster, broker, queue)
            finally:
                await bridge.close()

        # one message per key: the second dispatch of order-1 published nothing
        assert asyncio.run(run()) == 2
        assert cluster.current_master() == cluster.replica_port


def _queued_messages(bridge: TaskBridge, cluster: SentinelCluster, broker: str, queue: str) -> int:
    if broker == "sentinel":
        client = cluster.client(1)
        try:
            return int(client.llen(queue))
        finally:
            client.close()
    from taskbridge_celery import CeleryBackend

    backend = bridge.backend("celery")
    assert isinstance(backend, CeleryBackend)
    with backend.app.connection_for_write() as connection:
        channel = connection.default_channel
        count = int(channel.queue_declare(queue, passive=True).message_count)
        channel.queue_delete(queue)
    return count
