"""What a dispatch on RabbitMQ writes beside its publish in the results' Redis (the calls' `queued`
markers and index rows): written once the broker took the calls, without the request waiting
for it; read back at once in the same process; flushed by `close()`; never left behind by a
publish the broker refused; and never undoing what a worker (or another API process) wrote
first. A results' Redis of the test's own is frozen (SIGSTOP) to hold a write in flight."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from celery.app.task import Context  # type: ignore[import-untyped]
from taskbridge_celery import CeleryBackend
from taskbridge_celery._index import ADD_CHECKED, MARK_INDEXED, BesideWriter
from taskbridge_celery._keys import queued_key, result_key
from taskbridge_celery._protocol import ENQUEUED_HEADER, MessageBuilder
from taskbridge_celery._status import Snapshot, StatusStore

from taskbridge import BackendUnavailable, TaskBridge
from taskbridge.backends import TaskCall
from tests.faults.servers import OwnRedis

from .conftest import delete_amqp_queues, opened
from .test_index import Monitor, _sha

TASK = "bs.never"


def _bridge(options: dict[str, Any]) -> TaskBridge:
    bridge = TaskBridge({"backends": {"celery": options}})

    @bridge.task(name=TASK, backend="celery")
    def never(n: int) -> None:
        """Dispatched to a queue no worker consumes."""

    return bridge


def _backend(bridge: TaskBridge) -> CeleryBackend:
    backend = bridge.backend("celery")
    assert isinstance(backend, CeleryBackend)
    return backend


def _store(bridge: TaskBridge) -> StatusStore:
    store = _backend(bridge).store
    assert store is not None
    return store


def _writer(bridge: TaskBridge) -> BesideWriter:
    clients = _store(bridge)._clients
    assert clients is not None and clients.writer is not None
    return clients.writer


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Written:
    """What Redis holds of a call's beside write: its `queued` marker and its index row."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client, self.prefix = client, prefix

    def marker(self, task_id: str) -> bool:
        return bool(self.client.exists(queued_key(self.prefix, task_id)))

    def row(self, task_id: str) -> str | None:
        """The call's index state (None: not indexed)."""
        meta = self.client.hget(f"{self.prefix}taskbridge:index:meta", task_id)
        indexed = self.client.zscore(f"{self.prefix}taskbridge:index:calls", task_id)
        assert (meta is None) == (indexed is None)
        return None if meta is None else bytes(meta).decode().split("\t")[0]

    def counts(self) -> dict[str, int]:
        raw = self.client.hgetall(f"{self.prefix}taskbridge:index:counts")
        return {bytes(k).decode(): int(v) for k, v in raw.items()}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A results' Redis of the test's own, which it may freeze."""
    server = OwnRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def queue(amqp_url: str, unique_name: Callable[[str], str]) -> Iterator[str]:
    """A RabbitMQ queue no worker consumes; deleted afterwards."""
    name = unique_name("q")
    yield name
    delete_amqp_queues(amqp_url, [name])


def _frozen_options(amqp_url: str, server: OwnRedis, queue: str) -> dict[str, Any]:
    return {"broker_url": amqp_url, "result_backend": server.url(9), "default_queue": queue}


class _Frozen:
    """SIGSTOP on the server while the block runs (SIGCONT after, whatever happens)."""

    def __init__(self, server: OwnRedis) -> None:
        self.server = server

    def __enter__(self) -> None:
        self.server.signal(signal.SIGSTOP)

    def __exit__(self, *exc: object) -> None:
        self.server.signal(signal.SIGCONT)


async def test_dispatch_returns_before_the_write_and_a_read_here_waits_for_it(
    amqp_url: str, own_redis: OwnRedis, queue: str
) -> None:
    bridge = _bridge(_frozen_options(amqp_url, own_redis, queue))
    async with opened(bridge):
        task, backend = bridge.get_task(TASK), _backend(bridge)
        warm = await task.enqueue(0)  # connects, declares the queue, loads the scripts
        assert (await backend.status(warm.id) or pytest.fail("unknown")).state == "queued"
        monitor = Monitor(own_redis.port)
        try:
            with _Frozen(own_redis):
                async with asyncio.timeout(10):  # the results' Redis cannot answer meanwhile
                    handle = await task.enqueue(1)
                assert handle.id in _writer(bridge).pending  # sent, not written
                reading = asyncio.create_task(backend.status(handle.id))
                await asyncio.sleep(0)
                assert not reading.done()
            status = await reading
            assert status is not None and status.state == "queued"
            # The read went to Redis only once the write was done.
            seen: list[tuple[str, str, str]] = []
            while not any(name == "MGET" and handle.id in arg for _, name, arg in seen):
                found = Monitor.LINE.match(monitor._line())
                if found is not None:
                    seen.append((found.group(1), found.group(2).upper(), found.group(3) or ""))
            ours = [(name, arg) for client, name, arg in seen if client != "lua"]
            assert ("EVALSHA", _sha(MARK_INDEXED)) in ours
            assert ours.index(("EVALSHA", _sha(MARK_INDEXED))) < len(ours) - 1
            assert not _writer(bridge).pending
        finally:
            monitor.close()
        # listing waits for the writes too
        index = backend.index
        assert index is not None
        with _Frozen(own_redis):
            async with asyncio.timeout(10):
                listed = await task.enqueue(2)
            paging = asyncio.create_task(index.page(state=None, task=None, after=None, limit=10))
            await asyncio.sleep(0)
            assert not paging.done()
        page = await paging
        assert listed.id in {e.id for e in page.entries}


async def test_close_flushes_the_writes_still_in_flight(
    amqp_url: str, own_redis: OwnRedis, queue: str
) -> None:
    bridge = _bridge(_frozen_options(amqp_url, own_redis, queue))
    async with opened(bridge):
        task = bridge.get_task(TASK)
        await task.enqueue(0)  # connects, declares the queue, loads the scripts
        with _Frozen(own_redis):
            async with asyncio.timeout(10):
                handles = [await task.enqueue(n) for n in (1, 2, 3)]
            assert {h.id for h in handles} <= set(_writer(bridge).pending)
        # leaving `opened` closes the bridge: it waits for the writes
    written = Written(own_redis.client(9), "")
    try:
        for handle in handles:
            assert written.marker(handle.id)
            assert written.row(handle.id) == "queued"
    finally:
        written.client.close()


async def test_a_publish_the_broker_refused_leaves_no_marker_and_no_row(
    redis_url: str, run_id: str
) -> None:
    prefix = f"{run_id}:bsrefused:{uuid.uuid4().hex[:6]}:"
    down = f"amqp://guest:guest@127.0.0.1:{_closed_port()}//"
    options = {"broker_url": down, "result_backend": redis_url, "key_prefix": prefix}
    bridge = _bridge(options)
    async with opened(bridge):
        target, call = bridge.prepare(bridge.get_task(TASK), (1,), {})
        with pytest.raises(BackendUnavailable):
            await bridge.dispatch([(target, call)])
        assert await _backend(bridge).status(call.id) is None
    written = Written(redis.Redis.from_url(redis_url), prefix)
    try:
        assert not written.marker(call.id)
        assert written.row(call.id) is None
        assert list(written.client.scan_iter(match=f"{prefix}*")) == []
    finally:
        written.client.close()


async def test_a_results_redis_that_is_down_does_not_fail_the_dispatch(
    amqp_url: str, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    results = f"redis://127.0.0.1:{_closed_port()}/9"
    bridge = _bridge({"broker_url": amqp_url, "result_backend": results, "default_queue": queue})
    with caplog.at_level(logging.WARNING, "taskbridge"):
        async with opened(bridge):
            started = time.monotonic()
            handle = await bridge.get_task(TASK).enqueue(1)  # RabbitMQ has it: that is a 2xx
            assert time.monotonic() - started < 5
            await _writer(bridge).wait_idle()
            with pytest.raises(BackendUnavailable):  # a read says the results are down
                await _backend(bridge).status(handle.id)
    assert "the task index was not updated" in caplog.text
    app = _backend(bridge).app
    with app.connection_for_write() as connection:  # the call is on its queue
        assert connection.default_channel.queue_declare(queue, passive=True).message_count == 1
    app.close()


async def test_past_its_bound_a_dispatch_waits_for_the_writes(own_redis: OwnRedis) -> None:
    client = redis.asyncio.Redis.from_url(own_redis.url(9))
    writer = BesideWriter(client, None, bound=1)

    def add(task_id: str) -> None:
        mark = (queued_key("bs:", task_id), b"{}", 60_000)
        writer.add([task_id], [result_key("bs:", task_id)], [mark], [])

    try:
        add("a")  # loads the script
        await writer.wait_idle()
        with _Frozen(own_redis):
            async with asyncio.timeout(10):
                await writer.room()  # nothing unfinished
            add("b")
            waiting = asyncio.create_task(writer.room())
            done, _ = await asyncio.wait((waiting,), timeout=0.3)
            assert not done  # held back until the write is done
        async with asyncio.timeout(10):
            await waiting
        assert not writer.pending
        assert await client.exists(queued_key("bs:", "a"), queued_key("bs:", "b")) == 2
    finally:
        await client.aclose()


# -- a worker (or another API process) wrote first --------------------------------------------


@pytest.fixture
async def late(
    amqp_url: str, redis_url: str, run_id: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[TaskBridge, str]]:
    """A bridge whose beside writes run late, by hand: RabbitMQ markers and rows
    (`track_queued`, the default), or rows only (`track_queued=False`)."""
    track_queued: bool = request.param
    prefix = f"{run_id}:bslate:{uuid.uuid4().hex[:6]}:"
    options = {
        "broker_url": amqp_url,
        "result_backend": redis_url,
        "key_prefix": prefix,
        "track_queued": track_queued,
    }
    bridge = _bridge(options)
    try:
        async with opened(bridge):
            yield bridge, prefix
    finally:
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
        _backend(bridge).app.close()


def _request(call: TaskCall) -> Any:
    """The Celery request a worker has for `call`."""
    return Context(
        id=call.id,
        task=call.name,
        retries=0,
        args=list(call.args),
        kwargs=dict(call.kwargs),
        **{ENQUEUED_HEADER: call.enqueued_at},
    )


def _claimed(bridge: TaskBridge, call: TaskCall) -> None:
    found, _ = _backend(bridge).app.backend.claim(_request(call), "solo", False)
    assert found is None


def _succeeded(bridge: TaskBridge, call: TaskCall) -> None:
    _backend(bridge).app.backend.mark_as_done(call.id, 7, request=_request(call))


async def _cancelled_elsewhere(bridge: TaskBridge, call: TaskCall) -> None:
    # Another API process, which has no marker of the call yet: its revoke knows no task.
    other = StatusStore(_backend(bridge).options, 4.0)
    try:
        assert await other.revoke(Snapshot(call.id), "cancelled before it started") is None
    finally:
        await other.close()


@pytest.mark.parametrize("late", [True, False], indirect=True, ids=["markers", "rows"])
@pytest.mark.parametrize(
    ("first", "state"),
    [("claimed", "running"), ("succeeded", "succeeded"), ("cancelled", "cancelled")],
)
async def test_a_write_landing_after_the_worker_never_says_queued(
    late: tuple[TaskBridge, str], first: str, state: str
) -> None:
    bridge, prefix = late
    backend, store = _backend(bridge), _store(bridge)
    task = bridge.get_task(TASK)
    target, call = bridge.prepare(task, (1,), {})
    call.retry_of = "an-earlier-call"
    _, other = bridge.prepare(task, (2,), {})  # in the same write, nothing came first
    if first == "claimed":
        await asyncio.to_thread(_claimed, bridge, call)
    elif first == "succeeded":
        await asyncio.to_thread(_succeeded, bridge, call)
    else:
        await _cancelled_elsewhere(bridge, call)
    written = Written(redis.Redis.from_url(str(backend.options.result_backend)), prefix)
    try:
        assert written.row(call.id) == (None if first == "cancelled" else state)
        # The publish went through; its beside write runs now.
        builder = MessageBuilder(backend.app, backend.options.default_queue)
        messages = [builder.build(c, target.signer) for c in (call, other)]
        store.beside(messages)
        await store.read_many([call.id, other.id])  # waits for the write
        status = await backend.status(call.id)
        assert status is not None and status.state == state
        assert not written.marker(call.id)
        assert written.row(call.id) == state
        assert written.row(other.id) == "queued"
        assert written.marker(other.id) == store.marks_queued
        assert written.counts() == {f"{TASK}\t{state}": 1, f"{TASK}\tqueued": 1}
        index = backend.index
        assert index is not None
        entries = {
            e.id: e for e in (await index.page(state=None, task=None, after=None, limit=9)).entries
        }
        assert entries[call.id].retry_of == "an-earlier-call"  # the ADD keeps the link
        sha = _sha(MARK_INDEXED if store.marks_queued else ADD_CHECKED)
        assert written.client.script_exists(sha) == [True]
    finally:
        written.client.close()
