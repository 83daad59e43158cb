"""The call index of a Celery alias, against real workers: for a Redis broker (broker and results
in one Redis) and for RabbitMQ with results in Redis, what dispatch adds, how the worker moves
each call, the events that push its changes, the arguments kept for a retry, the index's bounds,
and that dispatch on Redis writes the index in the publish's own round trip."""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from celery import Celery  # type: ignore[import-untyped]
from celery.app.task import Context  # type: ignore[import-untyped]
from taskbridge_celery import CeleryBackend
from taskbridge_celery._index import DISPATCH_INDEXED

from taskbridge import BackendUnavailable, TaskBridge, TaskStatus
from taskbridge._deadline import dispatch_deadline_scope
from taskbridge._ledger import ADD_SCRIPT, RedisIndex
from taskbridge.backends import KeptCall
from tests.faults.servers import OwnRedis
from tests.index_walk import walk

from .conftest import Stack, _stack, delete_amqp_queues, opened, until

CELERYS_SETEX = "ignore:Call to deprecated setex:DeprecationWarning"
"""Celery 5.7's RedisBackend stores with `setex`, which redis-py 8 deprecates."""


@pytest.fixture(scope="module", params=["redis", "amqp"])
def indexed(
    request: pytest.FixtureRequest,
    redis_url: str,
    run_id: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A worker of this module's own (its own queues and key prefix, so its index holds only
    this module's calls): a threads pool on the Redis broker, a solo pool on RabbitMQ."""
    broker: str = request.param
    url = redis_url if broker == "redis" else request.getfixturevalue("amqp_url")
    pool = ["--pool", "threads", "-c", "2"] if broker == "redis" else ["--pool", "solo"]
    yield from _stack(broker, url, redis_url, f"{run_id}-index", tmp_path_factory, pool)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _backend(bridge: TaskBridge) -> CeleryBackend:
    backend = bridge.backend("celery")
    assert isinstance(backend, CeleryBackend)
    return backend


def _index(bridge: TaskBridge) -> RedisIndex:
    index = _backend(bridge).index
    assert isinstance(index, RedisIndex)
    return index


def _ms(status: TaskStatus) -> int:
    assert status.enqueued_at is not None
    return round(status.enqueued_at.timestamp() * 1000)


async def test_the_index_lists_calls_newest_first_as_the_worker_moves_them(
    indexed: Stack,
) -> None:
    stack, key, gate = indexed, _name("listed"), _name("gate")
    stack.open_gate(gate)  # the progress reports go straight on to success
    async with opened(stack.bridge) as bridge:
        backend = _backend(bridge)
        record, fail, gated = (bridge.get_task(n) for n in ("tb.record", "tb.fail", "tb.gated"))
        succeeding, failing, progressing = [], [], []
        for n in range(3):
            succeeding.append(await record.enqueue(key, n))
            failing.append(await fail.enqueue(f"broken {n}"))
            progressing.append(await gated.enqueue(key, gate))
        batch = [bridge.prepare(record, (key, "batch", n), {}) for n in range(3)]
        batch[0][1].retry_of = failing[0].id  # as `POST /tasks/{id}/retry` dispatches it
        await bridge.dispatch(batch)  # several calls in one publish, one index write
        succeeding += [call.handle for _, call in batch]
        handles = succeeding + failing + progressing
        for handle in handles:
            await until(handle.info, lambda s: s.done, f"call {handle.id} to end")

        index = _index(bridge)
        assert index.prefix == f"{stack.prefix}taskbridge:index"
        everything = await walk(index, 4)
        assert len({e.id for e in everything}) == len(everything)  # each call once
        assert [e.cursor for e in everything] == sorted(
            (e.cursor for e in everything), reverse=True
        )
        ids = [h.id for h in handles]
        assert set(ids) <= {e.id for e in everything}

        # statuses() reads them all at once, and says what status() says of each
        unknown = str(uuid.uuid4())
        statuses = await backend.statuses([*ids, unknown])
        assert statuses == [await backend.status(i) for i in [*ids, unknown]]
        assert statuses[-1] is None
        known = dict(zip(ids, statuses, strict=False))
        expected = {h.id: "succeeded" for h in succeeding + progressing}
        expected.update({h.id: "failed" for h in failing})
        for entry in everything:
            if entry.id in known:
                status = known[entry.id]
                assert status is not None and status.state == expected[entry.id]
                assert (entry.state, entry.task) == (status.state, status.task_name)
                assert entry.score == _ms(status)  # newest first by enqueue time
                assert entry.retry_of == (failing[0].id if entry.id == batch[0][1].id else None)

        failed = await walk(index, 2, state="failed")
        assert {e.state for e in failed} == {"failed"}
        assert {h.id for h in failing} <= {e.id for e in failed}
        assert not {h.id for h in succeeding} & {e.id for e in failed}
        records = await walk(index, 3, task="tb.record")
        assert {e.task for e in records} == {"tb.record"}
        assert {h.id for h in succeeding} <= {e.id for e in records}
        gated_done = await walk(index, 2, state="succeeded", task="tb.gated")
        assert {(e.state, e.task) for e in gated_done} == {("succeeded", "tb.gated")}
        assert {h.id for h in progressing} <= {e.id for e in gated_done}
        assert not await walk(index, 5, state="failed", task="tb.record")

        counts = await index.counts()
        assert counts.states == dict(Counter(e.state for e in everything))
        per_task: dict[str, dict[str, int]] = {}
        for (task, state), n in Counter((e.task, e.state) for e in everything).items():
            per_task.setdefault(task, {})[state] = n
        assert counts.tasks == per_task


async def test_a_watcher_is_woken_by_each_change_the_worker_makes(indexed: Stack) -> None:
    stack, first, second = indexed, _name("first"), _name("second")
    async with opened(stack.bridge) as bridge:
        backend, index = _backend(bridge), _index(bridge)
        target, call = bridge.prepare(bridge.get_task("tb.steps"), ("steps", first, second), {})
        channel = f"{index.prefix}:events"
        listener = redis.asyncio.Redis.from_url(stack.redis_url)
        pubsub = listener.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(channel)
        heard: list[str] = []

        async def settled(changed: asyncio.Event) -> int:
            """Publish a mark, and wait until the index's watchers and our own subscriber
            have it: every change published before it has reached both. Return how many
            times the call was published; clear `changed`."""
            mark = _name("mark")
            async with index.watch(mark) as marked:
                await listener.publish(channel, mark)
                async with asyncio.timeout(10):
                    await marked.wait()
                    while True:
                        message = await pubsub.get_message(timeout=1)
                        if message is None:  # (or the subscription's confirmation, skipped)
                            continue
                        data = message["data"].decode()
                        if data == mark:
                            break
                        if data == call.id:
                            heard.append(data)
            changed.clear()
            return len(heard)

        async def woken(
            changed: asyncio.Event, predicate: Callable[[TaskStatus], bool], what: str
        ) -> TaskStatus:
            """Wait for `changed`, then read the status, until `predicate` holds."""
            try:
                async with asyncio.timeout(15):
                    while True:
                        await changed.wait()
                        changed.clear()
                        status = await backend.status(call.id)
                        if status is not None and predicate(status):
                            return status
            except TimeoutError:
                pytest.fail(f"not woken for {what}; status: {await backend.status(call.id)!r}")

        try:
            async with index.watch(call.id) as changed:
                await bridge.dispatch([(target, call)])
                running = await woken(changed, lambda s: s.state == "running", "the claim")
                assert running.progress is None
                assert await settled(changed) == 2  # dispatched, then claimed
                stack.open_gate(first)
                halfway = await woken(changed, lambda s: s.progress == 0.5, "the progress")
                assert (halfway.state, halfway.progress_message) == ("running", "halfway")
                assert await settled(changed) == 3
                stack.open_gate(second)
                done = await woken(changed, lambda s: s.state == "succeeded", "the success")
                assert done.result == "steps"
                assert await settled(changed) == 4
        finally:
            stack.open_gate(first)
            stack.open_gate(second)
            await pubsub.aclose()
            await listener.aclose()
        entry = next(e for e in await walk(index, 50) if e.id == call.id)
        assert (entry.state, entry.task) == ("succeeded", "tb.steps")


async def test_a_failed_call_keeps_its_arguments_for_a_retry(indexed: Stack) -> None:
    stack, key = indexed, _name("kept")
    async with opened(stack.bridge) as bridge:
        backend = _backend(bridge)
        fail = bridge.get_task("tb.fail")
        failed = await fail.enqueue(message="kept: 1")  # sent bound: positional
        done = await bridge.get_task("tb.record").enqueue(key, 1, two=2)
        big = await fail.enqueue("x" * (64 * 1024))  # its JSON is over 64 KiB
        for handle in (failed, done, big):
            await until(handle.info, lambda s: s.done, f"call {handle.id} to end")

        assert await backend.kept_call(failed.id) == KeptCall("tb.fail", ("kept: 1",), {})
        assert await backend.kept_call(done.id) is None
        assert await backend.kept_call(big.id) is None
        assert await backend.kept_call(str(uuid.uuid4())) is None

        info = await failed.info()
        assert (info.state, info.args, info.kwargs) == ("failed", ["kept: 1"], {})
        assert info.error is not None and info.error.traceback is not None
        assert "ValueError: kept: 1" in info.error.traceback
        big_info = await big.info()
        assert (big_info.state, big_info.args, big_info.kwargs) == ("failed", None, None)
        assert big_info.error is not None and big_info.error.traceback is not None
        done_info = await done.info()  # a success keeps its result only
        assert (done_info.args, done_info.kwargs, done_info.error) == (None, None, None)
    # Celery's own reader sees them as its `result_extended` fields
    result = _backend(stack.bridge).app.AsyncResult(failed.id)
    assert (result.args, result.kwargs) == (["kept: 1"], {})


@pytest.mark.parametrize("track_queued", [True, False])
async def test_a_call_cancelled_before_it_started_keeps_its_arguments(
    indexed: Stack, track_queued: bool
) -> None:
    stack = indexed
    # A queue the worker does not consume yet: the call stays queued until it is added.
    queue = _name(f"{stack.prefix}ixcancel").replace(":", "-")
    key = _name("cancelled")
    options = {**stack.options, "track_queued": track_queued}
    dispatcher = stack.app.build({"backends": {"celery": options}})
    kept = KeptCall("tb.record", (key, "again"), {})
    try:
        async with opened(dispatcher) as bridge:
            backend, index = _backend(bridge), _index(bridge)
            doomed = await bridge.get_task("tb.record").using(queue=queue).enqueue(key, "again")
            answer = await doomed.cancel()
            assert (answer.cancelled, answer.state) == (True, "cancelled"), answer.detail
            assert doomed.id in {e.id for e in await walk(index, 50, state="cancelled")}
            # With its `queued` marker, the revoke kept them; else nothing in Redis had them.
            assert await backend.kept_call(doomed.id) == (kept if track_queued else None)

            reply = await asyncio.to_thread(stack.control, "add_consumer", queue=queue)
            assert "ok" in reply, reply
            await asyncio.to_thread(
                stack.worker.wait_for_output,
                rf"task tb\.record \[{doomed.id}\] not run: it was cancelled",
            )
            # The worker that refused to run it kept them (and its task) if the revoke could not.
            assert await backend.kept_call(doomed.id) == kept
            info = await doomed.info()
            assert (info.state, info.task_name, info.args) == (
                "cancelled",
                "tb.record",
                [key, "again"],
            )
            assert info.enqueued_at is not None
        assert stack.records(key) == []
    finally:
        await asyncio.to_thread(stack.control, "cancel_consumer", queue=queue)
        _backend(dispatcher).app.close()
        if stack.broker == "amqp":
            delete_amqp_queues(stack.options["broker_url"], [queue])


async def test_a_call_cancelled_between_attempts_keeps_its_arguments(indexed: Stack) -> None:
    stack, key = indexed, _name("between")
    async with opened(stack.bridge) as bridge:
        backend, index = _backend(bridge), _index(bridge)
        once = bridge.get_task("tb.once").using(retries=1, retry_backoff=30, retry_jitter=False)
        handle = await once.enqueue(key, 1)  # the first attempt fails; the next is 30 s away
        retrying = await until(handle.info, lambda s: s.state == "retrying", "the first failure")
        assert retrying.args == [key, 1]
        answer = await handle.cancel()
        assert (answer.cancelled, answer.state) == (True, "cancelled"), answer.detail
        assert await backend.kept_call(handle.id) == KeptCall("tb.once", (key, 1), {})
        entry = next(e for e in await walk(index, 50) if e.id == handle.id)
        assert (entry.state, entry.task) == ("cancelled", "tb.once")


# -- without a worker -------------------------------------------------------------------------


def _bridge(options: dict[str, Any]) -> TaskBridge:
    bridge = TaskBridge({"backends": {"celery": options}})

    @bridge.task(name="ix.never", backend="celery")
    def never(n: int) -> None:
        """Dispatched to a queue no worker consumes."""

    return bridge


async def _cleanup(url: str, prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.mark.parametrize("broker", ["redis", "amqp"])
async def test_the_index_keeps_at_most_index_max_entries(
    broker: str,
    redis_url: str,
    run_id: str,
    unique_name: Callable[[str], str],
    request: pytest.FixtureRequest,
) -> None:
    url = redis_url if broker == "redis" else request.getfixturevalue("amqp_url")
    prefix, queue = f"{run_id}:ixbound:{uuid.uuid4().hex[:6]}:", unique_name("q")
    bridge = _bridge(
        {
            "broker_url": url,
            "result_backend": redis_url,
            "default_queue": queue,
            "key_prefix": prefix,
            "index_max_entries": 5,
        }
    )
    try:
        async with opened(bridge):
            task = bridge.get_task("ix.never")
            calls = []
            for n in range(12):
                target, call = bridge.prepare(task, (n,), {})
                await bridge.dispatch([(target, call)])
                calls.append(call)
            index = _index(bridge)
            entries = await walk(index, 100)
            newest = sorted(calls, key=lambda c: (int(c.enqueued_at * 1000), c.id), reverse=True)
            assert [e.id for e in entries] == [c.id for c in newest[:5]]
            counts = await index.counts()
            assert (counts.states, counts.tasks) == ({"queued": 5}, {"ix.never": {"queued": 5}})
            client = redis.asyncio.Redis.from_url(redis_url)
            try:
                assert await client.zcard(f"{index.prefix}:calls") == 5
                assert await client.hlen(f"{index.prefix}:meta") == 5
            finally:
                await client.aclose()
    finally:
        await _cleanup(redis_url, prefix)
        _backend(bridge).app.close()
        if broker == "amqp":
            delete_amqp_queues(url, [queue])


async def test_no_index_without_a_result_backend_or_with_index_max_entries_0(
    redis_url: str, run_id: str, unique_name: Callable[[str], str]
) -> None:
    assert CeleryBackend("celery", {"broker_url": redis_url}).index is None
    prefix = f"{run_id}:ixnone:"
    options = {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "default_queue": unique_name("q"),
        "key_prefix": prefix,
        "index_max_entries": 0,
    }
    bridge = _bridge(options)
    try:
        async with opened(bridge):
            handle = await bridge.get_task("ix.never").enqueue(1)
            assert _backend(bridge).index is None
            assert await handle.status() == "queued"
        client = redis.Redis.from_url(redis_url)
        try:
            assert list(client.scan_iter(match=f"{prefix}taskbridge:index*")) == []
        finally:
            client.close()
    finally:
        await _cleanup(redis_url, prefix)
        _backend(bridge).app.close()


async def test_with_the_broker_in_another_redis_the_index_is_written_beside_the_publish(
    redis_url: str, run_id: str, unique_name: Callable[[str], str]
) -> None:
    # Broker and results in two databases of one server: two Redis for taskbridge.
    base, db = redis_url.rsplit("/", 1)
    broker_url = f"{base}/{int(db) + 1}"
    prefix = f"{run_id}:ixapart:{uuid.uuid4().hex[:6]}:"
    bridge = _bridge(
        {
            "broker_url": broker_url,
            "result_backend": redis_url,
            "default_queue": unique_name("q"),
            "key_prefix": prefix,
        }
    )
    try:
        async with opened(bridge):
            task = bridge.get_task("ix.never")
            first = await task.enqueue(1)
            batch = [bridge.prepare(task, (n,), {}) for n in (2, 3)]
            await bridge.dispatch(batch)
            ids = [first.id, *(call.id for _, call in batch)]
            backend = _backend(bridge)
            entries = await walk(_index(bridge), 10)
            assert sorted(e.id for e in entries) == sorted(ids)
            assert {(e.state, e.task) for e in entries} == {("queued", "ix.never")}
            statuses = await backend.statuses(ids)  # markers in the broker's Redis
            assert statuses == [await backend.status(i) for i in ids]
            assert [s.state if s else None for s in statuses] == ["queued"] * 3
    finally:
        await _cleanup(redis_url, prefix)
        await _cleanup(broker_url, prefix)
        _backend(bridge).app.close()


async def test_a_keyed_call_redis_refused_for_its_deadline_is_not_indexed(
    redis_url: str, run_id: str, unique_name: Callable[[str], str]
) -> None:
    prefix = f"{run_id}:ixlate:{uuid.uuid4().hex[:6]}:"
    options = {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "default_queue": unique_name("q"),
        "key_prefix": prefix,
    }
    bridge = _bridge(options)
    try:
        async with opened(bridge):
            keyed = bridge.get_task("ix.never").using(key=_name("order"), key_ttl=60)
            late_target, late = bridge.prepare(keyed, (1,), {})
            with dispatch_deadline_scope(-1), pytest.raises(BackendUnavailable):
                await late_target.enqueue([late])  # its request gave up before Redis had it
            index = _index(bridge)
            assert await walk(index, 10) == []
            sent = await keyed.enqueue(2)  # the key was not taken: this one is queued
            assert sent.id == late.id  # (a keyed call's id follows from its key)
            entries = await walk(index, 10)
            assert [(e.id, e.state) for e in entries] == [(sent.id, "queued")]
    finally:
        await _cleanup(redis_url, prefix)
        _backend(bridge).app.close()


@pytest.mark.filterwarnings(CELERYS_SETEX)
async def test_kept_call_reads_celerys_own_extended_results(redis_url: str, run_id: str) -> None:
    prefix = f"{run_id}:ixnative:{uuid.uuid4().hex[:6]}:"
    options = {"broker_url": redis_url, "result_backend": redis_url, "key_prefix": prefix}
    backend = CeleryBackend("celery", options)
    plain = Celery("plain", backend=redis_url, set_as_current=False)
    plain.conf.result_backend_transport_options = {"global_keyprefix": prefix}
    plain.conf.result_extended = True
    plain.conf.accept_content = plain.conf.result_accept_content = ["json"]
    task_id = str(uuid.uuid4())
    request = Context(id=task_id, task="native.task", args=["a", 1], kwargs={"k": True}, retries=0)
    trace = 'Traceback (most recent call last):\n  File "x.py"\nValueError: boom'
    try:
        plain.backend.mark_as_failure(task_id, ValueError("boom"), trace, request=request)
        assert await backend.kept_call(task_id) == KeptCall("native.task", ("a", 1), {"k": True})
        status = await backend.status(task_id)
        assert status is not None and status.error is not None
        assert (status.state, status.task_name) == ("failed", "native.task")
        assert (status.args, status.kwargs, status.error.traceback) == (
            ["a", 1],
            {"k": True},
            trace,
        )
    finally:
        await backend.close()
        plain.close()
        await _cleanup(redis_url, prefix)


# -- dispatch writes the index in the publish's round trip ------------------------------------


class Monitor:
    """`MONITOR` on a Redis server: every command it runs, in order, with its client."""

    LINE = re.compile(r'^\+[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"(?: "([^"]*)")?')

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(b"MONITOR\r\n")
        self._buffer = b""
        assert self._line() == "+OK"

    def _line(self) -> str:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the monitor"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line.decode(errors="replace")

    def between(self, command: str) -> list[tuple[str, str, str]]:
        """(client, command, first argument) of what ran between the next two `command`s."""
        seen: list[tuple[str, str, str]] = []
        marks = 0
        while marks < 2:
            found = self.LINE.match(self._line())
            assert found is not None
            client, name, argument = found.group(1), found.group(2).upper(), found.group(3) or ""
            if name == command:
                marks += 1
            elif marks == 1:
                seen.append((client, name, argument))
        return seen

    def close(self) -> None:
        self.sock.close()


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


async def test_dispatch_on_redis_writes_the_index_in_the_publishs_own_round_trip(
    tmp_path: Path, unique_name: Callable[[str], str]
) -> None:
    """On a private Redis, `INFO stats`' count of reads from clients shows how many round trips
    a dispatch took (a client that waits for a reply before sending its next command makes the
    server read at least twice), and MONITOR which commands it sent: the publish's pipeline (or
    script) carries the index's EVALSHA, with no round trip of its own, and no SCRIPT EXISTS
    (which a redis-py Script in a pipeline would send first)."""
    server = OwnRedis(tmp_path / "redis")
    server.start()
    url = server.url(9)
    bridge = _bridge({"broker_url": url, "result_backend": url, "default_queue": unique_name("q")})
    checker = server.client(9)
    try:
        checker.ping()
        async with opened(bridge):
            task = bridge.get_task("ix.never")
            keyed = task.using(key=_name("order"), key_ttl=60)
            await task.enqueue(0)  # connects, declares the queue, loads the scripts
            await task.using(key=_name("first"), key_ttl=60).enqueue(0)

            async def measured(send: Callable[[], Awaitable[Any]]) -> tuple[int, list[Any]]:
                monitor = Monitor(server.port)
                try:
                    before = int(checker.info("stats")["total_reads_processed"])
                    await send()
                    after = int(checker.info("stats")["total_reads_processed"])
                    return after - before - 1, monitor.between("INFO")  # less the INFO's own
                finally:
                    monitor.close()

            reads, commands = await measured(lambda: task.enqueue(1))
            sent = [(name, argument) for client, name, argument in commands if client != "lua"]
            assert [name for name, _ in sent] == ["LPUSH", "SET", "EVALSHA"], commands
            assert sent[-1][1] == _sha(ADD_SCRIPT)
            assert len({client for client, _, _ in commands if client != "lua"}) == 1
            assert ("ZADD", "taskbridge:index:calls") in {(n, a) for _, n, a in commands}
            assert reads == 1

            reads, commands = await measured(lambda: keyed.enqueue(2))
            sent = [(name, argument) for client, name, argument in commands if client != "lua"]
            assert sent == [("EVALSHA", _sha(DISPATCH_INDEXED))], commands
            script_ran = [(n, a) for client, n, a in commands if client == "lua"]
            assert "LPUSH" in {name for name, _ in script_ran}
            assert ("ZADD", "taskbridge:index:calls") in script_ran
            assert reads == 1
    finally:
        checker.close()
        _backend(bridge).app.close()
        server.stop()
