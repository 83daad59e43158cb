"""The call index of an ARQ alias (`backend.index`), kept by the dispatch and by real workers in
a real Redis: listing, filters, pages, counts, changes pushed to watchers, kept arguments, its
bounds, and where its writes travel (in the enqueue script, in the worker's transactions)."""

from __future__ import annotations

import asyncio
import importlib
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
import redis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.constants import result_key_prefix as result_prefix
from arq.worker import Worker, func
from taskbridge_arq import INDEX_PREFIX, ArqBackend, TaskbridgeWorker
from taskbridge_arq._index import IndexSpec
from taskbridge_arq._wakeups import WakeUps

import conftest as root
from taskbridge import TaskFailed, TaskNotRetryable, TaskStatus
from taskbridge.backends import Counts, IndexEntry, KeptCall, RedisIndex
from tests.faults.servers import OwnRedis

from .conftest import Command, monitor

RESULT_TIMEOUT = 20
T = TypeVar("T")

APP_SOURCE = '''\
"""Tasks for the call index tests, imported by the worker process and by the tests."""

from __future__ import annotations

import asyncio

import redis.asyncio

from taskbridge import TaskBridge, report_progress

REDIS_URL = {redis_url!r}
GATES = {gates!r}
bridge = TaskBridge()


async def _gate(key: str, step: int) -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        assert await client.blpop([f"{{GATES}}:{{key}}:{{step}}"], timeout=20)
    finally:
        await client.aclose()


@bridge.task(backend="arq")
async def ok(n: int, *, label: str = "") -> int:
    return n * 2


@bridge.task(backend="arq")
def boom(message: str, code: int = 0) -> None:
    raise ValueError(f"{{message}} ({{code}})")  # the raising line


@bridge.task(backend="arq")
async def stepped(key: str) -> str:
    await _gate(key, 1)
    report_progress(0.5, "half")
    await _gate(key, 2)
    return "done"


@bridge.task(backend="arq", retries=1, retry_backoff=1.0, retry_jitter=False)
async def flaky(key: str) -> str:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        if await client.incr(f"{{GATES}}:{{key}}:tries") == 1:
            raise RuntimeError("the first attempt fails")
    finally:
        await client.aclose()
    return "second time lucky"


@bridge.task(backend="arq")
async def hold(key: str) -> None:
    await asyncio.sleep(60)
'''


@dataclass
class IndexedApp:
    """A test's own app module and queue (so its index is its own), and its worker."""

    module: ModuleType
    name: str
    env: dict[str, str]
    queue: str
    gates: str
    redis_url: str
    spawn: Callable[..., root.WorkerProcess]
    jobs: list[str]
    workers: list[root.WorkerProcess] = field(default_factory=list)

    @property
    def backend(self) -> ArqBackend:
        backend = self.module.bridge.backend("arq")
        assert isinstance(backend, ArqBackend)
        return backend

    @property
    def index(self) -> RedisIndex:
        index = self.backend.index
        assert isinstance(index, RedisIndex)
        return index

    def start_worker(self) -> root.WorkerProcess:
        worker = self.spawn(["worker", "arq", f"{self.name}:bridge"], env=self.env)
        worker.wait_for_output("taskbridge ARQ worker ready")
        self.workers.append(worker)
        return worker

    def open_gate(self, key: str, step: int) -> None:
        client = redis.Redis.from_url(self.redis_url)
        try:
            client.rpush(f"{self.gates}:{key}:{step}", "go")
        finally:
            client.close()

    def task(self, name: str) -> str:
        """The registered name of the app's task `name`."""
        return f"{self.name}.{name}"


