"""Celery's own tools on a taskbridge alias, through `taskbridge_celery.celery_app()`.

A real `taskbridge worker celery -E` and a real Flower (`celery -A tbtools:app flower`) run as
processes; taskbridge calls are dispatched and Flower's HTTP API lists them, shows one, answers
its result from the result backend (it answered 503 with an app that has none), and revokes a
delayed call, which then never runs. `celery -A tbtools:app inspect ping` answers for the worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import current_app  # type: ignore[import-untyped]
from celery.result import AsyncResult  # type: ignore[import-untyped]
from taskbridge_celery import celery_app
from taskbridge_celery._results import TaskBridgeRedisBackend

from conftest import WorkerProcess, wait_until
from taskbridge import ConfigurationError, TaskBridge
from taskbridge._dev import free_port

from .conftest import celery_env, delete_amqp_queues, load_app_module, run, start_worker, stop

CELERY = [sys.executable, "-m", "celery", "-A", "tbtools:app"]
TOOLS_MODULE = 'from taskbridge_celery import celery_app\n\napp = celery_app("tbapp:bridge")\n'


@pytest.fixture
def celery_state() -> Iterator[None]:
    """Celery's current and default apps, as they were before the test."""
    from celery import _state  # type: ignore[import-untyped]

    current, default = _state._tls.current_app, _state.default_app
    yield
    _state._tls.current_app, _state.default_app = current, default


def test_celery_app_is_configured_like_the_worker_with_the_bridges_tasks(
    amqp_url: str, redis_url: str, celery_state: None
) -> None:
    options = {"broker_url": amqp_url, "result_backend": redis_url, "default_queue": "tools-q"}
    bridge = TaskBridge({"backends": {"celery": options, "arq": {"redis_url": redis_url}}})

    @bridge.task(name="tools.add", backend="celery")
    def add(a: int, b: int) -> int:
        return a + b

    app = celery_app(bridge)
    assert app.conf.broker_url == amqp_url and app.conf.result_backend == redis_url
    assert app.conf.task_default_queue == "tools-q"
    assert isinstance(app.backend, TaskBridgeRedisBackend)
    assert "tools.add" in app.tasks
    assert current_app._get_current_object() is app  # what Flower's AsyncResult(id) reads
    assert AsyncResult("some-id").backend is app.backend
    with pytest.raises(ConfigurationError, match="not a Celery backend"):
        celery_app(bridge, alias="arq")
    app.close()


def _http(method: str, url: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None
    except OSError:
        return 0, None


def test_flower_and_celery_inspect_see_taskbridge_calls(
    amqp_url: str,
    redis_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    spawn_process: Callable[..., WorkerProcess],
) -> None:
    queue = unique_name("tools")
    prefix = f"{queue}:"
    options = {
        "broker_url": amqp_url,
        "result_backend": redis_url,
        "default_queue": queue,
        "key_prefix": prefix,
    }
    app_module = load_app_module(tmp_path)
    (tmp_path / "tbtools.py").write_text(TOOLS_MODULE)
    env = {
        **celery_env(options),
        "TBTEST_REDIS_URL": redis_url,
        "TBTEST_PREFIX": prefix,
        "PYTHONPATH": str(tmp_path),
    }
    hostname = f"{queue}@{socket.gethostname()}"
    # prefork: its events are all sent from the main process. A threads-pool worker sends
    # task events from its pool threads on the consumer's connection, and Flower then misses
    # some (a call it keeps showing as STARTED): Celery's, seen here with -c 2.
    args = ["worker", "celery", "tbapp:bridge", "--pool", "prefork", "-c", "2", "-E"]
    args += ["--hostname", f"{queue}@%h", "--without-mingle", "--without-gossip"]
    worker = start_worker(tmp_path, args, env)
    store = redis.Redis.from_url(redis_url)
    try:
        port = free_port()
        flower = f"http://127.0.0.1:{port}"
        spawn_process(
            [*CELERY, "flower", f"--port={port}", "--address=127.0.0.1"],
            env={**env, "FLOWER_UNAUTHENTICATED_API": "true"},
            cwd=tmp_path,
        )
        # Flower follows the worker's events (its heartbeats) before anything is dispatched
        wait_until(
            lambda: (_http("GET", f"{flower}/api/workers?status=true")[1] or {}).get(hostname),
            30,
            "Flower to see the worker's events",
        )

        bridge = app_module.build({"backends": {"celery": options}})
        record = bridge.get_task("tb.record")

        def listed() -> dict[str, Any]:
            code, tasks = _http("GET", f"{flower}/api/tasks")
            return tasks if code == 200 and isinstance(tasks, dict) else {}

        # The worker answering Flower's inspect does not mean Flower's event consumer is
        # listening yet, and events sent before it listens are gone: probe with calls until
        # Flower has seen one succeed.
        async def probe() -> str:
            await bridge.open()
            try:
                return (await record.enqueue("tools-probe", 0)).id
            finally:
                await bridge.close()

        probes: list[str] = []

        def seen_a_probe() -> bool:
            tasks = listed()
            if any(tasks.get(i, {}).get("state") == "SUCCESS" for i in probes):
                return True
            probes.append(run(probe))
            return False

        wait_until(seen_a_probe, 30, "Flower to follow the worker's task events")

        async def send() -> tuple[list[str], str]:
            await bridge.open()
            try:
                ids = [(await record.enqueue("tools", n)).id for n in range(3)]
                later = await record.using(delay=3).enqueue("tools-revoked", "later")
                return ids, later.id
            finally:
                await bridge.close()

        ids, later = run(send)
        # revoked through Flower at once, well before it is due (Celery's broadcast to the
        # worker, which holds it until its eta)
        code, revoked = _http("POST", f"{flower}/api/task/revoke/{later}")
        assert code == 200 and later in revoked["message"]

        wait_until(
            lambda: all(listed().get(i, {}).get("state") == "SUCCESS" for i in ids),
            20,
            "Flower to list the calls as succeeded",
        )
        assert {listed()[i]["name"] for i in ids} == {"tb.record"}

        code, info = _http("GET", f"{flower}/api/task/info/{ids[0]}")
        assert code == 200
        assert (info["uuid"], info["name"], info["state"]) == (ids[0], "tb.record", "SUCCESS")
        assert info["worker"] == hostname

        code, result = _http("GET", f"{flower}/api/task/result/{ids[1]}")
        assert code == 200, "Flower found no result backend"
        assert result["state"] == "SUCCESS"
        assert result["result"]["args"] == [1] and result["task-id"] == ids[1]

        wait_until(
            lambda: _http("GET", f"{flower}/api/task/result/{later}")[1]["state"] == "REVOKED",
            15,
            "the revoked call to be discarded when due",
        )
        assert store.lrange(prefix + "tools-revoked", 0, -1) == []
        assert len(store.lrange(prefix + "tools", 0, -1)) == 3

        ping = subprocess.run(
            [*CELERY, "inspect", "ping", "--destination", hostname, "--timeout", "5"],
            cwd=tmp_path,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert f"{hostname}: OK" in ping.stdout and "pong" in ping.stdout
    finally:
        store.close()
        stop(worker)
        delete_amqp_queues(amqp_url, [queue])
