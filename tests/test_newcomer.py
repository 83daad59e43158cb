"""What a newcomer meets first: start-up errors, registration mistakes, odd arguments.

Each test checks the exact text a user sees, through the command or a real app where that is
how users meet it.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from taskbridge import TaskArgumentError, TaskBridge, Tasks
from taskbridge.backends._builtin import RecordingBackend
from tests.command import run_taskbridge

QUEUED_APP = """
from fastapi import FastAPI
from taskbridge import TaskBridge

bridge = TaskBridge()

@bridge.task(backend="celery")
def build_report(month: str) -> None: ...

@bridge.task(backend="arq")
async def resize(image_id: int) -> None: ...

app = FastAPI(lifespan=bridge.lifespan)
"""


def run_cli(tmp_path: Path, app: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_taskbridge(tmp_path, {"newapp": app}, *args, **env)


def test_every_start_up_problem_is_reported_at_once(tmp_path: Path) -> None:
    result = run_cli(tmp_path, QUEUED_APP, "check", "newapp:app")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "taskbridge: error: 2 configuration problems:",
        "  - invalid options for backend 'celery' (CeleryBackend): "
        "TASKBRIDGE_BACKENDS__CELERY__BROKER_URL: Field required (backend 'celery' is named by "
        "@task(backend=...) of task 'newapp.build_report')",
        "  - invalid options for backend 'arq' (ArqBackend): TASKBRIDGE_BACKENDS__ARQ__REDIS_URL: "
        "Field required (backend 'arq' is named by @task(backend=...) of task 'newapp.resize')",
    ]


def test_an_unknown_backend_names_where_it_was_named_and_what_is_installed(
    tmp_path: Path,
) -> None:
    result = run_cli(
        tmp_path,
        QUEUED_APP.replace('backend="celery"', 'backend="celerey"'),
        "tasks",
        "newapp:app",
        TASKBRIDGE_BACKENDS__ARQ__REDIS_URL="redis://127.0.0.1:1/1",
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "taskbridge: error: no backend named 'celerey' is installed (did you mean 'celery'?); "
        "installed backends: arq, celery, immediate, inprocess, recording (or give an import "
        "string, package.module:Class, as the alias's engine option) (backend 'celerey' is "
        "named by @task(backend=...) of task 'newapp.build_report')"
    )


def test_tasks_shows_the_queues_the_workers_use(tmp_path: Path) -> None:
    result = run_cli(
        tmp_path,
        QUEUED_APP,
        "tasks",
        "newapp:app",
        TASKBRIDGE_BACKENDS__CELERY__BROKER_URL="redis://127.0.0.1:1/1",
        TASKBRIDGE_BACKENDS__ARQ__REDIS_URL="redis://127.0.0.1:1/1",
    )
    assert result.returncode == 0, result.stderr
    lines = [line.split(None, 2) for line in result.stdout.splitlines()]
    assert lines == [
        ["newapp.build_report"],
        ["backend", "celery", "(decorator)"],
        ["queue", "taskbridge", "(default of backend 'celery')"],
        ["newapp.resize"],
        ["backend", "arq", "(decorator)"],
        ["queue", "taskbridge:queue", "(default of backend 'arq')"],
    ]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_check_fails_when_the_result_backend_does_not_answer(tmp_path: Path) -> None:
    broker = os.environ.get("TASKBRIDGE_TEST_REDIS_URL")
    if not broker:
        pytest.skip("needs TASKBRIDGE_TEST_REDIS_URL (a Redis the broker ping can reach)")
    dead = f"redis://127.0.0.1:{_closed_port()}/1"
    app = QUEUED_APP.replace('@bridge.task(backend="arq")', '@bridge.task(backend="celery")')
    result = run_cli(
        tmp_path,
        app,
        "check",
        "newapp:app",
        TASKBRIDGE_BACKENDS__CELERY__BROKER_URL=broker,
        TASKBRIDGE_BACKENDS__CELERY__RESULT_BACKEND=dead,
        TASKBRIDGE_DISPATCH_TIMEOUT="3",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("backend celery")]
    assert len(failed) == 1
    assert failed[0].startswith(
        f"backend celery: FAILED (BackendUnavailable: backend 'celery': the Celery result "
        f"backend at {dead} does not answer ("
    )


def test_a_lambda_or_nested_function_for_a_queue_is_refused_at_start_up(tmp_path: Path) -> None:
    app = """
