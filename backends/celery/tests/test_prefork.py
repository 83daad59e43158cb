"""The prefork pool: tasks run in child processes, and a `def` task's timeout is enforced."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded  # type: ignore[import-untyped]

from conftest import WorkerProcess

from .conftest import Stack, celery_env, load_app_module, stop


def test_prefork_children_run_sync_and_async_tasks_and_enforce_sync_timeouts(
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    redis_url: str,
    run_id: str,
    unique_name: Callable[[str], str],
) -> None:
    queue = unique_name("q")
    prefix = f"{run_id}:prefork:"
    options: dict[str, Any] = {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "default_queue": queue,
        "key_prefix": prefix,
    }
    app = load_app_module(tmp_path)
    env = {**celery_env(options), "TBTEST_REDIS_URL": redis_url, "TBTEST_PREFIX": prefix}
    cli = ["worker", "celery", "tbapp:bridge", "--queues", queue, "--pool", "prefork"]
    cli += ["--concurrency", "1", "--hostname", f"{queue}@%h"]
    worker = spawn_worker([*cli, "--without-mingle", "--without-gossip"], env=env)
    try:
        worker.wait_for_output(r"@\S+ ready\.", 40)
        stack = Stack("redis", options, queue, queue, queue, prefix, redis_url, app, worker)
        sync_call = stack.send("tb.record", "pf", "sync")
        async_call = stack.send("tb.arecord", "pf", "async")
        slow = stack.send("tb.sync_slow", "pf-slow", 30.0)  # timeout=0.5 in the decorator

        runs = {r["id"]: r for r in stack.wait_records("pf", 2)}
        child = runs[sync_call.id]["pid"]
        assert child not in (worker.process.pid, os.getpid())
        assert runs[async_call.id]["pid"] == child  # one child (-c 1), its persistent loop
        result = stack.result(slow.id)
        assert result.state == "FAILURE"
        assert isinstance(result.result, SoftTimeLimitExceeded)
        assert [r["phase"] for r in stack.records("pf-slow")] == ["started"]
        assert worker.process.poll() is None
        stack.close()
    finally:
        stop(worker)
