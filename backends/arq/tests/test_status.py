"""Status, progress, cancel, signing and idempotency keys, against real workers and Redis.

Most tests share the session's worker (`arq_app`, poll_delay 1 s). A job that must be seen
queued is enqueued with a long delay and then made due (`_make_due`), which is what the delay's
end does; tests that need a worker with other settings, or none yet, spawn one.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from arq.constants import abort_jobs_ss
from fastapi.testclient import TestClient
from taskbridge_arq import (
    DEDUP_KEY_PREFIX,
    JOB_FIELD,
    PROGRESS_KEY_PREFIX,
    SIGNATURE_FIELD,
    WAKE_CHANNEL_PREFIX,
    ArqBackend,
    deserialize,
)

from taskbridge import TaskCancelled, TaskFailed, TaskHandle, TaskStatus

from .conftest import ArqApp, monitor, retire, wait_until

RESULT_TIMEOUT = 15
SIGNING_KEY = "a-test-signing-key-of-some-length"


@pytest.fixture
async def app(arq_app: ArqApp) -> AsyncIterator[ArqApp]:
    """The shared app and worker, with the app's bridge open on this test's event loop."""
    await arq_app.module.bridge.open()
    yield arq_app
    await arq_app.module.bridge.close()


async def _until(
    handle: TaskHandle, accept: Callable[[TaskStatus], bool], what: str, timeout: float = 10
) -> TaskStatus:
    """Poll the handle's status until `accept` takes it; fail naming `what` and the last one."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        info = await handle.info()
        if accept(info):
            return info
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; last status: {info!r}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def _in_thread(predicate: Callable[[], object], what: str, timeout: float = 10) -> None:
    await asyncio.to_thread(wait_until, predicate, timeout, what)


async def _make_due(app: ArqApp, queue: str, *handles: TaskHandle) -> None:
    """Make deferred jobs due now and announce it, as their delay's end would."""
    client = app.backend.redis
    now_ms = int(time.time() * 1000)
    await client.zadd(queue, {h.id: now_ms for h in handles}, xx=True)
    await client.publish(WAKE_CHANNEL_PREFIX + queue, str(now_ms))


def _near_now(moment: datetime | None) -> bool:
    return moment is not None and abs(datetime.now(UTC) - moment) < timedelta(seconds=30)


async def test_status_follows_jobs_from_queued_through_progress_to_succeeded(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str], redis_url: str
) -> None:
    tasks = app.module
    keys = {"async": unique_name("async"), "sync": unique_name("sync")}
    handles = {
        "async": await tasks.steps_async.using(delay=60).enqueue(keys["async"]),
        "sync": await tasks.steps_sync.using(delay=60).enqueue(keys["sync"]),
    }
    arq_jobs.extend(h.id for h in handles.values())

    for kind, handle in handles.items():
        info = await handle.info()
        assert (info.state, info.attempts, info.backend) == ("queued", 0, "arq")
        assert info.task_name == getattr(tasks, f"steps_{kind}").name
        assert _near_now(info.enqueued_at)
        assert info.started_at is info.finished_at is info.progress is info.result is None

    # A status is one command: an MGET of the job's keys.
    looked_up = app.module.bridge.handle(handles["sync"].id, "arq")
    with monitor(redis_url) as commands:
        assert await looked_up.status() == "queued"
    about = [c.command for c in commands if handles["sync"].id in c.command]
    assert len(about) == 1 and about[0].startswith("MGET"), about

    await _make_due(app, app.queue, *handles.values())
    expected = {"async": (0.4, "halfway"), "sync": (0.25, "a quarter")}
    running = {}
    for kind, handle in handles.items():
        running[kind] = info = await _until(
            handle,
            lambda i: i.state == "running" and i.progress is not None,
            f"the {kind} task to run and report progress",
        )
        assert (info.progress, info.progress_message) == expected[kind]
        assert await handle.progress() == expected[kind]
        assert info.attempts == 1 and info.finished_at is None
        assert info.enqueued_at is not None and info.started_at is not None
        assert info.enqueued_at <= info.started_at and _near_now(info.started_at)

    for kind, handle in handles.items():
        app.open_gate(keys[kind])
        assert await handle.result(timeout=RESULT_TIMEOUT) == {"done": keys[kind]}
        info = await handle.info()
        assert (info.state, info.result, info.attempts, info.error) == (
            "succeeded",
            {"done": keys[kind]},
            1,
            None,
        )
        # Running: the claim's time; finished: ARQ's own start time, a moment later.
        assert info.started_at is not None and running[kind].started_at is not None
        assert timedelta(0) <= info.started_at - running[kind].started_at < timedelta(seconds=1)
        assert info.finished_at is not None and info.finished_at >= info.started_at
        assert (info.progress, info.progress_message) == expected[kind]  # the last report


