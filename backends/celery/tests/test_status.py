"""Status, results, progress, cancellation and idempotency keys, against real workers.

The Redis stack runs a threads pool, the RabbitMQ one a solo pool (results in Redis for both);
the prefork pool has its own worker in test_prefork.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from taskbridge_celery import CeleryBackend
from taskbridge_celery._keys import result_key_prefix
from taskbridge_celery._status import Snapshot, error_info

from conftest import wait_until
from taskbridge import TaskBridge, TaskCancelled, TaskFailed, Tasks

from .conftest import Stack, delete_amqp_queues, opened, until


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("task", ["tb.gated", "tb.agated"], ids=["sync", "async"])
async def test_status_through_a_calls_life_with_progress(stack: Stack, task: str) -> None:
    key, gate = _name("life"), _name("gate")
    fraction, message = (0.4, "loading") if task == "tb.gated" else (0.6, "rendering")
    async with opened(stack.bridge) as bridge:
        handle = await bridge.get_task(task).enqueue(key, gate)
        running = await until(handle.info, lambda s: s.progress is not None, "progress")
        assert (running.state, running.task_name, running.backend) == ("running", task, "celery")
        assert (running.progress, running.progress_message) == (fraction, message)
        assert await handle.progress() == (fraction, message)
        assert running.attempts == 1 and running.finished_at is None
        assert running.enqueued_at and running.started_at
        assert running.enqueued_at <= running.started_at
        assert running.result is None and running.error is None

        stack.open_gate(gate)
        value = await handle.result(timeout=15)
        assert value == {"key": key, "pid": stack.worker.process.pid}
        done = await handle.info()
        assert (done.state, done.result, done.attempts) == ("succeeded", value, 1)
        assert done.enqueued_at == running.enqueued_at and done.started_at == running.started_at
        assert done.finished_at and done.started_at and done.finished_at >= done.started_at
        assert done.progress == fraction  # the last report is kept
    # What Celery's own API sees is unchanged.
    assert stack.result(handle.id).result == value


@pytest.mark.parametrize(
    ("task", "kind"), [("tb.fail", "ValueError"), ("tb.afail", "KeyError")], ids=["sync", "async"]
)
async def test_a_failed_call_reports_its_error_type_and_message(
    stack: Stack, task: str, kind: str
) -> None:
    async with opened(stack.bridge) as bridge:
        handle = await bridge.get_task(task).enqueue("it broke: 42")
        with pytest.raises(TaskFailed) as raised:
            await handle.result(timeout=15)
        info = await handle.info()
    expected = "it broke: 42" if kind == "ValueError" else "'it broke: 42'"  # str(KeyError)
    assert (raised.value.error_type, raised.value.error_message) == (f"builtins.{kind}", expected)
    assert info.state == "failed" and info.error is not None
    assert (info.error.type, info.error.message) == (f"builtins.{kind}", expected)
    assert info.attempts == 1 and info.finished_at and info.task_name == task


async def test_a_call_between_attempts_is_retrying(stack: Stack) -> None:
    key = _name("retrying")
    async with opened(stack.bridge) as bridge:
        once = bridge.get_task("tb.once").using(retries=1, retry_backoff=0.6, retry_jitter=False)
        handle = await once.enqueue(key, 1)  # the first attempt fails
        retrying = await until(
            handle.info,
            lambda s: s.state not in ("queued", "running", "unknown"),
            "the first failure",
        )
        assert retrying.state == "retrying" and retrying.attempts == 1
        assert retrying.error is not None
        assert (retrying.error.type, retrying.error.message) == (
            "builtins.RuntimeError",
            "attempt 1 fails",
        )
        assert await handle.result(timeout=15) == 2
        done = await handle.info()
    assert (done.state, done.attempts, done.error) == ("succeeded", 2, None)
    assert done.enqueued_at == retrying.enqueued_at  # the retry message keeps the header


async def test_a_queued_call_cancelled_never_runs_even_on_a_worker_that_never_saw_it(
    stack: Stack,
) -> None:
    # A queue the worker does not consume yet: the calls stay queued until it is added.
    queue = _name(f"{stack.prefix}cancel").replace(":", "-")
    first, later = _name("cancelled"), _name("later")
    try:
        async with opened(stack.bridge) as bridge:
            record = bridge.get_task("tb.record").using(queue=queue)
            doomed = await record.enqueue(first, "never")
            after = await record.enqueue(later, "runs")
            queued = await doomed.info()
            # Dispatch left a queued marker (with RabbitMQ, in the results' Redis).
            assert (queued.state, queued.task_name, queued.attempts) == ("queued", "tb.record", 0)
            assert queued.enqueued_at is not None
            assert (queued.args, queued.kwargs) == ([first, "never"], {})

            answer = await doomed.cancel()
            assert (answer.cancelled, answer.state) == (True, "cancelled"), answer.detail
            assert (await doomed.info()).state == "cancelled"
            with pytest.raises(TaskCancelled):
                await doomed.result(timeout=1)
            again = await doomed.cancel()
            assert (again.cancelled, again.detail) == (False, "already cancelled")

            reply = await asyncio.to_thread(stack.control, "add_consumer", queue=queue)
            assert "ok" in reply, reply
            assert (await after.result(timeout=15))["args"] == ["runs"]
        stack.worker.wait_for_output(rf"task tb\.record \[{doomed.id}\] not run: it was cancelled")
        assert stack.records(first) == []
        assert [r["args"] for r in stack.records(later)] == [["runs"]]
    finally:
        await asyncio.to_thread(stack.control, "cancel_consumer", queue=queue)
        if stack.broker == "amqp":
            delete_amqp_queues(stack.options["broker_url"], [queue])


async def test_cancelling_running_calls_on_threads_and_solo_pools(stack: Stack) -> None:
    sync_key, async_key = _name("sync-run"), _name("async-run")
    sync_gate, async_gate = _name("gate"), _name("gate")
    async with opened(stack.bridge) as bridge:
        sync_call = await bridge.get_task("tb.gated").enqueue(sync_key, sync_gate)
        await until(sync_call.info, lambda s: s.progress is not None, "the def task to start")
        answer = await sync_call.cancel()
        assert (answer.cancelled, answer.state) == (False, "running")
        pool = "threads" if stack.broker == "redis" else "solo"
        assert f"{pool} pool" in answer.detail and "run to completion" in answer.detail
        stack.open_gate(sync_gate)
        assert (await sync_call.result(timeout=15))["key"] == sync_key

        async_call = await bridge.get_task("tb.agated").enqueue(async_key, async_gate)
        await until(async_call.info, lambda s: s.progress is not None, "the async task to start")
        answer = await async_call.cancel()
        if pool == "threads":  # the worker's loop is reachable: the asyncio task is cancelled
            assert (answer.cancelled, answer.state) == (True, "cancelled"), answer.detail
            with pytest.raises(TaskCancelled):
                await async_call.result(timeout=5)
            phases = [r["phase"] for r in stack.records(async_key)]
            assert phases == ["started", "cleanup"]  # its finally ran; it did not finish
        else:  # solo: the worker's only thread is running the call
            assert (answer.cancelled, answer.state) == (False, "running")
            assert "solo pool" in answer.detail
            stack.open_gate(async_gate)
            assert (await async_call.result(timeout=15))["key"] == async_key
    stack.open_gate(async_gate)


async def test_a_keyed_call_dispatched_twice_runs_once_with_one_id(stack: Stack) -> None:
    key, order = _name("keyed"), _name("order")
    bridge = stack.bridge
    record = bridge.get_task("tb.record")
    keyed = record.using(key=order, key_ttl=60)
    app = FastAPI(lifespan=bridge.lifespan)

    @app.post("/orders")
    async def create(tasks: Tasks) -> dict[str, list[str]]:
        # twice in the same request (one batch), too
        return {"ids": [tasks.add_task(keyed, key, "n").id, tasks.add_task(keyed, key, "n").id]}

    with TestClient(app) as client:
        ids = client.post("/orders").json()["ids"] + client.post("/orders").json()["ids"]
    async with opened(bridge):
        first = await keyed.enqueue(key, "n")
        again = await keyed.enqueue(key, "n")
        assert len({first.id, again.id, *ids}) == 1
        assert (await first.result(timeout=15))["args"] == ["n"]
        # a call dispatched after the duplicates ran; the duplicates never did
        later = await record.enqueue(key, "later")
        await later.result(timeout=15)
    assert [r["args"] for r in stack.records(key)] == [["n"], ["later"]]
    store = redis.Redis.from_url(stack.redis_url)
    try:
        ttl = store.pttl(f"{stack.prefix}taskbridge:key:{first.id}")
    finally:
        store.close()
    assert 0 < ttl <= 60_000


async def test_a_message_delivered_again_after_success_is_not_run_again(stack: Stack) -> None:
    key = _name("again")
    async with opened(stack.bridge) as bridge:
        backend, call = bridge.prepare(bridge.get_task("tb.record"), (key,), {})
        await bridge.dispatch([(backend, call)])
        await call.handle.result(timeout=15)
        await bridge.dispatch([(backend, call)])  # the very same message (id, enqueue time)
        later = await bridge.get_task("tb.record").enqueue(key, "later")
        await later.result(timeout=15)
    stack.worker.wait_for_output(rf"\[{call.id}\] not run: it already succeeded")
    assert [r["args"] for r in stack.records(key)] == [[], ["later"]]


async def test_a_keyed_call_runs_again_once_its_key_expired(stack: Stack) -> None:
    key, order = _name("rekeyed"), _name("order")
    store = redis.Redis.from_url(stack.redis_url)
    try:
        async with opened(stack.bridge) as bridge:
            keyed = bridge.get_task("tb.record").using(key=order, key_ttl=0.3)
            first = await keyed.enqueue(key, 1)
            await first.result(timeout=15)
            dedup = f"{stack.prefix}taskbridge:key:{first.id}"
            wait_until(lambda: not store.exists(dedup), 10, "the idempotency key to expire")
            again = await keyed.enqueue(key, 2)
            assert again.id == first.id
            rerun = await until(
                again.info,
                lambda s: isinstance(s.result, dict) and s.result["args"] == [2],
                "the second run's result",
            )
            assert (rerun.state, rerun.attempts) == ("succeeded", 1)
    finally:
        store.close()
    assert [r["args"] for r in stack.records(key)] == [[1], [2]]


def test_the_router_reports_celery_calls(stack: Stack) -> None:
    key, gate = _name("router"), _name("gate")
    bridge = stack.bridge
    app = FastAPI(lifespan=bridge.lifespan)
    app.include_router(bridge.router())
    gated, record = bridge.get_task("tb.gated"), bridge.get_task("tb.record")

    @app.post("/work")
    async def work(tasks: Tasks) -> dict[str, str]:
        quick = tasks.add_task(record, key)  # first: the solo pool runs one call at a time
        return {"quick": quick.id, "gated": tasks.add_task(gated, key, gate).id}

    with TestClient(app) as client:
        ids = client.post("/work").json()

        def body(task_id: str) -> dict[str, Any]:
            response = client.get(f"/tasks/{task_id}")
            assert response.status_code in (200, 404), response.text
            return response.json() if response.status_code == 200 else {"state": "unknown"}

        wait_until(lambda: body(ids["quick"])["state"] == "succeeded", 15, "the quick call")
        quick = body(ids["quick"])
        assert (quick["task_name"], quick["backend"], quick["attempts"]) == (
            "tb.record",
            "celery",
            1,
        )
        assert quick["result"]["args"] == [] and quick["finished_at"]
        wait_until(
            lambda: body(ids["gated"]).get("progress") == 0.4, 15, "the gated call's progress"
        )
        assert body(ids["gated"])["state"] == "running"
        stack.open_gate(gate)
        wait_until(lambda: body(ids["gated"])["state"] == "succeeded", 15, "the gated call")
        conflict = client.delete(f"/tasks/{ids['quick']}")
        assert conflict.status_code == 409 and "already succeeded" in conflict.text
        assert client.get(f"/tasks/{uuid.uuid4()}").status_code == 404


async def test_without_a_result_backend_status_is_unknown(redis_url: str, run_id: str) -> None:
    bridge = TaskBridge(
        {"backends": {"celery": {"broker_url": redis_url, "key_prefix": f"{run_id}:nores:"}}}
    )

    @bridge.task(name="nores.task", backend="celery")
    def task() -> None:
        """Only dispatched."""

    async with opened(bridge):
        backend = bridge.backend("celery")
        assert isinstance(backend, CeleryBackend) and backend.supports_status is False
        handle = await task.enqueue()
        assert await backend.status(handle.id) is None
        assert await handle.status() == "unknown"


# -- the mapping, without a broker ----------------------------------------------------------


def _meta(status: str, result: Any = None, **tb: Any) -> dict[str, Any]:
    return {"status": status, "result": result, "date_done": None, "taskbridge": tb}


def test_celery_states_map_onto_task_states() -> None:
    marker = {"task": "t", "enqueued_at": 10.0}
    assert Snapshot("a").status("c") is None
    assert Snapshot("a", _meta("PENDING")).status("c") is None
    queued = Snapshot("a", None, marker).status("c")
    assert queued is not None and (queued.state, queued.task_name, queued.attempts) == (
        "queued",
        "t",
        0,
    )
    for celery, ours in [
        ("RECEIVED", "running"),
        ("STARTED", "running"),
        ("PROGRESS", "running"),
        ("MY_OWN_STATE", "running"),
        ("RETRY", "retrying"),
        ("SUCCESS", "succeeded"),
        ("FAILURE", "failed"),
        ("REVOKED", "cancelled"),
    ]:
        found = Snapshot("a", _meta(celery, attempt=2, started_at=11.0), marker).status("c")
        assert found is not None and found.state == ours, celery
        assert found.attempts == 2 and found.enqueued_at and found.enqueued_at.timestamp() == 10
    done = Snapshot(
        "a", {"status": "SUCCESS", "result": [1], "date_done": "2026-01-02T03:04:05+00:00"}
    ).status("c")
    assert done is not None and done.result == [1] and done.finished_at is not None
    assert done.finished_at.isoformat() == "2026-01-02T03:04:05+00:00"


def test_errors_read_like_str_of_the_exception() -> None:
    for exc in (ValueError("x"), KeyError("k"), RuntimeError(), OSError(2, "gone")):
        stored = {
            "exc_type": type(exc).__qualname__,
            "exc_message": list(exc.args),
            "exc_module": type(exc).__module__,
        }
        info = error_info(json.loads(json.dumps(stored)))
        assert info is not None
        assert (info.type, info.message) == (f"builtins.{type(exc).__qualname__}", str(exc))
    assert error_info({"not": "an error"}) is None


@pytest.mark.parametrize("prefix", [None, "app:", "app"])
def test_result_keys_are_celerys_own(prefix: str | None) -> None:
    options: dict[str, Any] = {"broker_url": "redis://h/1", "result_backend": "redis://h/2"}
    if prefix:
        options["key_prefix"] = prefix
    backend = CeleryBackend("celery", options)
    ours = result_key_prefix(backend.options) + "some-id"
    assert ours == backend.app.backend.get_key_for_task("some-id").decode()
    backend.app.close()


# -- results stored by the earlier format (a `taskbridge` object, times in epoch seconds) ----


def _legacy(task_id: str, status: str, result: Any = None, **changes: Any) -> dict[str, Any]:
    """A result meta as the earlier format stored it (a no-op's, as the soak showed it)."""
    done = None if status in ("STARTED", "PROGRESS", "RETRY") else "2026-11-30T15:09:33.912176"
    tb: dict[str, Any] = {
        "task": "tb.record",
        "attempt": 1,
        "enqueued_at": 1796051373.902104,
        "started_at": 1796051373.9092994,
    }
    return {
        "status": status,
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": None if done is None else done + "+00:00",
        "task_id": task_id,
        "taskbridge": {**tb, **changes},
    }


async def test_a_result_of_the_earlier_format_reads_as_before(stack: Stack) -> None:
    store = redis.Redis.from_url(stack.redis_url)
    prefix = stack.prefix + "celery-task-meta-"
    ids = [str(uuid.uuid4()) for _ in range(3)]
    running, done, revoked = ids
    try:
        store.set(
            prefix + running,
            json.dumps(
                _legacy(running, "PROGRESS", None, progress=0.5, progress_message="half")
                | {"taskbridge": _legacy(running, "STARTED")["taskbridge"] | {"pool": "solo"}}
            ),
            ex=60,
        )
        store.set(prefix + done, json.dumps(_legacy(done, "SUCCESS", [1, 2])), ex=60)
        store.set(
            prefix + revoked,
            json.dumps(
                _legacy(
                    revoked,
                    "REVOKED",
                    {"exc_type": "TaskRevokedError", "exc_message": ["no"], "exc_module": "x"},
                    finished_at=1796051374.5,
                    started_at=None,
                )
            ),
            ex=60,
        )
        # Read without opening the bridge (whose warm-up, cancelled by a close this early,
        # can leave a connection to be collected during a later test).
        backend = stack.bridge.backend("celery")
        assert isinstance(backend, CeleryBackend) and backend.store is not None
        try:
            now = await backend.status(running)
            ok = await backend.status(done)
            cancelled = await backend.status(revoked)
        finally:
            await backend.store.close()
    finally:
        store.delete(*(prefix + i for i in ids))
        store.close()
    assert now is not None and ok is not None and cancelled is not None
    assert (now.state, now.task_name, now.attempts) == ("running", "tb.record", 1)
    assert now.started_at and now.started_at.timestamp() == pytest.approx(
        1796051373.909299, abs=1e-6
    )
    assert (ok.state, ok.result, ok.task_name, ok.attempts) == ("succeeded", [1, 2], "tb.record", 1)
    assert ok.enqueued_at and ok.enqueued_at.timestamp() == 1796051373.902104
    assert ok.started_at and ok.started_at.timestamp() == pytest.approx(1796051373.909299, abs=1e-6)
    assert ok.finished_at and ok.finished_at.isoformat() == "2026-11-30T15:09:33.912176+00:00"
    assert cancelled.state == "cancelled" and cancelled.started_at is None
    assert cancelled.finished_at and cancelled.finished_at.timestamp() == 1796051374.5


def test_a_running_result_of_the_earlier_format_still_says_where_it_runs() -> None:
    meta = _legacy("a", "STARTED") | {
        "taskbridge": _legacy("a", "STARTED")["taskbridge"]
        | {"hostname": "w@h", "pid": 7, "pool": "prefork", "async": False}
    }
    tb = Snapshot("a", meta).tb
    assert (tb["hostname"], tb["pid"], tb["pool"], tb["async"]) == ("w@h", 7, "prefork", False)


@pytest.mark.parametrize("earlier", [False, True], ids=["same-dispatch", "earlier-dispatch"])
async def test_a_success_of_the_earlier_format_guards_its_own_dispatch_only(
    stack: Stack, earlier: bool
) -> None:
    key = _name("oldsuccess")
    store = redis.Redis.from_url(stack.redis_url)
    try:
        async with opened(stack.bridge) as bridge:
            record = bridge.get_task("tb.record")
            backend, call = bridge.prepare(record, (key,), {})
            enqueued = call.enqueued_at - (60 if earlier else 0)
            old = _legacy(call.id, "SUCCESS", "old", enqueued_at=enqueued)
            result_key = f"{stack.prefix}celery-task-meta-{call.id}"
            store.set(result_key, json.dumps(old), ex=60)
            await bridge.dispatch([(backend, call)])
            later = await record.enqueue(key, "later")
            await later.result(timeout=15)
            if earlier:
                done = await until(call.handle.info, lambda s: s.result != "old", "the rerun")
                assert (done.state, done.result["args"]) == ("succeeded", [])
                # in whole milliseconds, rounded down
                enqueued_ms = done.enqueued_at and done.enqueued_at.timestamp() * 1000
                assert enqueued_ms and round(enqueued_ms) == int(call.enqueued_at * 1000)
    finally:
        store.close()
    if earlier:
        assert sorted(r["args"] for r in stack.records(key)) == [[], ["later"]]
    else:
        stack.worker.wait_for_output(rf"\[{call.id}\] not run: it already succeeded")
        assert [r["args"] for r in stack.records(key)] == [["later"]]
        assert stack.result(call.id).result == "old"
