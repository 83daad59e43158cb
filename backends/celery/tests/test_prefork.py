"""The prefork pool: tasks run in child processes, a `def` task's timeout is enforced, and a
running call (def or async def) can be cancelled: its child is terminated."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded  # type: ignore[import-untyped]

from taskbridge import TaskCancelled

from .conftest import Stack, celery_env, load_app_module, opened, start_worker, stop, until


@pytest.fixture(scope="module")
def prefork(
    redis_url: str, run_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A prefork worker with two children on the Redis broker (results in Redis)."""
    queue = f"{run_id}-prefork"
    prefix = f"{run_id}:prefork:"
    options: dict[str, Any] = {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "default_queue": queue,
        "key_prefix": prefix,
    }
    directory = tmp_path_factory.mktemp("celery-prefork")
    app = load_app_module(directory)
    env = {**celery_env(options), "TBTEST_REDIS_URL": redis_url, "TBTEST_PREFIX": prefix}
    cli = ["worker", "celery", "tbapp:bridge", "--queues", queue, "--pool", "prefork"]
    cli += ["--concurrency", "2", "--hostname", f"{queue}@%h"]
    worker = start_worker(directory, [*cli, "--without-mingle", "--without-gossip"], env)
    stack = Stack("redis", options, queue, queue, queue, prefix, redis_url, app, worker)
    try:
        yield stack
    finally:
        stop(worker)
        stack.close()


def test_prefork_children_run_sync_and_async_tasks_and_enforce_sync_timeouts(
    prefork: Stack,
) -> None:
    key = f"pf-{uuid.uuid4().hex[:8]}"
    sync_call = prefork.send("tb.record", key, "sync")
    async_call = prefork.send("tb.arecord", key, "async")
    slow = prefork.send("tb.sync_slow", f"{key}-slow", 30.0)  # timeout=0.5 in the decorator

    runs = {r["id"]: r for r in prefork.wait_records(key, 2)}
    children = {runs[sync_call.id]["pid"], runs[async_call.id]["pid"]}
    assert not children & {prefork.worker.process.pid, os.getpid()}
    result = prefork.result(slow.id)
    assert result.state == "FAILURE"
    assert isinstance(result.result, SoftTimeLimitExceeded)
    assert [r["phase"] for r in prefork.records(f"{key}-slow")] == ["started"]
    assert prefork.worker.process.poll() is None


async def test_a_running_call_on_prefork_is_cancelled_by_terminating_its_child(
    prefork: Stack,
) -> None:
    tag = uuid.uuid4().hex[:8]
    keys = {"tb.gated": f"pf-sync-{tag}", "tb.agated": f"pf-async-{tag}"}
    gate = f"pf-gate-{tag}"
    async with opened(prefork.bridge) as bridge:
        handles = {
            name: await bridge.get_task(name).enqueue(key, gate) for name, key in keys.items()
        }
        for handle in handles.values():
            running = await until(handle.info, lambda s: s.progress is not None, "a start")
            assert running.state == "running"
        for handle in handles.values():
            answer = await handle.cancel()
            assert (answer.cancelled, answer.state) == (True, "cancelled"), answer.detail
            assert "terminated" in answer.detail and "prefork" in answer.detail
            assert (await handle.info()).state == "cancelled"
            with pytest.raises(TaskCancelled):
                await handle.result(timeout=1)
        # The worker goes on (new children), and the terminated calls are not delivered again.
        later = await bridge.get_task("tb.record").enqueue(f"pf-later-{tag}")
        await later.result(timeout=15)
    for key in keys.values():
        # SIGTERM raises in the child (SystemExit): the task's `finally` may run, nothing after.
        phases = [r["phase"] for r in prefork.records(key)]
        assert phases in (["started"], ["started", "cleanup"]), phases
    assert prefork.worker.process.poll() is None
