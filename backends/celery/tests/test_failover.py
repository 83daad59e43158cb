"""A RabbitMQ failover list (`amqp://h1;amqp://h2`, kombu's syntax) on both sides.

The API's publisher thread and `taskbridge worker celery`, given the same list, move on to the
next host when one is down (a closed port) or cut mid-run (a FaultProxy in front of the real
RabbitMQ); every call a request had accepted is delivered and runs.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from conftest import WorkerProcess
from taskbridge import TaskBridge
from tests.faults.proxy import FaultProxy

from .conftest import celery_env, delete_amqp_queues, load_app_module, start_worker, stop

DISPATCH_TIMEOUT = 2.0


def _on_port(url: str, port: int) -> str:
    """`url` with its host and port replaced by 127.0.0.1:`port`."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Rig:
    """A worker and a bridge on one failover list; the bridge opened on a private loop."""

    def __init__(self, directory: Path, url: str, redis_url: str, name: str) -> None:
        self.queue, self.prefix = name, f"{name}:"
        self.options = {
            "broker_url": url,
            "result_backend": redis_url,
            "default_queue": self.queue,
            "key_prefix": self.prefix,
        }
        self.app = load_app_module(directory)
        env = {
            **celery_env(self.options),
            "TBTEST_REDIS_URL": redis_url,
            "TBTEST_PREFIX": self.prefix,
            "TBTEST_ROUTED_QUEUE": f"{name}-routed",
        }
        args = ["worker", "celery", "tbapp:bridge", "--pool", "threads", "-c", "2"]
        args += ["--queues", self.queue, "--hostname", f"{name}@%h"]
        self.worker: WorkerProcess = start_worker(
            directory, [*args, "--without-mingle", "--without-gossip"], env
        )
        self.bridge: TaskBridge = self.app.build(
            {"backends": {"celery": self.options}, "dispatch_timeout": DISPATCH_TIMEOUT},
            routed_queue=f"{name}-routed",
        )
        self.store = redis.Redis.from_url(redis_url)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.bridge.open())

    def dispatch(self, key: str, count: int) -> tuple[list[str], list[float]]:
        """`count` requests of one call each, one after the other: (ids, seconds each)."""
        task = self.bridge.get_task("tb.record")

        async def send() -> tuple[list[str], list[float]]:
            ids, took = [], []
            for n in range(count):
                started = time.monotonic()
                ids.append((await task.enqueue(key, n)).id)  # BackendUnavailable fails the test
                took.append(time.monotonic() - started)
            return ids, took

        return self.loop.run_until_complete(send())

    def ran(self, key: str, ids: list[str]) -> None:
        """Wait until every call of `ids` ran (a call run twice after a cut counts once)."""
        deadline = time.monotonic() + 30
        while True:
            seen = {json.loads(r)["id"] for r in self.store.lrange(self.prefix + key, 0, -1)}
            if set(ids) <= seen:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{len(set(ids) - seen)} of {len(ids)} accepted call(s) never ran")
            time.sleep(0.05)

    def close(self, amqp_url: str) -> None:
        self.loop.run_until_complete(self.bridge.close())
        self.loop.close()
        self.store.close()
        code = stop(self.worker)
        delete_amqp_queues(amqp_url, [self.queue])
        assert code == 0, self.worker.output[-3000:]


@pytest.fixture
def rigs(amqp_url: str) -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close(amqp_url)


def test_a_failover_list_whose_first_host_is_down_is_served_by_the_next(
    amqp_url: str, redis_url: str, run_id: str, tmp_path: Path, rigs: list[Rig]
) -> None:
    url = f"{_on_port(amqp_url, _closed_port())};{amqp_url}"
    rig = Rig(tmp_path, url, redis_url, f"{run_id}-failover-down")
    rigs.append(rig)
    rig.worker.wait_for_output(r"Connected to amqp://\S+@127\.0\.0\.1:5672/")

    ids, took = rig.dispatch("down", 5)

    assert len(ids) == 5 and max(took) < DISPATCH_TIMEOUT, took
    rig.ran("down", ids)


def test_api_and_worker_move_to_the_next_host_when_the_first_is_cut(
    amqp_url: str, redis_url: str, run_id: str, tmp_path: Path, rigs: list[Rig]
) -> None:
    parts = urlsplit(amqp_url)
    with FaultProxy((parts.hostname or "127.0.0.1", parts.port or 5672)) as proxy:
        url = f"{_on_port(amqp_url, proxy.port)};{amqp_url}"
        rig = Rig(tmp_path, url, redis_url, f"{run_id}-failover-cut")
        rigs.append(rig)
        before, _ = rig.dispatch("cut", 3)
        rig.ran("cut", before)
        assert proxy.connections >= 2  # the API's publisher and the worker, through the proxy

        proxy.cut()
        after, took = rig.dispatch("cut", 5)

        assert len(after) == 5 and max(took) < DISPATCH_TIMEOUT, took
        rig.ran("cut", before + after)
        assert proxy.connections == 0
        rig.worker.wait_for_output(r"Connected to amqp://\S+@127\.0\.0\.1:5672/")


def test_a_first_host_that_never_answers_leaves_the_next_one_time_within_the_dispatch_timeout(
    amqp_url: str, unique_name: Callable[[str], str]
) -> None:
    """The first host takes the connection and never answers (a frozen link): the request's
    dispatch_timeout is shared between the hosts, so the next one is reached in time."""
    from kombu import Connection

    parts = urlsplit(amqp_url)
    queue = unique_name("hang")
    with FaultProxy((parts.hostname or "127.0.0.1", parts.port or 5672)) as proxy:
        proxy.freeze()
        url = f"{_on_port(amqp_url, proxy.port)};{amqp_url}"
        bridge = TaskBridge(
            {
                "backends": {"celery": {"broker_url": url, "default_queue": queue}},
                "dispatch_timeout": DISPATCH_TIMEOUT,
            }
        )

        @bridge.task(name="hang.job", backend="celery")
        def job(n: int) -> None: ...

        async def send() -> tuple[list[str], list[float]]:
            ids, took = [], []
            try:
                for n in range(3):  # (not opened: no warm-up connects before the first one)
                    started = time.monotonic()
                    ids.append((await job.enqueue(n)).id)  # BackendUnavailable fails the test
                    took.append(time.monotonic() - started)
            finally:
                await bridge.close()
            return ids, took

        ids, took = asyncio.run(send())
        assert proxy.accepted == 1  # the first host was tried once, then not again
    # (kombu's connect timeout alone, 4 s, is longer than the request waits)
    assert took[0] < DISPATCH_TIMEOUT and max(took[1:]) < 0.5, took
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        present = set()
        try:
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                present.add(message.properties["application_headers"]["id"])
        finally:
            channel.queue_delete(queue)
            channel.exchange_delete(queue)
    assert present == set(ids)
