"""The API side: messages identical to Celery's own, one round trip per batch, typed failures."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from taskbridge import BackendUnavailable, TaskBridge
from taskbridge.backends import execution_fields

from .conftest import delete_amqp_queues, run

BROKERS = ["redis", "amqp"]


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(kind, URL) of each real broker in turn."""
    return request.param, request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def queue(broker: tuple[str, str], unique_name: Callable[[str], str]) -> Iterator[str]:
    """A queue no worker consumes; deleted from RabbitMQ afterwards."""
    name = unique_name("q")
    yield name
    if broker[0] == "amqp":
        delete_amqp_queues(broker[1], [name])


def make_bridge(options: dict[str, Any]) -> TaskBridge:
    bridge = TaskBridge({"backends": {"celery": options}})

    @bridge.task(name="fid.task", backend="celery", retries=2, retry_backoff=0.5, timeout=5)
    def task(a: int, *rest: Any, b: str | None = None) -> None:
        """Never runs here: only dispatched."""

    @bridge.task(name="fid.atask", backend="celery")
    async def atask(n: int) -> None:
        """Never runs here: only dispatched."""

    return bridge


def options_for(broker: tuple[str, str], queue: str, run_id: str) -> dict[str, Any]:
    options: dict[str, Any] = {"broker_url": broker[1], "default_queue": queue}
    if broker[0] == "redis":
        options["key_prefix"] = f"{run_id}:fid:"
    return options


def read_back(app: Any, queue: str, count: int) -> list[Any]:
    """Take `count` messages off `queue` with kombu, as a Celery worker would receive them."""
    with app.connection_for_read() as connection:
        bound = app.amqp.queues[queue](connection.default_channel)
        messages = []
        deadline = time.monotonic() + 10
        while len(messages) < count and time.monotonic() < deadline:
            message = bound.get(no_ack=True, accept=["json"])
            if message is not None:
                messages.append(message)
        assert len(messages) == count, f"found {len(messages)} of {count} messages on {queue}"
        return messages


def test_messages_are_the_ones_celery_itself_sends(
    broker: tuple[str, str], queue: str, run_id: str
) -> None:
    bridge = make_bridge(options_for(broker, queue, run_id))
    task = bridge.get_task("fid.task")

    async def ours() -> str:
        await bridge.open()
        try:
            return (await task.enqueue(1, "two", b="x")).id
        finally:
            await bridge.close()

    before = time.time()
    our_id = run(ours)
    app = bridge.backend("celery").app  # type: ignore[attr-defined]
    celery_id = str(uuid.uuid4())
    app.send_task(
        "fid.task",
        args=[1, "two"],
        kwargs={"b": "x"},
        queue=queue,
        task_id=celery_id,
        time_limit=7.0,
        soft_time_limit=5.0,
        headers={
            "taskbridge_policy": execution_fields(task.policy),
            "taskbridge_enqueued_at": 1.5,
        },
    )
    mine, theirs = read_back(app, queue, 2)

    assert (mine.headers["id"], theirs.headers["id"]) == (our_id, celery_id)
    assert before <= mine.headers["taskbridge_enqueued_at"] <= time.time()
    volatile = {"id", "root_id", "taskbridge_enqueued_at"}
    assert {k: v for k, v in mine.headers.items() if k not in volatile} == {
        k: v for k, v in theirs.headers.items() if k not in volatile
    }
    assert mine.headers["timelimit"] == [7.0, 5.0]
    assert mine.headers["taskbridge_policy"] == {
        "retries": 2,
        "retry_backoff": 0.5,
        "retry_backoff_max": 300.0,
        "retry_jitter": True,
        "timeout": 5.0,
    }
    assert mine.decode() == theirs.decode() == [[1, "two"], {"b": "x"}, theirs.decode()[2]]
    assert (mine.content_type, mine.content_encoding) == (
        theirs.content_type,
        theirs.content_encoding,
    )
    assert mine.delivery_info["routing_key"] == theirs.delivery_info["routing_key"] == queue
    assert mine.delivery_info["exchange"] == theirs.delivery_info["exchange"]
    for name in ("delivery_mode", "priority"):
        assert mine.properties.get(name) == theirs.properties.get(name), name
    assert mine.properties["correlation_id"] == our_id
    app.close()


def test_the_redis_binding_and_queue_key_are_kombus(
    redis_url: str, unique_name: Callable[[str], str], run_id: str
) -> None:
    queue = unique_name("q")
    prefix = f"{run_id}:bind:"
    bridge = make_bridge({"broker_url": redis_url, "default_queue": queue, "key_prefix": prefix})

    async def go() -> None:
        await bridge.open()
        try:
            await bridge.get_task("fid.atask").enqueue(1)
        finally:
            await bridge.close()

    run(go)
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.llen(prefix + queue) == 1
        assert client.smembers(f"{prefix}_kombu.binding.{queue}") == {
            f"{queue}\x06\x16\x06\x16{queue}".encode()
        }
    finally:
        client.close()


