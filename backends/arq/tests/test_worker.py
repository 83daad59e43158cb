"""Real `taskbridge worker arq` processes against real Redis: what runs, where, and what comes back.

Most tests share the session's worker (`arq_app`), whose poll_delay is 1 s: a job started much
sooner than that was started by a wake-up, not by ARQ's poll.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from arq.jobs import DeserializationError, JobStatus
from arq.worker import JobExecutionFailed
from taskbridge_arq import WAKE_CHANNEL_PREFIX, RemoteTaskError

from .conftest import ArqApp, retire, wait_until

RESULT_TIMEOUT = 15


@pytest.fixture
async def app(arq_app: ArqApp) -> AsyncIterator[ArqApp]:
    """The shared app and worker, with the app's bridge open on this test's event loop."""
    await arq_app.module.bridge.open()
    yield arq_app
    await arq_app.module.bridge.close()


async def _result(app: ArqApp, job_id: str, queue: str | None = None) -> Any:
    job = app.backend.job(job_id, queue)
    return await job.result(timeout=RESULT_TIMEOUT, poll_delay=0.01)


async def _write_raw_job(app: ArqApp, job_id: str, payload: bytes) -> None:
    """Put a payload in the queue as an attacker or a broken client with Redis access could."""
    now_ms = int(time.time() * 1000)
    redis = app.backend.redis
    await redis.psetex(f"arq:job:{job_id}", 60_000, payload)
    await redis.zadd(app.queue, {job_id: now_ms})
    await redis.publish(WAKE_CHANNEL_PREFIX + app.queue, str(now_ms))


class Exploit:
    """Unpickling this creates a file: what a pickled job could do to a worker that loads it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