@pytest.fixture
def indexed(
    tmp_path: Path,
    redis_url: str,
    unique_name: Callable[[str], str],
    spawn_worker: Callable[..., root.WorkerProcess],
    arq_jobs: list[str],
) -> Iterator[Callable[..., IndexedApp]]:
    """`indexed(**options)`: the app with this test's own queue and the alias's `options`;
    its worker is started by `start_worker()` and stopped at teardown."""
    made: list[IndexedApp] = []

    def make(**options: Any) -> IndexedApp:
        name = f"tbindex_{uuid.uuid4().hex[:10]}"
        gates = unique_name(f"gates{len(made)}")
        (tmp_path / f"{name}.py").write_text(APP_SOURCE.format(redis_url=redis_url, gates=gates))
        queue = unique_name(f"queue{len(made)}")
        env = {
            "TASKBRIDGE_BACKENDS__ARQ__REDIS_URL": redis_url,
            "TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME": queue,
            "TASKBRIDGE_BACKENDS__ARQ__POLL_DELAY": "1",
            **{f"TASKBRIDGE_BACKENDS__ARQ__{k.upper()}": str(v) for k, v in options.items()},
        }
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            module = importlib.import_module(name)
            module.bridge.settings  # noqa: B018 - read once, while the environment is set
        app = IndexedApp(module, name, env, queue, gates, redis_url, spawn_worker, arq_jobs)
        made.append(app)
        return app

    sys.path.insert(0, str(tmp_path))
    try:
        yield make
    finally:
        sys.path.remove(str(tmp_path))
        for app in made:
            sys.modules.pop(app.name, None)
            for worker in app.workers:
                worker.stop()


async def _closing(app: IndexedApp) -> None:
    await app.module.bridge.close()