def test_one_request_is_one_round_trip_to_redis(
    redis_url: str, unique_name: Callable[[str], str], run_id: str
) -> None:
    queue = unique_name("q")
    prefix = f"{run_id}:batch:"
    bridge = make_bridge({"broker_url": redis_url, "default_queue": queue, "key_prefix": prefix})
    sentinel = f"{queue}-sentinel"
    seen: list[str] = []
    watching, finished = threading.Event(), threading.Event()
    monitor_client = redis.Redis.from_url(redis_url)

    def watch() -> None:
        # MONITOR streams every command in execution order; stop at our sentinel ECHO.
        try:
            with monitor_client.monitor() as monitor:
                watching.set()
                while True:
                    line = monitor.connection.read_response()
                    text = line.decode(errors="replace") if isinstance(line, bytes) else str(line)
                    seen.append(text)
                    if sentinel in text:
                        break
        except (redis.RedisError, OSError):
            pass  # closed by the test after a failure
        finally:
            finished.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert watching.wait(5)

    async def go() -> None:
        await bridge.open()
        for backend in bridge.backends.values():  # the warm-up PING goes first: not the batch
            warmup = getattr(backend, "_warmup", None)
            if warmup is not None:
                await warmup
        try:
            await bridge.dispatch(
                [bridge.prepare(bridge.get_task("fid.atask"), (n,), {}) for n in range(5)]
            )
        finally:
            await bridge.close()

    run(go)
    other = redis.Redis.from_url(redis_url)
    try:
        other.echo(sentinel)
        assert finished.wait(10), f"MONITOR never showed the sentinel; seen: {seen}"
    finally:
        other.close()
        monitor_client.close()
        watcher.join(5)
    key = re.escape(prefix + queue)
    pushes = [s for s in seen if re.search(rf'"lpush" "{key}"', s, re.I)]
    assert len(pushes) == 1, [s for s in seen if queue in s]
    assert pushes[0].count("delivery_tag") == 5
    # ... sent by one connection as one MULTI ... EXEC pipeline
    line = re.compile(r'[\d.]+ \[\d+ ([^\]]+)\] "(\w+)"')
    client = line.match(pushes[0]).group(1)  # type: ignore[union-attr]
    ours = [m.group(2).lower() for s in seen if (m := line.match(s)) and m.group(1) == client]
    assert ours[ours.index("multi") :] == ["multi", "sadd", "lpush", "exec"]


def test_concurrent_dispatches_all_arrive(broker: tuple[str, str], queue: str, run_id: str) -> None:
    bridge = make_bridge(options_for(broker, queue, run_id))
    atask = bridge.get_task("fid.atask")

    async def go() -> list[str]:
        await bridge.open()
        try:
            handles = await asyncio.gather(*(atask.enqueue(n) for n in range(60)))
            return [h.id for h in handles]
        finally:
            await bridge.close()

    ids = run(go)
    app = bridge.backend("celery").app  # type: ignore[attr-defined]
    messages = read_back(app, queue, 60)
    assert sorted(m.headers["id"] for m in messages) == sorted(ids)
    app.close()


def test_without_publisher_confirms_calls_still_arrive(
    amqp_url: str, unique_name: Callable[[str], str]
) -> None:
    queue = unique_name("q")
    options = {
        "broker_url": amqp_url,
        "default_queue": queue,
        "celery": {"broker_transport_options": {"confirm_publish": False}},
    }
    bridge = make_bridge(options)
    atask = bridge.get_task("fid.atask")

    async def go() -> list[str]:
        await bridge.open()
        try:
            assert (await bridge.backend("celery").ping()).startswith("Celery broker")
            handles = await asyncio.gather(*(atask.enqueue(n) for n in range(20)))
            return [h.id for h in handles]
        finally:
            await bridge.close()

    try:
        ids = run(go)
        app = bridge.backend("celery").app  # type: ignore[attr-defined]
        assert sorted(m.headers["id"] for m in read_back(app, queue, 20)) == sorted(ids)
        app.close()
    finally:
        delete_amqp_queues(amqp_url, [queue])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_a_broker_that_is_down_raises_backend_unavailable_quickly(
    scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = _closed_port()
    url = f"{scheme}://guest:secret@127.0.0.1:{port}/" + ("9" if scheme == "redis" else "/")
    bridge = make_bridge({"broker_url": url, "default_queue": "down"})
    started = time.monotonic()

    async def go() -> None:
        with caplog.at_level(logging.WARNING, "taskbridge.celery"):
            await bridge.open()  # start-up survives a broker that is down
            try:
                with pytest.raises(BackendUnavailable) as raised:
                    await bridge.get_task("fid.atask").enqueue(1)
                assert raised.value.backend == "celery"
                assert "fid.atask" in str(raised.value) and "secret" not in str(raised.value)
                assert f"127.0.0.1:{port}" in str(raised.value)
                with pytest.raises(BackendUnavailable):
                    await bridge.backend("celery").ping()
            finally:
                await bridge.close()

    run(go)
    assert time.monotonic() - started < 5
    assert "not reachable yet" in caplog.text and "secret" not in caplog.text


def test_ping_describes_a_live_broker_without_its_password(
    broker: tuple[str, str], queue: str, run_id: str
) -> None:
    bridge = make_bridge(options_for(broker, queue, run_id))

    async def go() -> str:
        await bridge.open()
        try:
            first = await bridge.backend("celery").ping()
            assert await bridge.backend("celery").ping() == first  # reused connection
            return first
        finally:
            await bridge.close()

    described = run(go)
    assert described.startswith("Celery broker ")
    assert "guest:guest@" not in described
