"""`taskbridge dev`: the API and its workers in one command, all stopped together."""

from __future__ import annotations

import os
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from conftest import WorkerProcess, wait_until
from taskbridge._dev import free_port as _free_port

ROOT = Path(__file__).resolve().parent.parent


def test_dev_serves_the_app_with_prefixed_output_and_stops_on_ctrl_c(
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBRIDGE_")}
    dev = spawn_worker(
        ["dev", "examples.quickstart:app", "--port", str(port), "--no-reload"],
        env=env,
        cwd=ROOT,
    )
    dev.wait_for_output(r"api \| .*Uvicorn running on", timeout=30)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/users?email=ada@example.com", method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    dev.wait_for_output(r'api \| .*"POST /users\?email=ada@example.com HTTP/1.1" 200')
    dev.process.send_signal(signal.SIGINT)
    assert dev.process.wait(30) == 0
    # the API server stopped with it: the port is free again
    wait_until(lambda: _port_free(port), 10, f"port {port} to be released")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_dev_plans_no_worker_for_in_process_tasks() -> None:
    sys.path.insert(0, str(ROOT))
    from examples.quickstart import bridge
    from taskbridge._dev import plan_workers

    assert plan_workers(bridge) == {}


def test_dev_starts_a_throwaway_redis_and_the_workers_the_routes_need(
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    import json

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBRIDGE_")}
    env["TASKBRIDGE_ROUTES"] = json.dumps(
        {"examples.shop.app.build_sales_report": "celery", "examples.shop.app.sync_crm": "arq"}
    )
    dev = spawn_worker(
        ["dev", "examples.shop.app:app", "--port", str(port), "--no-reload"], env=env, cwd=ROOT
    )
    dev.wait_for_output(r"started a throwaway Redis at redis://127\.0\.0\.1:\d+ for celery, arq")
    dev.wait_for_output(r"api \| .*Uvicorn running on", timeout=30)
    dev.wait_for_output(r"celery \| .*ready", timeout=30)
    base = f"http://127.0.0.1:{port}"

    def post(path: str) -> dict[str, str]:
        request = urllib.request.Request(base + path, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read()))

    def state(task_id: str) -> dict[str, object] | None:
        try:
            with urllib.request.urlopen(f"{base}/tasks/{task_id}", timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError:
            return None
        return body if body["state"] == "succeeded" else None

    report = post("/reports/2026-11?rounds=1000")["report"]
    wait_until(lambda: state(report), 60, "the report to run on the Celery worker")
    assert state(report)["backend"] == "celery"  # type: ignore[index]
    dev.process.send_signal(signal.SIGINT)
    assert dev.process.wait(60) == 0