async def _until(
    read: Callable[[], Awaitable[T]], accept: Callable[[T], bool], what: str, timeout: float = 15
) -> T:
    """Poll `read()` until `accept` takes its value; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = await read()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def _walk(index: RedisIndex, limit: int, **filters: str) -> list[list[IndexEntry]]:
    """Every page of the index, `limit` entries at most each, following the cursors."""
    pages: list[list[IndexEntry]] = []
    after = None
    while True:
        page = await index.page(
            state=filters.get("state"), task=filters.get("task"), after=after, limit=limit
        )
        pages.append(page.entries)
        if page.stopped is None:
            return pages
        after = page.stopped
        assert len(pages) < 100, "the cursors go round in circles"


async def _states(index: RedisIndex) -> dict[str, str]:
    [entries] = await _walk(index, 1000)
    return {entry.id: entry.state for entry in entries}


def _ms(status: TaskStatus) -> int:
    assert status.enqueued_at is not None
    return round(status.enqueued_at.timestamp() * 1000)


async def test_the_index_lists_filters_pages_and_counts_what_the_worker_did(
    indexed: Callable[..., IndexedApp], redis_url: str
) -> None:
    app = indexed()
    tasks, backend = app.module, app.backend
    await app.module.bridge.open()
    try:
        app.start_worker()
        key = uuid.uuid4().hex
        app.open_gate(key, 1)
        app.open_gate(key, 2)  # it reports progress and goes straight on
        with monitor(redis_url) as commands:
            succeeded = [await tasks.ok.enqueue(n, label=f"n{n}") for n in range(3)]
            succeeded.append(await tasks.stepped.enqueue(key))
            failed = [await tasks.boom.enqueue("no", code=n) for n in range(2)]
            deferred = await tasks.ok.using(delay=60).enqueue(99)
            app.jobs.extend(h.id for h in (*succeeded, *failed, deferred))
            assert (await deferred.cancel()).cancelled
            for handle in succeeded:
                await handle.result(timeout=RESULT_TIMEOUT)
            for handle in failed:
                with pytest.raises(TaskFailed):
                    await handle.result(timeout=RESULT_TIMEOUT)
        handles = [*succeeded, *failed, deferred]
        ids = [h.id for h in handles]
        expected = {
            **{h.id: "succeeded" for h in succeeded},
            **{h.id: "failed" for h in failed},
            deferred.id: "cancelled",
        }
        read = [await backend.status(task_id) for task_id in ids]
        statuses = [status for status in read if status is not None]
        assert [s.state for s in statuses] == [expected[i] for i in ids]

        # statuses() reads them all at once, exactly as status() reads each; unknown: None.
        unknown = uuid.uuid4().hex
        assert await backend.statuses([*ids, unknown]) == [*statuses, None]

        # Newest first by enqueue time (ties: the higher id first), every call once, in the
        # state the worker (or the cancel) left it in, under its task's name.
        [entries] = await _walk(app.index, 50)
        by_id = dict(zip(ids, statuses, strict=True))
        newest_first = sorted(ids, key=lambda i: (_ms(by_id[i]), i), reverse=True)
        assert [e.id for e in entries] == newest_first
        assert {e.id: e.state for e in entries} == expected
        assert all(e.score == _ms(by_id[e.id]) for e in entries)
        names = {h.id: h.task_name for h in handles}
        assert all(e.task == names[e.id] and e.retry_of is None for e in entries)

        # Filters: by state, by task, by both.
        [only_failed] = await _walk(app.index, 50, state="failed")
        assert sorted(e.id for e in only_failed) == sorted(h.id for h in failed)
        [ok_calls] = await _walk(app.index, 50, task=app.task("ok"))
        assert sorted(e.id for e in ok_calls) == sorted(
            [*(h.id for h in succeeded[:3]), deferred.id]
        )
        [ok_cancelled] = await _walk(app.index, 50, task=app.task("ok"), state="cancelled")
        assert [e.id for e in ok_cancelled] == [deferred.id]

        # Pages of 2 with `after=` cover every call exactly once, in the same order.
        pages = await _walk(app.index, 2)
        assert all(len(page) <= 2 for page in pages)
        assert [e.id for page in pages for e in page] == newest_first

        # Counts per state and per task and state.
        counts = await app.index.counts()
        assert counts.states == {"succeeded": 4, "failed": 2, "cancelled": 1}
        assert counts.tasks == {
            app.task("ok"): {"succeeded": 3, "cancelled": 1},
            app.task("stepped"): {"succeeded": 1},
            app.task("boom"): {"failed": 2},
        }

        # Arguments are the call's own, as the dispatch bound them (a keyword given for a
        # positional parameter travels positionally); what taskbridge carries never shows.
        first, second_failure = by_id[succeeded[0].id], by_id[failed[1].id]
        assert (first.args, first.kwargs) == ([0], {"label": "n0"})
        assert (second_failure.args, second_failure.kwargs) == (["no", 1], {})

        # The worker's outcome write carries the index move in its own MULTI/EXEC.
        _assert_moved_in_transaction(commands, succeeded[0].id, "succeeded")
        _assert_moved_in_transaction(commands, failed[0].id, "failed")
    finally:
        await _closing(app)


def _assert_moved_in_transaction(commands: list[Command], job_id: str, state: str) -> None:
    """The SET of the job's result and the index EVALSHA moving it to `state` were sent on one
    connection between one MULTI and its EXEC."""
    [stored] = [
        i
        for i, c in enumerate(commands)
        if c.client != "lua" and c.command.startswith(f"SET {result_prefix}{job_id} ")
    ]
    port = commands[stored].port
    mine = [(i, c.command) for i, c in enumerate(commands) if c.port == port and c.client != "lua"]
    position = [i for i, _ in mine].index(stored)
    begin = max(j for j in range(position + 1) if mine[j][1] == "MULTI")
    end = min(j for j in range(position, len(mine)) if mine[j][1] == "EXEC")
    inside = [command for _, command in mine[begin:end]]
    moves = [c for c in inside if c.startswith("EVALSHA") and f" {job_id} {state} " in c]
    assert len(moves) == 1, inside


async def test_a_watcher_is_told_of_each_change_the_worker_makes(
    indexed: Callable[..., IndexedApp],
) -> None:
    app = indexed()
    bridge, backend = app.module.bridge, app.backend
    await bridge.open()
    try:
        key = uuid.uuid4().hex
        _, call = bridge.prepare(app.module.stepped, (key,), {})
        app.jobs.append(call.id)
        index = app.index
        async with index.watch(call.id) as changed:
            await bridge.dispatch([(backend, call)])
            await _changed(changed, "the dispatch")
            assert (await backend.status(call.id)).state == "queued"  # type: ignore[union-attr]

            # No worker until now: what sets the event from here on is the worker's doing.
            changed.clear()
            app.start_worker()
            await _changed(changed, "the worker to start the call", timeout=30)
            status = await backend.status(call.id)
            assert status is not None
            assert (status.state, status.progress) == ("running", None)

            changed.clear()
            app.open_gate(key, 1)
            await _changed(changed, "the progress report")
            status = await backend.status(call.id)
            assert status is not None
            assert (status.state, status.progress, status.progress_message) == (
                "running",
                0.5,
                "half",
            )

            changed.clear()
            app.open_gate(key, 2)
            await _changed(changed, "the call to succeed")
            status = await backend.status(call.id)
            assert status is not None
            assert (status.state, status.result) == ("succeeded", "done")
        assert (await _states(index))[call.id] == "succeeded"
    finally:
        await _closing(app)


async def _changed(event: asyncio.Event, what: str, timeout: float = 10) -> None:
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pytest.fail(f"no change was announced within {timeout}s: {what}")


async def test_a_retry_is_indexed_as_retrying_then_as_its_outcome(
    indexed: Callable[..., IndexedApp],
) -> None:
    app = indexed()
    await app.module.bridge.open()
    try:
        app.start_worker()
        handle = await app.module.flaky.enqueue(uuid.uuid4().hex)
        app.jobs.append(handle.id)
        # The first attempt fails; the second comes a second later (its backoff).
        await _until(
            lambda: _states(app.index), lambda s: s.get(handle.id) == "retrying", "retrying"
        )
        assert await handle.result(timeout=RESULT_TIMEOUT) == "second time lucky"
        assert (await _states(app.index))[handle.id] == "succeeded"
        assert (await app.index.counts()).states == {"succeeded": 1}
    finally:
        await _closing(app)


async def test_failed_and_cancelled_calls_keep_their_task_and_arguments(
    indexed: Callable[..., IndexedApp],
) -> None:
    app = indexed()
    tasks, backend = app.module, app.backend
    await tasks.bridge.open()
    try:
        app.start_worker()
        failed = await tasks.boom.using(timeout=30).enqueue("kept", code=5)
        cancelled = await tasks.ok.using(delay=60).enqueue(7, label="never")
        aborted = await tasks.hold.enqueue("running")
        succeeded = await tasks.ok.enqueue(1)
        app.jobs.extend(h.id for h in (failed, cancelled, aborted, succeeded))
        assert (await cancelled.cancel()).cancelled
        await _until(aborted.status, lambda s: s == "running", "hold to start")
        assert (await aborted.cancel()).cancelled
        with pytest.raises(TaskFailed):
            await failed.result(timeout=RESULT_TIMEOUT)
        await succeeded.result(timeout=RESULT_TIMEOUT)

        assert await backend.kept_call(failed.id) == KeptCall(app.task("boom"), ("kept", 5), {})
        assert await backend.kept_call(cancelled.id) == KeptCall(
            app.task("ok"), (7,), {"label": "never"}
        )
        assert await backend.kept_call(aborted.id) == KeptCall(app.task("hold"), ("running",), {})
        assert await backend.kept_call(succeeded.id) is None
        assert await backend.kept_call(uuid.uuid4().hex) is None

        # The worker moved the aborted call; the API moved the one cancelled while queued.
        states = await _states(app.index)
        assert [states[h.id] for h in (failed, cancelled, aborted, succeeded)] == [
            "failed",
            "cancelled",
            "cancelled",
            "succeeded",
        ]

        # The failure's traceback comes back, down to the raising line; a cancellation has none.
        status = await backend.status(failed.id)
        assert status is not None and status.error is not None
        assert status.error.type == "builtins.ValueError"
        assert status.error.message == "kept (5)"
        assert status.error.traceback is not None
        assert 'raise ValueError(f"{message} ({code})")  # the raising line' in (
            status.error.traceback
        )
        assert status.error.traceback.rstrip().endswith("ValueError: kept (5)")
        [again] = await backend.statuses([failed.id])
        assert again == status
        aborted_status = await backend.status(aborted.id)
        assert aborted_status is not None and aborted_status.error is None

        # Retried with what was kept: a new call, indexed with the id of the one it re-runs.
        again = await tasks.bridge.retry(failed.id)
        app.jobs.append(again.id)
        assert again.id != failed.id
        with pytest.raises(TaskFailed, match=r"kept \(5\)"):
            await again.result(timeout=RESULT_TIMEOUT)
        assert await app.index.retry_of(again.id) == failed.id
        [newest] = (await app.index.page(state=None, task=None, after=None, limit=1)).entries
        assert (newest.id, newest.retry_of) == (again.id, failed.id)
        with pytest.raises(TaskNotRetryable):
            await tasks.bridge.retry(succeeded.id)
    finally:
        await _closing(app)


async def test_the_index_holds_at_most_index_max_entries(
    indexed: Callable[..., IndexedApp], redis_url: str
) -> None:
    app = indexed(index_max_entries=5)
    await app.module.bridge.open()
    try:
        handles = []
        for n in range(12):  # no worker: they stay queued
            handles.append(await app.module.ok.using(delay=600).enqueue(n))
        app.jobs.extend(h.id for h in handles)
        [entries] = await _walk(app.index, 100)
        assert len(entries) == 5
        # the newest (by enqueue time, to the ms; then by id, as the index orders them)
        statuses = [s for s in await app.backend.statuses([h.id for h in handles]) if s]
        newest = sorted(statuses, key=lambda s: (_ms(s), s.id))[-5:]
        assert {e.id for e in entries} == {s.id for s in newest}
        counts = await app.index.counts()
        assert counts == Counts(states={"queued": 5}, tasks={app.task("ok"): {"queued": 5}})
        client = redis.Redis.from_url(redis_url)
        try:
            prefix = INDEX_PREFIX + app.queue
            assert client.zcard(f"{prefix}:calls") == 5
            assert client.hlen(f"{prefix}:meta") == 5
            assert client.zcard(f"{prefix}:state:queued") == 5
            assert client.zcard(f"{prefix}:task:{app.task('ok')}") == 5
        finally:
            client.close()

        # A call dispatched again (the same job id) is not indexed twice.
        backend, call = app.module.bridge.prepare(app.module.ok.using(delay=600), (1,), {})
        app.jobs.append(call.id)
        await backend.enqueue([call])
        await backend.enqueue([call])
        counts = await app.index.counts()
        assert counts.states == {"queued": 5}
        assert (await _states(app.index))[call.id] == "queued"
    finally:
        await _closing(app)


async def test_an_alias_with_index_max_entries_0_keeps_no_index(
    indexed: Callable[..., IndexedApp], redis_url: str
) -> None:
    app = indexed(index_max_entries=0)
    await app.module.bridge.open()
    try:
        assert app.backend.index is None
        handle = await app.module.ok.using(delay=600).enqueue(1)
        app.jobs.append(handle.id)
        assert await handle.status() == "queued"
        client = redis.Redis.from_url(redis_url)
        try:
            assert list(client.scan_iter(match=f"{INDEX_PREFIX}{app.queue}*")) == []
        finally:
            client.close()
    finally:
        await _closing(app)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def own_backend(own_redis: OwnRedis) -> AsyncIterator[ArqBackend]:
    backend = ArqBackend("arq", {"redis_url": own_redis.url(1), "queue_name": "q"})
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


async def test_the_dispatch_adds_to_the_index_in_the_enqueue_script_itself(
    own_redis: OwnRedis, own_backend: ArqBackend, indexed: Callable[..., IndexedApp]
) -> None:
    app = indexed()  # for its tasks; the calls go to a Redis of the test's own
    bridge = app.module.bridge
    calls = [bridge.prepare(app.module.ok, (n,), {})[1] for n in range(2)]
    ids = [call.id for call in calls]
    with monitor(own_redis.url(1)) as commands:
        await own_backend.enqueue(calls)
    sent = [c for c in commands if c.client != "lua" and any(i in c.command for i in ids)]
    assert len(sent) == 1 and sent[0].command.startswith("EVALSHA"), sent
    # Everything Redis did from that EVALSHA up to the next command any client sent: the
    # script's own calls, the jobs' and the index's writes among them.
    start = commands.index(sent[0])
    burst = []
    for command in commands[start + 1 :]:
        if command.client != "lua":
            break
        burst.append(command.command)
    prefix = "taskbridge:index:q"
    for job_id in ids:
        job_write = _position(burst, rf"^PSETEX {job_key_prefix}{job_id} ")
        queued = _position(burst, rf"^ZADD q \d+ {job_id}$")
        indexed_at = _position(burst, rf"^ZADD {prefix}:calls NX \d+ {job_id}$")
        assert job_write < queued < indexed_at
        # (MONITOR shows the meta's tabs escaped, as \t)
        task = re.escape(app.task("ok"))
        _position(burst, rf"^HSET {prefix}:meta {job_id} queued\\t{task}\\t$")
    index = own_backend.index
    assert index is not None
    assert (await index.counts()).states == {"queued": 2}


def _position(commands: list[str], pattern: str) -> int:
    found = [i for i, command in enumerate(commands) if re.search(pattern, command)]
    assert len(found) == 1, f"{pattern!r} in {commands}"
    return found[0]


# -- the worker's hand-written transactions against ARQ's own ------------------------------


async def _noop(ctx: dict[str, Any]) -> None:
    return None


async def test_the_workers_outcome_writes_leave_what_arqs_own_leave(
    own_redis: OwnRedis,
) -> None:
    """The worker's finish_job and finish_failed_job are ARQ's transactions plus the index move
    (see `_worker`): on identical jobs, they leave Redis as ARQ's own methods do."""
    client = own_redis.client(1)
    pool = ArqBackend("arq", {"redis_url": own_redis.url(1)}).connect()
    spec = IndexSpec("taskbridge:index:q", 3_600_000, 100)
    worker = TaskbridgeWorker(
        [func(_noop, name="noop")],
        wakeups=WakeUps(),
        poll_delay=1,
        redis_pool=pool,
        queue_name="q",
        keep_result=60,
        index=spec,
        handle_signals=False,
    )
    worker._link_ok.set()  # as its main() does once it reaches Redis (not run here)
    try:
        result = b'{"t":1,"f":"noop","a":[],"k":{},"et":1,"s":true,"r":null}'
        cases: list[tuple[str, Callable[[Worker, str], Awaitable[None]]]] = [
            ("succeeded", lambda w, j: w.finish_job(j, True, result, 60, False, None, None)),
            ("kept forever", lambda w, j: w.finish_job(j, True, result, 60, True, None, None)),
            ("no result", lambda w, j: w.finish_job(j, True, None, 60, False, None, None)),
            ("retry later", lambda w, j: w.finish_job(j, False, None, 60, False, 5000, None)),
            ("run again", lambda w, j: w.finish_job(j, False, None, 60, False, None, None)),
            ("failed early", lambda w, j: w.finish_failed_job(j, result)),
        ]
        for what, finish in cases:
            ours, arqs = uuid.uuid4().hex, uuid.uuid4().hex
            for job_id in (ours, arqs):
                _queued_and_running(client, job_id)
            await finish(worker, ours)
            await finish(_ArqsOwn(worker), arqs)
            assert _left(client, ours) == _left(client, arqs), what
    finally:
        await pool.aclose()
        client.close()