async def test_a_task_that_reports_no_progress_writes_no_progress_key(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    handle = await app.module.record_async.enqueue(unique_name("quiet"))
    arq_jobs.append(handle.id)
    await handle.result(timeout=RESULT_TIMEOUT)
    assert await app.backend.redis.exists(PROGRESS_KEY_PREFIX + handle.id) == 0
    assert await handle.progress() == (None, None)


async def test_a_failed_job_reports_its_error_and_result_raises_task_failed(
    app: ArqApp, arq_jobs: list[str]
) -> None:
    handle = await app.module.fail.enqueue("custom", "over quota")
    arq_jobs.append(handle.id)

    with pytest.raises(TaskFailed) as failed:
        await handle.result(timeout=RESULT_TIMEOUT)
    error_type = f"{app.module.__name__}.QuotaError"
    assert (failed.value.error_type, failed.value.error_message) == (error_type, "over quota")
    info = await handle.info()
    assert (info.state, info.attempts, info.result) == ("failed", 1, None)
    assert info.error is not None and (info.error.type, info.error.message) == (
        error_type,
        "over quota",
    )
    assert info.started_at is not None and info.finished_at is not None


async def test_a_job_waiting_for_its_retry_is_retrying_and_cancelling_it_ends_the_retries(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    key = unique_name("flaky")
    flaky = app.module.flaky.using(retries=3, retry_backoff=60, retry_jitter=False)
    handle = await flaky.enqueue(key, 5)
    arq_jobs.append(handle.id)

    info = await _until(handle, lambda i: i.state == "retrying", "the first try to fail")
    assert info.attempts == 1
    answer = await handle.cancel()
    assert (answer.cancelled, answer.state) == (True, "cancelled")
    assert "after 1 attempt(s)" in answer.detail

    info = await handle.info()
    assert (info.state, info.attempts, info.started_at) == ("cancelled", 1, None)
    with pytest.raises(TaskCancelled):
        await handle.result(timeout=1)
    assert await app.backend.redis.zscore(app.queue, handle.id) is None  # out of the queue
    assert app.counter(key) == 1


async def test_a_cancelled_queued_job_never_runs(
    app: ArqApp,
    arq_jobs: list[str],
    unique_name: Callable[[str], str],
    spawn_worker: Callable[..., Any],
) -> None:
    queue = unique_name("q")
    keys = {name: unique_name(name) for name in ("due", "deferred", "later")}
    count = app.module.count.using(queue=queue)
    due = await count.enqueue(keys["due"])
    deferred = await count.using(delay=3600).enqueue(keys["deferred"])
    arq_jobs.extend([due.id, deferred.id])
    assert await due.status() == await deferred.status() == "queued"  # no worker serves queue

    for handle in (due, deferred):
        answer = await handle.cancel()
        assert (answer.cancelled, answer.state) == (True, "cancelled")
        assert answer.detail == "cancelled before it started; it will not run"
        info = await handle.info()
        assert (info.state, info.attempts, info.started_at) == ("cancelled", 0, None)
        assert _near_now(info.finished_at)
        with pytest.raises(TaskCancelled):
            await handle.result(timeout=1)
        again = await handle.cancel()
        assert (again.cancelled, again.detail) == (False, "already cancelled")

    later = await count.enqueue(keys["later"])
    arq_jobs.append(later.id)
    command = ["worker", "arq", f"{app.module.__name__}:bridge", "--queue", queue, "--burst"]
    quick = {**app.env, "TASKBRIDGE_BACKENDS__ARQ__POLL_DELAY": "0.05"}  # exits sooner
    worker = spawn_worker(command, env=quick, cwd=app.directory)
    try:
        assert await later.result(timeout=RESULT_TIMEOUT) == 1
        # A burst worker exits once the queue is empty: the cancelled jobs left it.
        assert await asyncio.to_thread(worker.process.wait, 15) == 0
    finally:
        retire(worker)
    assert (app.counter(keys["due"]), app.counter(keys["deferred"])) == (0, 0)
    assert await due.status() == "cancelled"


async def test_cancelling_a_running_async_job_aborts_it_and_its_cleanup_runs(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    key = unique_name("abort")
    handle = await app.module.guarded.enqueue(key)
    arq_jobs.append(handle.id)
    await _in_thread(lambda: app.events(key) == ["started"], "the job to start")
    assert await handle.status() == "running"

    started = time.monotonic()
    answer = await handle.cancel()
    assert time.monotonic() - started < 0.9  # woken by the abort, not by the 1 s poll
    assert (answer.cancelled, answer.state) == (True, "cancelled")
    assert "aborted while running" in answer.detail
    assert app.events(key) == ["started", "cancelled", "cleanup"]  # drained before the answer
    with pytest.raises(TaskCancelled):
        await handle.result(timeout=1)
    info = await handle.info()
    assert (info.state, info.attempts, info.error) == ("cancelled", 1, None)
    assert info.started_at is not None and info.finished_at is not None
    again = await handle.cancel()
    assert (again.cancelled, again.state, again.detail) == (False, "cancelled", "already cancelled")


async def test_a_running_def_job_cannot_be_cancelled_and_an_arq_abort_leaves_it_running(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    keys = {"cancel": unique_name("cancel"), "abort": unique_name("abort")}
    handles = {name: await app.module.steps_sync.enqueue(key) for name, key in keys.items()}
    arq_jobs.extend(h.id for h in handles.values())
    for key in keys.values():
        await _in_thread(lambda key=key: app.events(key) == ["started"], "the job to start")

    answer = await handles["cancel"].cancel()
    assert (answer.cancelled, answer.state) == (False, "running")
    assert "def task" in answer.detail and "cannot be interrupted" in answer.detail
    assert await app.backend.redis.zscore(abort_jobs_ss, handles["cancel"].id) is None

    # An abort requested in ARQ's own way (what Job.abort adds to ARQ's abort set) would
    # abandon the thread while it runs on: the worker refuses it.
    client = app.backend.redis
    await client.zadd(abort_jobs_ss, {handles["abort"].id: int(time.time() * 1000)})
    await client.publish(WAKE_CHANNEL_PREFIX + app.queue, "abort")
    await asyncio.to_thread(
        app.worker.wait_for_output, f"job {handles['abort'].id} runs a def task"
    )
    deadline = time.monotonic() + 5
    while await client.zscore(abort_jobs_ss, handles["abort"].id) is not None:
        assert time.monotonic() < deadline, "the refused abort stayed in ARQ's abort set"
        await asyncio.sleep(0.005)

    for name, key in keys.items():
        assert await handles[name].status() == "running"
        app.open_gate(key)
        assert await handles[name].result(timeout=RESULT_TIMEOUT) == {"done": key}
        assert app.events(key) == ["started", "finished"]


async def test_unknown_ids_have_no_status_and_cannot_be_cancelled(app: ArqApp) -> None:
    missing = str(uuid.uuid4())
    assert await app.backend.status(missing) is None
    assert await app.module.bridge.handle(missing).status() == "unknown"
    answer = await app.backend.cancel(missing)
    assert (answer.cancelled, answer.state) == (False, "unknown")
    assert "no ARQ job" in answer.detail


async def test_a_keyed_call_dispatched_again_within_its_ttl_runs_once(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    key, order = unique_name("count"), unique_name("order")
    count = app.module.count
    first = await count.using(key=order).enqueue(key)
    second = await count.using(key=order).enqueue(key)
    arq_jobs.append(first.id)
    assert second.id == first.id
    assert await first.result(timeout=RESULT_TIMEOUT) == 1

    ttl = await app.backend.redis.pttl(DEDUP_KEY_PREFIX + first.id)
    assert 86_000_000 < ttl <= 86_400_000  # key_ttl: one day by default
    # ARQ drops results after keep_result; the dedup key still holds within key_ttl.
    await app.backend.redis.delete(f"arq:result:{first.id}")
    third = await count.using(key=order).enqueue(key)
    assert third.id == first.id
    assert await third.status() == "unknown"  # nothing was queued again

    other = await count.using(key=unique_name("other-order")).enqueue(key)
    arq_jobs.append(other.id)
    assert other.id != first.id
    assert await other.result(timeout=RESULT_TIMEOUT) == 2  # ... and the first ran once


async def test_a_short_key_ttl_lets_the_key_be_used_again_once_the_job_is_gone(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    key, order = unique_name("count"), unique_name("order")
    keyed = app.module.count.using(key=order, key_ttl=0.05)
    first = await keyed.enqueue(key)
    arq_jobs.append(first.id)
    assert await first.result(timeout=RESULT_TIMEOUT) == 1
    client = app.backend.redis
    deadline = time.monotonic() + 5
    while await client.exists(DEDUP_KEY_PREFIX + first.id):
        assert time.monotonic() < deadline, "the dedup key did not expire"
        await asyncio.sleep(0.01)
    await client.delete(f"arq:result:{first.id}")
    again = await keyed.enqueue(key)
    assert again.id == first.id
    assert await again.result(timeout=RESULT_TIMEOUT) == 2


def test_the_router_answers_with_the_workers_state(
    arq_app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    key, order = unique_name("count"), unique_name("order")
    with TestClient(arq_app.module.app) as client:
        ids = [client.post(f"/orders/{order}", params={"key": key}).json()["id"] for _ in "ab"]
        arq_jobs.append(ids[0])
        assert ids[0] == ids[1]  # the same order placed twice: one call

        bodies: list[dict[str, Any]] = []

        def succeeded() -> bool:
            response = client.get(f"/tasks/{ids[0]}")
            assert response.status_code == 200, response.text
            bodies.append(response.json())
            return bool(bodies[-1]["state"] == "succeeded")

        wait_until(succeeded, RESULT_TIMEOUT, "GET /tasks/{id} to say succeeded")
        body = bodies[-1]
        assert (body["result"], body["attempts"], body["backend"]) == (1, 1, "arq")
        assert body["task_name"] == arq_app.module.count.name
        assert body["enqueued_at"] and body["started_at"] and body["finished_at"]

        conflict = client.delete(f"/tasks/{ids[0]}")
        assert conflict.status_code == 409 and "already succeeded" in conflict.text
        assert client.get(f"/tasks/{uuid.uuid4()}").status_code == 404
    assert arq_app.counter(key) == 1


async def test_signed_jobs_run_and_unsigned_or_altered_ones_are_rejected(
    app: ArqApp,
    arq_jobs: list[str],
    unique_name: Callable[[str], str],
    spawn_worker: Callable[..., Any],
) -> None:
    queue = unique_name("signed")
    command = ["worker", "arq", f"{app.module.__name__}:bridge", "--queue", queue]
    env = {**app.env, "TASKBRIDGE_SIGNING_KEY": SIGNING_KEY}
    worker = spawn_worker(command, env=env, cwd=app.directory)
    bridge = app.module.bridge
    record = app.module.record_sync.using(queue=queue)
    keys = {name: unique_name(name) for name in ("signed", "altered", "unsigned", "after")}
    try:
        await asyncio.to_thread(worker.wait_for_output, "taskbridge ARQ worker ready")
        with bridge.override(signing_key=SIGNING_KEY):
            await bridge.open()
            try:
                backend = bridge.backend("arq")
                assert isinstance(backend, ArqBackend)
                await _check_signed(app, backend, worker, record, keys, arq_jobs)
            finally:
                await bridge.close()
        assert worker.process.poll() is None
    finally:
        retire(worker)


async def _check_signed(
    app: ArqApp,
    backend: ArqBackend,
    worker: Any,
    record: Any,
    keys: dict[str, str],
    arq_jobs: list[str],
) -> None:
    client = backend.redis
    signed = await record.enqueue(keys["signed"], "hello")
    arq_jobs.append(signed.id)
    assert await signed.result(timeout=RESULT_TIMEOUT) == {"args": ["hello"], "kwargs": {}}

    # A signed job altered in Redis: its argument changed.
    altered = await record.using(delay=60).enqueue(keys["altered"], "original")
    arq_jobs.append(altered.id)
    raw = await client.get(f"arq:job:{altered.id}")
    job = json.loads(raw)
    assert isinstance(job[JOB_FIELD][SIGNATURE_FIELD], str) and job["k"] == {}
    job["a"][1] = "tampered"
    await client.set(f"arq:job:{altered.id}", json.dumps(job), keepttl=True)
    await _make_due(app, record.policy.queue, altered)

    # An unsigned job written straight into Redis.
    unsigned_id = str(uuid.uuid4())
    arq_jobs.append(unsigned_id)
    now_ms = int(time.time() * 1000)
    unsigned = {"t": None, "f": record.name, "a": [keys["unsigned"]], "k": {}, "et": now_ms}
    deserialize(json.dumps(unsigned).encode())  # a well-formed job, only not signed
    await client.psetex(f"arq:job:{unsigned_id}", 60_000, json.dumps(unsigned))
    await client.zadd(record.policy.queue, {unsigned_id: now_ms})
    await client.publish(WAKE_CHANNEL_PREFIX + record.policy.queue, str(now_ms))

    name = record.name
    for job_id, reason in ((altered.id, "signature does not match"), (unsigned_id, "not signed")):
        line = f"job {job_id} rejected: task '{name}' .{job_id}.: [^\n]*{reason}"
        await asyncio.to_thread(worker.wait_for_output, line)
    for handle in (altered, TaskHandle(unsigned_id, None, "arq", app.module.bridge)):
        with pytest.raises(TaskFailed) as failed:
            await handle.result(timeout=RESULT_TIMEOUT)
        assert failed.value.error_type.endswith("MessageError")
        assert "rejected" in failed.value.error_message
        assert (await handle.info()).attempts == 1  # not retried
    assert app.records(keys["altered"]) == app.records(keys["unsigned"]) == []

    after = await record.enqueue(keys["after"])  # the worker goes on
    arq_jobs.append(after.id)
    assert await after.result(timeout=RESULT_TIMEOUT) == {"args": [], "kwargs": {}}


async def test_status_reads_keys_written_by_plain_arq_and_foreign_clients(
    app: ArqApp, arq_jobs: list[str]
) -> None:
    client = app.backend.redis
    running, broken, pickled = (str(uuid.uuid4()) for _ in range(3))
    arq_jobs.extend([running, broken, pickled])
    # ARQ's own worker locks a job with the value 1: running, start time unknown.
    await client.psetex(f"arq:in-progress:{running}", 60_000, b"1")
    await client.set(f"arq:retry:{running}", b"2")
    info = await app.backend.status(running)
    assert info is not None
    assert (info.state, info.attempts, info.started_at, info.task_name) == (
        "running",
        2,
        None,
        None,
    )
    # A result that is not taskbridge JSON: finished, but unreadable.
    await client.psetex(f"arq:result:{broken}", 60_000, b"\x80\x04not json")
    info = await app.backend.status(broken)
    assert info is not None and info.state == "failed"
    assert info.error is not None and info.error.type == "taskbridge.MessageError"
    # A pickled job waiting in a queue: queued, though nothing more can be read of it.
    await client.psetex(f"arq:job:{pickled}", 60_000, b"\x80\x04pickle")
    info = await app.backend.status(pickled)
    assert info is not None and (info.state, info.task_name) == ("queued", None)


async def test_a_signed_job_reaching_a_worker_without_a_key_runs_without_the_signature(
    app: ArqApp, arq_jobs: list[str], unique_name: Callable[[str], str]
) -> None:
    bridge = app.module.bridge
    with bridge.override(signing_key=SIGNING_KEY):
        await bridge.open()
        try:
            handle = await app.module.record_async.enqueue(unique_name("signed"), x=1)
            arq_jobs.append(handle.id)
            assert await handle.result(timeout=RESULT_TIMEOUT) == {"args": [], "kwargs": {"x": 1}}
        finally:
            await bridge.close()


def test_dev_options_point_the_alias_at_the_given_redis() -> None:
    options = ArqBackend.dev_options("redis://127.0.0.1:6399/3")
    assert options == {"redis_url": "redis://127.0.0.1:6399/3"}
    assert ArqBackend("arq", options).options.redis_url == "redis://127.0.0.1:6399/3"
