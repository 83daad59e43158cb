"""`taskbridge dev`: the API and its workers in one command, all stopped together."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

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


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TASKBRIDGE_")}


@pytest.mark.parametrize("reload", [False, True], ids=["no-reload", "reload"])
def test_dev_says_which_process_exited_and_how_then_exits_non_zero(
    spawn_worker: Callable[..., WorkerProcess], reload: bool
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        dev = spawn_worker(
            ["dev", "examples.quickstart:app", "--port", str(port)]
            + ([] if reload else ["--no-reload"]),
            env=_clean_env(),
            cwd=ROOT,
        )
        assert dev.process.wait(45) == 1, dev.output
    assert time.monotonic() - started < 45
    assert re.search(r"api \| .*[Aa]ddress already in use", dev.output), dev.output
    last = dev.output.strip().splitlines()[-1]
    assert re.fullmatch(r"taskbridge dev: api exited with code [1-9]\d*", last), dev.output


def test_dev_names_the_signal_that_killed_a_process(
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    dev = spawn_worker(
        ["dev", "examples.quickstart:app", "--port", str(_free_port()), "--no-reload"],
        env=_clean_env(),
        cwd=ROOT,
    )
    api_pid = int(dev.wait_for_output(r"api \| .*Started server process \[(\d+)\]").group(1))
    dev.wait_for_output(r"api \| .*Uvicorn running on")
    os.kill(api_pid, signal.SIGKILL)
    assert dev.process.wait(30) == 1, dev.output
    assert "taskbridge dev: api was killed by SIGKILL" in dev.output


LOGGING_APP = """
import logging

from fastapi import FastAPI

from taskbridge import TaskBridge

logger = logging.getLogger("myapp")
bridge = TaskBridge()
app = FastAPI(lifespan=bridge.lifespan)


@app.get("/hello")
def hello() -> str:
    logger.info("hello from the app")
    logger.debug("debug lines stay hidden")
    return "hi"
"""


def test_dev_shows_the_apps_own_log_lines(
    spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    (tmp_path / "myapp.py").write_text(LOGGING_APP)
    port = _free_port()
    # with reload, as `taskbridge dev` runs by default: the server is uvicorn's child process
    dev = spawn_worker(["dev", "myapp:app", "--port", str(port)], env=_clean_env())
    dev.wait_for_output(r"api \| .*Application startup complete", timeout=30)
    # the reloader bound the port already; the server listens just after the app's start-up
    wait_until(lambda: not _port_free(port), 10, f"the API to listen on port {port}")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello", timeout=10) as response:
        assert response.status == 200
    dev.wait_for_output(r'api \| .*"GET /hello HTTP/1.1" 200')
    dev.wait_for_output(r"api \| INFO: +myapp: hello from the app")
    assert "debug lines stay hidden" not in dev.output
    dev.process.send_signal(signal.SIGINT)
    assert dev.process.wait(30) == 0, dev.output


SCHEDULED_APP = """
import os
from pathlib import Path

from fastapi import FastAPI

from taskbridge import TaskBridge, current_task

bridge = TaskBridge()
app = FastAPI(lifespan=bridge.lifespan)


@bridge.task(backend="arq", schedule=1)
def tick() -> None:
    context = current_task()
    assert context is not None and context.scheduled_at is not None
    with open(Path(__file__).parent / "ticks.txt", "a") as file:
        file.write(f"{os.getpid()} {context.scheduled_at.isoformat()}\\n")


@bridge.task
def local() -> None: ...
"""


def test_dev_runs_a_scheduler_when_queued_tasks_have_schedules(
    spawn_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    sys.path.insert(0, str(ROOT))
    from examples.quickstart import bridge
    from taskbridge import TaskBridge
    from taskbridge._dev import plan_scheduler

    assert plan_scheduler(bridge) is False  # no schedule at all
    in_process = TaskBridge()
    in_process.task(schedule=5)(_port_free)
    assert plan_scheduler(in_process) is False  # the API process runs those itself

    (tmp_path / "schedapp.py").write_text(SCHEDULED_APP)
    dev = spawn_worker(
        ["dev", "schedapp:app", "--port", str(_free_port()), "--no-reload"], env=_clean_env()
    )
    dev.wait_for_output(r"started a throwaway Redis at redis://127\.0\.0\.1:\d+ for arq")
    dev.wait_for_output(r"scheduler \| .*became leader|scheduler \| .*dispatched slot", 30)
    ticks = tmp_path / "ticks.txt"
    wait_until(
        lambda: ticks.exists() and len(ticks.read_text().splitlines()) >= 3, 30, "3 slots to run"
    )
    slots = [datetime.fromisoformat(line.split()[1]) for line in ticks.read_text().splitlines()]
    assert len(set(slots)) == len(slots), slots  # each slot once
    # dispatched by the scheduler process, run by the ARQ worker
    assert re.search(r"scheduler \| .*dispatched slot", dev.output), dev.output
    dev.process.send_signal(signal.SIGINT)
    assert dev.process.wait(60) == 0, dev.output
