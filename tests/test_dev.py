"""`taskbridge dev`: the API and its workers in one command, all stopped together."""

from __future__ import annotations

import os
import signal
import socket
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from conftest import WorkerProcess, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
