"""Calls dispatched by CeleryBackend, run by a real `taskbridge worker celery` on each broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from taskbridge import MessageError, Tasks

from .conftest import Stack, celery_env

ARGS: tuple[Any, ...] = (1, "é ✓", 2.5, None, True, [1, {"a": [2]}], {"nested": {"x": [None]}})
KWARGS: dict[str, Any] = {"flag": False, "items": ["a", "b"], "count": 0}


def _key(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("task", ["tb.record", "tb.arecord"])
def test_call_runs_in_the_worker_with_its_exact_arguments(stack: Stack, task: str) -> None:
    key = _key(task)
    handle = stack.send(task, key, *ARGS)

    (first,) = stack.wait_records(key, 1)
    # solo and threads pools run tasks in the worker process itself
    assert first["pid"] == stack.worker.process.pid != os.getpid()
    assert first["args"] == list(ARGS)
    assert first["kwargs"] == {}
    assert first["id"] == handle.id
    result = stack.result(handle.id)
    assert result.state == "SUCCESS"
    assert result.result == {"pid": first["pid"], "args": first["args"], "kwargs": {}}


def test_keyword_arguments_arrive_as_sent(stack: Stack) -> None:
    key = _key("kw")

    async def go() -> Any:
        await stack.bridge.open()
        try:
            record = stack.bridge.get_task("tb.record")
            arecord = stack.bridge.get_task("tb.arecord")
            return [await record.enqueue(key, **KWARGS), await arecord.enqueue(key, 7, **KWARGS)]
        finally:
            await stack.bridge.close()

    from .conftest import run

    sync_handle, async_handle = run(go)
    records = {r["id"]: r for r in stack.wait_records(key, 2)}
    assert records[sync_handle.id]["kwargs"] == KWARGS
    assert records[async_handle.id]["args"] == [7]
    assert records[async_handle.id]["kwargs"] == KWARGS


@pytest.mark.parametrize(
    ("task", "kind"), [("tb.fail", ValueError), ("tb.afail", KeyError)], ids=["sync", "async"]
)
def test_the_task_exception_comes_back_through_the_result_backend(
    stack: Stack, task: str, kind: type[Exception]
) -> None:
    handle = stack.send(task, "it broke: 42")
    result = stack.result(handle.id)
    assert result.state == "FAILURE"
    assert type(result.result) is kind
    assert "it broke: 42" in str(result.result)
    assert "it broke: 42" in (result.traceback or "")


def test_a_failing_call_is_retried_with_the_same_id_then_succeeds(stack: Stack) -> None:
    key = _key("flaky")
    handle = stack.send("tb.flaky", key, 2)  # retries=3, backoff 0.05 s in the decorator
    result = stack.result(handle.id)
    assert (result.state, result.result) == ("SUCCESS", 3)
    runs = stack.records(key)
    assert [r["attempt"] for r in runs] == [1, 2, 3]
    assert {r["id"] for r in runs} == {handle.id}
    assert runs[1]["at"] - runs[0]["at"] >= 0.04
    assert runs[2]["at"] - runs[1]["at"] >= 0.09  # doubled backoff


def test_the_dispatchers_policy_travels_with_the_message(stack: Stack) -> None:
    # tb.once has no retries of its own: only the message's header can make the worker retry.
    key = _key("once")
    handle = stack.send("tb.once", key, 1, retries=2, retry_backoff=0.01, retry_jitter=False)
    assert (stack.result(handle.id).result, len(stack.records(key))) == (2, 2)

    key = _key("exhausted")
    handle = stack.send("tb.once", key, 5, retries=1, retry_backoff=0.01, retry_jitter=False)
    result = stack.result(handle.id)
    assert result.state == "FAILURE" and isinstance(result.result, RuntimeError)
    assert [r["attempt"] for r in stack.records(key)] == [1, 2]


def test_an_async_task_is_stopped_at_its_timeout(stack: Stack) -> None:
    key = _key("slow")
    started = time.monotonic()
    handle = stack.send("tb.slow", key, 30.0)  # timeout=0.3 in the decorator
    result = stack.result(handle.id)
    assert time.monotonic() - started < 10
    assert result.state == "FAILURE" and isinstance(result.result, TimeoutError)
    assert [r["phase"] for r in stack.records(key)] == ["started"]


def test_a_delayed_call_starts_after_its_delay(stack: Stack) -> None:
    key = _key("delayed")
    sent = time.time()
    handle = stack.send("tb.record", key, "later", delay=0.8)
    (entry,) = stack.wait_records(key, 1)
    assert entry["id"] == handle.id and entry["args"] == ["later"]
    assert entry["at"] - sent >= 0.7


def test_calls_reach_named_queues(stack: Stack) -> None:
    key = _key("queues")
    routed = stack.send("tb.routed", key)  # queue= in the decorator (from the worker's env)
    assert stack.bridge.resolve(stack.bridge.get_task("tb.routed")).policy.queue == (
        stack.routed_queue
    )
    assert stack.result(routed.id).result == "routed"
    if stack.broker == "redis":  # this worker also consumes extra_queue (--queues)
        other = stack.send("tb.record", key, queue=stack.extra_queue)
        assert stack.result(other.id).state == "SUCCESS"


def test_a_result_that_is_not_json_fails_the_call_with_a_clear_error(stack: Stack) -> None:
    result = stack.result(stack.send("tb.not_json").id)
    assert result.state == "FAILURE" and isinstance(result.result, TypeError)
    assert "tb.not_json" in str(result.result) and "JSON" in str(result.result)


def test_a_fastapi_request_batches_its_calls_and_a_2xx_means_they_were_accepted(
    stack: Stack,
) -> None:
    key = _key("batch")
    app = FastAPI(lifespan=stack.bridge.lifespan)
    record = stack.bridge.get_task("tb.record")
    arecord = stack.bridge.get_task("tb.arecord")

    @app.post("/orders/{number}")
    async def create(number: int, tasks: Tasks) -> dict[str, list[str]]:
        handles = [tasks.add_task(record, key, number, i) for i in range(4)]
        handles.append(tasks.add_task(arecord, key, number, 4))
        return {"ids": [h.id for h in handles]}

    with TestClient(app) as client:
        response = client.post("/orders/7")
    assert response.status_code == 200
    ids = response.json()["ids"]
    runs = stack.wait_records(key, 5)
    assert sorted(r["id"] for r in runs) == sorted(ids)
    assert sorted(tuple(r["args"]) for r in runs) == [(7, i) for i in range(5)]


def test_unknown_and_malformed_messages_are_failed_and_the_worker_keeps_going(
    stack: Stack,
) -> None:
    from kombu import Connection, Producer

    def headers(name: str, task_id: str) -> dict[str, Any]:
        return {"lang": "py", "task": name, "id": task_id, "root_id": task_id, "retries": 0}

    bad = {
        "unknown": ("tb.no_such_task", json.dumps([[1], {}, {}]), "application/json"),
        "not_json": ("tb.record", "{not json", "application/json"),
        "wrong_shape": ("tb.record", json.dumps({"args": 1}), "application/json"),
        "wrong_args": ("tb.record", json.dumps([[], {"nope": 1}, {}]), "application/json"),
        "pickle": ("tb.record", b"\x80\x04N.", "application/x-python-serialize"),
    }
    ids = {kind: str(uuid.uuid4()) for kind in bad}
    transport = {"global_keyprefix": stack.prefix} if stack.broker == "redis" else {}
    with Connection(stack.options["broker_url"], transport_options=transport) as connection:
        producer = Producer(connection)
        for kind, (name, body, content_type) in bad.items():
            producer.publish(
                body,
                exchange="",
                routing_key=stack.queue,
                headers=headers(name, ids[kind]),
                content_type=content_type,
                content_encoding="binary" if kind == "pickle" else "utf-8",
                correlation_id=ids[kind],
            )
    key = _key("after-bad")
    good = stack.send("tb.record", key, "still alive")

    assert stack.result(good.id).state == "SUCCESS"
    assert stack.records(key)[0]["args"] == ["still alive"]
    assert stack.worker.process.poll() is None
    stack.worker.wait_for_output(r"Received unregistered task of type 'tb\.no_such_task'")
    for kind in ("not_json", "wrong_shape", "wrong_args", "pickle"):
        stack.worker.wait_for_output(rf"rejected a message for task tb\.record \[{ids[kind]}\]")
        result = stack.result(ids[kind])
        assert result.state == "FAILURE" and isinstance(result.result, MessageError), kind
    unknown = stack.result(ids["unknown"])
    assert unknown.state == "FAILURE" and "tb.no_such_task" in str(unknown.result)


def test_celerys_own_tools_see_the_worker_and_its_queues(stack: Stack) -> None:
    app = stack.bridge.backend("celery").app  # type: ignore[attr-defined]
    inspect = app.control.inspect(timeout=3, destination=[stack.hostname])
    assert inspect.ping() == {stack.hostname: {"ok": "pong"}}
    queues = {q["name"] for q in inspect.active_queues()[stack.hostname]}
    assert {stack.queue, stack.routed_queue} <= queues
    assert "celery" not in queues
    assert "tb.record" in inspect.registered()[stack.hostname]


def test_the_celery_command_line_works_with_the_bundled_app(redis_stack: Stack) -> None:
    environment = {**os.environ, **celery_env(redis_stack.options)}
    command = [sys.executable, "-m", "celery", "-A", "taskbridge_celery.app", "inspect", "ping"]
    found = subprocess.run(
        [*command, "--destination", redis_stack.hostname, "--timeout", "5"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, found.stdout + found.stderr
    assert f"{redis_stack.hostname}: OK" in found.stdout and "pong" in found.stdout