class _ArqsOwn:
    """ARQ's own finish_job and finish_failed_job, run with `worker`'s settings and pool."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def finish_job(self, *args: Any) -> None:
        await Worker.finish_job(self.worker, *args)

    async def finish_failed_job(self, *args: Any) -> None:
        await Worker.finish_failed_job(self.worker, *args)


def _queued_and_running(client: redis.Redis, job_id: str) -> None:
    client.set(job_key_prefix + job_id, b"{}", px=600_000)
    client.set(in_progress_key_prefix + job_id, b"1", px=600_000)
    client.set(retry_key_prefix + job_id, b"1", ex=88_400)
    client.zadd("q", {job_id: 1000})
    client.zadd(abort_jobs_ss, {job_id: 1000})


def _left(client: redis.Redis, job_id: str) -> dict[str, Any]:
    """What Redis holds of a job, with TTLs rounded to the nearest minute (-1: none or no key;
    a 60 s TTL read a millisecond later is still 1)."""
    keys = {
        prefix: prefix + job_id
        for prefix in (job_key_prefix, in_progress_key_prefix, retry_key_prefix, result_prefix)
    }
    left: dict[str, Any] = {
        prefix: (client.get(key), -1 if (ttl := client.pttl(key)) < 0 else round(ttl / 60_000))
        for prefix, key in keys.items()
    }
    left["queue"] = client.zscore("q", job_id)
    left["abort"] = client.zscore(abort_jobs_ss, job_id)
    return left


def test_an_alias_indexes_under_its_queue_name_for_as_long_as_it_keeps_results() -> None:
    def spec(**options: Any) -> IndexSpec | None:
        return ArqBackend("arq", {"redis_url": "redis://127.0.0.1:6379/9", **options}).index_spec

    assert spec() == IndexSpec("taskbridge:index:taskbridge:queue", 3_600_000, 100_000)
    assert spec(queue_name="app-b", keep_result=60, index_max_entries=10) == IndexSpec(
        "taskbridge:index:app-b", 60_000, 10
    )
    assert spec(keep_result_forever=True) == IndexSpec(
        "taskbridge:index:taskbridge:queue", 86_400_000, 100_000
    )
    assert spec(keep_result=0) is None  # no result is kept: nothing finished to list
    assert spec(index_max_entries=0) is None