async def test_sync_and_async_tasks_run_in_the_worker_with_their_exact_arguments(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    key = unique_name("args")
    args = (1, "two", [3.5, None], {"nested": {"ok": True}})
    # ARQ's enqueue_job would take these for its own options; here they are the task's.
    kwargs = {"flag": False, "_job_id": "mine", "_queue_name": "x", "_defer_by": 60, "ctx": "c"}
    tasks = app.module
    handles = [
        await tasks.record_sync.enqueue(key, *args, **kwargs),
        await tasks.record_async.enqueue(key, *args, **kwargs),
    ]
    arq_jobs.extend(h.id for h in handles)

    expected = {"args": [1, "two", [3.5, None], {"nested": {"ok": True}}], "kwargs": kwargs}
    assert [await _result(app, h.id) for h in handles] == [expected, expected]
    records = {record["id"]: record for record in app.records(key)}
    assert set(records) == {h.id for h in handles}
    for handle in handles:
        record = records[handle.id]
        assert record["pid"] == app.worker.process.pid != os.getpid()
        assert (record["args"], record["kwargs"]) == (expected["args"], kwargs)
        assert (record["attempt"], record["backend"]) == (1, "arq")
    assert records[handles[0].id]["thread"] != "MainThread"  # a def task runs in a thread
    assert records[handles[1].id]["thread"] == "MainThread"  # an async def one on the loop


async def test_failures_come_back_as_typed_exceptions(app: ArqApp, arq_jobs: list[str]) -> None:
    fail = app.module.fail
    handles = [
        await fail.enqueue("value", "bad value"),
        await fail.enqueue("custom", "over quota"),
        await fail.enqueue("local", "not importable here"),
        await app.module.unserializable.enqueue(),
    ]
    arq_jobs.extend(h.id for h in handles)

    with pytest.raises(ValueError, match="bad value") as value_error:
        await _result(app, handles[0].id)
    assert "Remote traceback" in value_error.value.__notes__[0]
    with pytest.raises(app.module.QuotaError, match="over quota"):
        await _result(app, handles[1].id)
    with pytest.raises(RemoteTaskError) as remote:
        await _result(app, handles[2].id)
    assert remote.value.type_name.endswith("fail.<locals>.LocalError")
    assert remote.value.message == "not importable here"
    assert remote.value.remote_traceback and "raise LocalError" in remote.value.remote_traceback
    with pytest.raises(TypeError, match="JSON cannot carry"):
        await _result(app, handles[3].id)


async def test_a_failing_task_is_retried_with_backoff_until_it_succeeds(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    key = unique_name("flaky")
    started = time.monotonic()
    handle = await app.module.flaky.enqueue(key, 2)  # retries=3, backoff 0.05 s, doubling
    arq_jobs.append(handle.id)

    assert await _result(app, handle.id) == 3
    elapsed = time.monotonic() - started
    assert elapsed >= 0.05 + 0.1  # both backoffs were waited
    assert elapsed < 0.9  # ... and no 1 s poll: the worker woke when each retry was due
    output = app.worker.output
    assert f"{handle.id}:{app.module.flaky.name} retrying job in 0.05s" in output
    assert f"{handle.id}:{app.module.flaky.name} retrying job in 0.10s" in output


async def test_retries_end_with_the_last_error(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    handle = await app.module.flaky.enqueue(unique_name("flaky"), 10)
    arq_jobs.append(handle.id)
    with pytest.raises(RuntimeError, match="attempt 4 fails"):  # 1 try + 3 retries
        await _result(app, handle.id)


async def test_the_dispatchers_retries_travel_with_the_job(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    flaky = app.module.flaky  # the worker's own policy: retries=3
    fewer = await flaky.using(retries=0).enqueue(unique_name("fewer"), 1)
    more = await flaky.using(retries=5, retry_backoff=0.01).enqueue(unique_name("more"), 5)
    arq_jobs.extend([fewer.id, more.id])

    with pytest.raises(RuntimeError, match="attempt 1 fails"):
        await _result(app, fewer.id)
    assert await _result(app, more.id) == 6  # above the worker's retries and ARQ's max_tries


async def test_an_async_task_is_cut_at_its_timeout(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    key = unique_name("slow")
    handle = await app.module.sleepy.enqueue(key, 30)  # timeout=0.5
    arq_jobs.append(handle.id)

    with pytest.raises(TimeoutError):
        await _result(app, handle.id)
    info = await app.backend.job(handle.id).result_info()
    assert info is not None
    ran = (info.finish_time - info.start_time).total_seconds()
    assert 0.45 <= ran < 5
    assert [r["event"] for r in app.records(key)] == ["started"]


async def test_an_aborted_job_reports_cancelled(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    key = unique_name("abort")
    handle = await app.module.sleepy.using(timeout=60).enqueue(key, 60)
    arq_jobs.append(handle.id)
    job = app.backend.job(handle.id)
    await asyncio.to_thread(wait_until, lambda: app.records(key), 10, "the job to start")

    assert await job.abort(timeout=RESULT_TIMEOUT, poll_delay=0.02) is True
    info = await job.result_info()
    assert info is not None and isinstance(info.result, asyncio.CancelledError)
    assert [r["event"] for r in app.records(key)] == ["started"]


async def test_a_delayed_call_starts_when_it_is_due(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    key = unique_name("later")
    dispatched = time.time()
    handle = await app.module.record_async.using(delay=0.5).enqueue(key)
    arq_jobs.append(handle.id)

    await _result(app, handle.id)
    [record] = app.records(key)
    assert 0.5 <= record["at"] - dispatched < 0.9  # woken at the due time, not by the 1 s poll


async def test_jobs_start_at_once_without_waiting_for_a_poll(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    key = unique_name("latency")
    latencies = []
    for _ in range(10):
        dispatched = time.time()
        handle = await app.module.record_async.enqueue(key)
        arq_jobs.append(handle.id)
        await _result(app, handle.id)
        latencies.append(app.records(key)[-1]["at"] - dispatched)
    assert statistics.median(latencies) < 0.1, latencies  # the 1 s poll would give ~0.5 s


async def test_arqs_own_enqueue_job_is_served_with_the_workers_policy(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    key = unique_name("native")
    job = await app.backend.redis.enqueue_job(
        app.module.record_async.name, key, "from arq", _queue_name=app.queue
    )
    assert job is not None
    arq_jobs.append(job.job_id)
    assert await _result(app, job.job_id) == {"args": ["from arq"], "kwargs": {}}


async def test_a_pickled_job_is_rejected_without_being_unpickled(
    app: ArqApp, arq_jobs: list[str], tmp_path: Path, unique_name: Callable[[str], str]
) -> None:
    def pickled(marker: Path) -> bytes:
        job = {"t": None, "f": app.module.record_sync.name, "a": [Exploit(marker)], "k": {}}
        return pickle.dumps({**job, "et": int(time.time() * 1000)})

    pickle.loads(pickled(tmp_path / "proof"))  # the payload is live: loading it acts
    assert (tmp_path / "proof").exists()

    marker = tmp_path / "unpickled"
    job_id = str(uuid.uuid4())
    arq_jobs.append(job_id)
    await _write_raw_job(app, job_id, pickled(marker))

    app.worker.wait_for_output(f"deserializing job {job_id} failed")
    app.worker.wait_for_output("the payload is a pickle")
    with pytest.raises(DeserializationError):
        await _result(app, job_id)
    assert not marker.exists()

    key = unique_name("after")
    handle = await app.module.record_sync.enqueue(key)
    arq_jobs.append(handle.id)
    await _result(app, handle.id)
    assert app.records(key)[0]["pid"] == app.worker.process.pid


@pytest.mark.parametrize(
    "payload",
    [b"not json at all", b'{"t": null, "f": "x", "a": [1', b'["a", "list"]'],
    ids=["not-json", "truncated", "not-a-job"],
)
async def test_an_undecodable_job_is_rejected_and_the_worker_keeps_running(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str], payload: bytes
) -> None:
    job_id = str(uuid.uuid4())
    arq_jobs.append(job_id)
    await _write_raw_job(app, job_id, payload)

    app.worker.wait_for_output(f"deserializing job {job_id} failed")
    with pytest.raises(DeserializationError):
        await _result(app, job_id)
    handle = await app.module.record_async.enqueue(unique_name("after"))
    arq_jobs.append(handle.id)
    await _result(app, handle.id)
    assert app.worker.process.poll() is None


async def test_a_job_for_an_unknown_task_is_rejected_and_the_worker_keeps_running(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    job = await app.backend.redis.enqueue_job("no.such.task", 1, _queue_name=app.queue)
    assert job is not None
    arq_jobs.append(job.job_id)
    await app.backend.redis.publish(WAKE_CHANNEL_PREFIX + app.queue, "0")

    app.worker.wait_for_output(f"job {job.job_id}, function 'no.such.task' not found")
    with pytest.raises(JobExecutionFailed, match="not found"):
        await _result(app, job.job_id)
    handle = await app.module.record_sync.enqueue(unique_name("after"))
    arq_jobs.append(handle.id)
    await _result(app, handle.id)


async def test_sigterm_hands_the_running_job_back_and_a_burst_worker_finishes_it(
    app: ArqApp,
    arq_jobs: list[str],
    unique_name: Callable[[str], str],
    spawn_worker: Callable[..., Any],
) -> None:
    key, queue = unique_name("handover"), unique_name("q")
    command = ["worker", "arq", f"{app.module.__name__}:bridge", "--queue", queue]
    handle = await app.module.sleepy.using(queue=queue, timeout=30).enqueue(key, 1.0)
    arq_jobs.append(handle.id)
    job = app.backend.job(handle.id, queue)

    first = spawn_worker(command, env=app.env, cwd=app.directory)
    try:
        await asyncio.to_thread(wait_until, lambda: app.records(key), 15, "the job to start")
        first.signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.process.wait, 15) == 0
    finally:
        retire(first)
    assert "shutdown on SIGTERM" in first.output
    assert f"{handle.id}:{app.module.sleepy.name} cancelled, will be run again" in first.output
    assert await job.status() == JobStatus.queued

    second = spawn_worker([*command, "--burst"], env=app.env, cwd=app.directory)
    try:
        assert await job.result(timeout=RESULT_TIMEOUT, poll_delay=0.02) == "slept"
        assert await asyncio.to_thread(second.process.wait, 15) == 0  # burst: exits when done
    finally:
        retire(second)
    events = [(r["event"], r["attempt"], r["pid"]) for r in app.records(key)]
    assert events == [
        ("started", 1, first.process.pid),
        ("started", 2, second.process.pid),
        ("finished", 2, second.process.pid),
    ]
