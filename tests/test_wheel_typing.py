"""Users' type checkers see the installed wheels as typed: built, installed in a fresh venv, and
checked with mypy --strict from outside the source tree (so `py.typed` is what makes it work)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What uv prints when the package index cannot be reached: the test is skipped, not failed.
_NETWORK_ERRORS = (
    "Failed to fetch",
    "error sending request",
    "dns error",
    "Could not connect",
    "Connection refused",
    "Network is unreachable",
    "operation timed out",
    "network connectivity is disabled",
)

GOOD = '''\
"""The public API as an application uses it; mypy --strict must accept every line."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, assert_type

from fastapi import FastAPI
from taskbridge_arq import ArqBackend
from taskbridge_celery import CeleryBackend

from taskbridge import Task, TaskBridge, TaskHandle, Tasks
from taskbridge.backends import Backend, load_backend_class

bridge = TaskBridge()


# positional-only parameters, so that assert_type can spell the whole Task type
@bridge.task
def build_report(user_id: int, title: str, /) -> int:
    return user_id


@bridge.task
async def sync_crm(user_id: int, email: str, /) -> bool:
    return True


def count(user_id: int, title: str, /) -> int:
    return user_id


on_celery = bridge.task(backend="celery", queue="reports", retries=3)(count)


@bridge.task(backend="arq")
def send_welcome(email: str, *, retry: bool = False) -> None: ...


assert_type(build_report, Task[[int, str], int])
assert_type(sync_crm, Task[[int, str], Coroutine[Any, Any, bool]])
assert_type(on_celery, Task[[int, str], int])
assert_type(build_report.using(delay=30), Task[[int, str], int])
assert_type(build_report(1, "x"), int)
assert_type(build_report.name, str)
welcome_type: Task[..., None] = send_welcome
engines: list[type[Backend]] = [CeleryBackend, ArqBackend, load_backend_class("celery")]

app = FastAPI(lifespan=bridge.lifespan)


@app.post("/reports")
async def create(tasks: Tasks) -> str:
    assert_type(tasks.add_task(build_report, 1, "x"), TaskHandle)
    assert_type(tasks.add_task(sync_crm, 1, "ada@example.com"), TaskHandle)
    assert_type(tasks.add_task(send_welcome, "ada@example.com", retry=True), TaskHandle)
    assert_type(await build_report.enqueue(1, "x"), TaskHandle)
    assert_type(await on_celery.enqueue(2, "y"), TaskHandle)
    handle = tasks.add_task(print, "plain callables work too")
    assert_type(handle.id, str)
    return handle.id
'''

BAD = """\
from taskbridge import TaskBridge, Tasks

bridge = TaskBridge()


@bridge.task
def build_report(user_id: int, title: str) -> int:
    return user_id


async def endpoint(tasks: Tasks) -> None:
    tasks.add_task(build_report, "1", "x")
    tasks.add_task(build_report, 1)
    await build_report.enqueue(1, "x", 3)
    await build_report.enqueue(1, titel="x")
    bridge.task(backend="celery")(build_report.func)(1, 2)
"""

# (line, error code) that mypy must report for BAD, and nothing else
BAD_ERRORS = [
    (12, "arg-type"),  # wrong argument type to add_task with a Task
    (13, "call-arg"),  # missing argument
    (14, "call-arg"),  # too many arguments to enqueue
    (15, "call-arg"),  # misspelt keyword
    (16, "arg-type"),  # bridge.task(backend=...)(f) keeps f's signature
]


def _uv() -> str:
    found = os.environ.get("UV") or shutil.which("uv")
    if not found:
        pytest.skip("uv is not installed: it builds the wheels and the venv")
    return found


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a build or install step; skip the test when it fails for want of a network."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=100)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if any(marker.lower() in output.lower() for marker in _NETWORK_ERRORS):
            pytest.skip(f"the package index cannot be reached: {output.strip()[-300:]}")
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}:\n{output}")
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the three built wheels and mypy (the version the project uses)."""
    uv = _uv()
    base = tmp_path_factory.mktemp("wheels")
    dist = base / "dist"
    _run([uv, "build", "--all-packages", "--wheel", "--out-dir", str(dist)], ROOT)
    wheels = sorted(dist.glob("*.whl"))
    names = {wheel.name.split("-")[0]: wheel for wheel in wheels}
    assert sorted(names) == [
        "fastapi_taskbridge",
        "fastapi_taskbridge_arq",
        "fastapi_taskbridge_celery",
    ]
    for distribution, package in [
        ("fastapi_taskbridge", "taskbridge"),
        ("fastapi_taskbridge_arq", "taskbridge_arq"),
        ("fastapi_taskbridge_celery", "taskbridge_celery"),
    ]:
        with zipfile.ZipFile(names[distribution]) as archive:
            assert f"{package}/py.typed" in archive.namelist(), distribution
    environment = base / "venv"
    _run([uv, "venv", "--python", sys.executable, str(environment)], base)
    python = environment / "bin" / "python"
    mypy = f"mypy=={importlib.metadata.version('mypy')}"
    _run([uv, "pip", "install", "--python", str(python), *map(str, wheels), mypy], base)
    return environment


def _mypy(venv: Path, source: str, tmp_path: Path) -> tuple[int, str]:
    """mypy --strict from the venv on `source`, run outside the source tree."""
    (tmp_path / "user_app.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    result = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            os.devnull,
            "user_app.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    return result.returncode, result.stdout + result.stderr


def test_installed_wheels_are_typed_for_mypy_strict(venv: Path, tmp_path: Path) -> None:
    status, output = _mypy(venv, GOOD, tmp_path)
    assert status == 0, output
    assert "Success: no issues found in 1 source file" in output


def test_wrong_calls_against_the_installed_wheels_are_type_errors(
    venv: Path, tmp_path: Path
) -> None:
    status, output = _mypy(venv, BAD, tmp_path)
    assert status == 1, output
    errors = [
        (int(line.split(":")[1]), line.rpartition("[")[2].rstrip("]"))
        for line in output.splitlines()
        if ": error:" in line
    ]
    assert errors == BAD_ERRORS, output