from taskbridge import TaskBridge

bridge = TaskBridge({"default_backend": "celery"})
shout = bridge.task(lambda text: text.upper())

def factory():
    @bridge.task
    def inner() -> None: ...
    return inner

factory()
"""
    result = run_cli(
        tmp_path,
        app,
        "tasks",
        "newapp:bridge",
        TASKBRIDGE_BACKENDS__CELERY__BROKER_URL="redis://127.0.0.1:1/1",
    )
    assert result.returncode == 2
    fix = (
        "so a worker cannot find it: backend 'celery' runs calls in a worker process, which "
        "imports the bridge's module and looks tasks up by name; define the function at module "
        "level, or give it a name= and register it when the module is imported (or route the "
        "task to the inprocess backend)"
    )
    assert result.stderr.splitlines() == [
        "taskbridge: error: 2 configuration problems:",
        f"  - task 'newapp.<lambda>' is a lambda, {fix}",
        f"  - task 'newapp.factory.<locals>.inner' is defined inside a function "
        f"(factory.<locals>.inner), {fix}",
    ]
    named = app.replace("bridge.task(lambda", 'bridge.task(name="shout")(lambda').replace(
        "@bridge.task\n", '@bridge.task(name="inner")\n'
    )
    result = run_cli(
        tmp_path,
        named,
        "tasks",
        "newapp:bridge",
        TASKBRIDGE_BACKENDS__CELERY__BROKER_URL="redis://127.0.0.1:1/1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[::3] == ["inner", "shout"]


def test_nested_functions_stay_fine_in_process_and_re_decorating_is_idempotent() -> None:
    bridge = TaskBridge({"backends": {"rec": {"engine": "recording"}}})
    app = FastAPI()
    ran: list[int] = []

    @app.get("/{n}")
    async def endpoint(n: int, tasks: Tasks) -> None:
        @bridge.task
        def note(value: int) -> None:
            ran.append(value)

        tasks.add_task(note, n)

    client = TestClient(app)
    assert [client.get(f"/{n}").status_code for n in (1, 2, 3)] == [200, 200, 200]
    assert ran == [1, 2, 3]
    assert len([name for name in bridge.tasks if name.endswith("note")]) == 1

    def one() -> None: ...

    def other() -> None: ...

    bridge.task(name="same")(one)
    with pytest.raises(Exception, match=r"two functions are registered as task 'same'"):
        bridge.task(name="same")(other)


def test_deeply_nested_arguments_are_a_task_argument_error() -> None:
    bridge = TaskBridge({"backends": {"rec": {"engine": "recording"}}})

    @bridge.task(backend="rec")
    def store(tree: list[object]) -> None: ...

    deep: list[object] = []
    for _ in range(500):
        deep = [deep]
    app = FastAPI()

    @app.post("/")
    async def endpoint(tasks: Tasks) -> None:
        tasks.add_task(store, deep)

    with pytest.raises(TaskArgumentError) as caught:
        TestClient(app).post("/")
    assert caught.value.task_name == store.name
    assert caught.value.parameter == "tree"
    assert str(caught.value).startswith(
        f"task {store.name!r}: argument 'tree' is nested more than 100 levels deep (at tree[0][0]"
    )
    recorded = bridge.backend("rec")
    assert isinstance(recorded, RecordingBackend) and recorded.calls == []


def test_a_status_call_answering_503_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    dead = f"redis://127.0.0.1:{_closed_port()}/1"
    bridge = TaskBridge(
        {
            "backends": {"arq": {"redis_url": dead}},
            "default_backend": "arq",
            "dispatch_timeout": 2,
        }
    )
    app = FastAPI()
    app.include_router(bridge.router())
    with caplog.at_level(logging.WARNING, logger="taskbridge"):
        response = TestClient(app).get("/tasks/abc")
    assert response.status_code == 503
    logged = [r.getMessage() for r in caplog.records if r.name == "taskbridge"]
    assert any(
        m.startswith("status of task call abc not available (answered 503): backend 'arq'")
        for m in logged
    ), logged
