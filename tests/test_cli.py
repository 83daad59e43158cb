"""The `taskbridge` command, run as a real subprocess."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.command import run_taskbridge

APP = """
from fastapi import FastAPI
from taskbridge import TaskBridge

bridge = TaskBridge({"backends": {"rec": {"engine": "recording"}}})

@bridge.task
def welcome(email: str) -> None: ...

@bridge.task(backend="rec", queue="reports", retries=3, timeout=300)
def build_report(user_id: int) -> str: ...

app = FastAPI(lifespan=bridge.lifespan)
bridge.attach(app)
"""


def taskbridge(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_taskbridge(tmp_path, {"myapp": APP}, *args, **env)


def test_tasks_lists_effective_routing_and_where_it_came_from(tmp_path: Path) -> None:
    result = taskbridge(
        tmp_path, "tasks", "myapp:bridge", TASKBRIDGE_ROUTES='{"myapp.welcome": "immediate"}'
    )
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines == [
        ["myapp.build_report"],
        ["backend", "rec", "(decorator)"],
        ["queue", "reports", "(decorator)"],
        ["retries", "3", "(decorator)"],
        ["timeout", "300.0", "(decorator)"],
        ["myapp.welcome"],
        ["backend", "immediate", "(route", "'myapp.welcome')"],
    ]


def test_the_app_can_stand_for_its_bridge(tmp_path: Path) -> None:
    result = taskbridge(tmp_path, "tasks", "myapp:app")
    assert result.returncode == 0, result.stderr
    assert "myapp.welcome" in result.stdout


def test_configuration_errors_exit_2_with_the_message(tmp_path: Path) -> None:
    result = taskbridge(tmp_path, "tasks", "myapp:bridge", TASKBRIDGE_DEFAULT_BACKEND="nope")
    assert result.returncode == 2
    assert "no backend named 'nope'" in result.stderr
    missing = taskbridge(tmp_path, "tasks", "nomodule:bridge")
    assert missing.returncode == 2 and "cannot import 'nomodule'" in missing.stderr


def test_worker_for_a_backend_without_workers_says_so(tmp_path: Path) -> None:
    result = taskbridge(tmp_path, "worker", "rec", "myapp:bridge")
    assert result.returncode == 2
    assert "backend 'rec' (RecordingBackend) has no worker" in result.stderr


DOWN = """
from taskbridge import BackendUnavailable
from taskbridge.backends import Backend


class DownBackend(Backend):
    async def enqueue(self, calls):
        raise AssertionError("not used")

    async def ping(self):
        raise BackendUnavailable("broker at redis://u:***@host:1/0 refused", backend=self.alias)
"""


def test_check_reports_routes_and_backend_health_with_an_exit_code(tmp_path: Path) -> None:
    ok = taskbridge(tmp_path, "check", "myapp:bridge")
    assert ok.returncode == 0, ok.stderr
    assert "backend rec: ok (no broker)" in ok.stdout
    assert "myapp.build_report" in ok.stdout
    (tmp_path / "downmod.py").write_text(
        DOWN + "\nfrom taskbridge import TaskBridge\nbridge = TaskBridge()\n"
    )
    down = taskbridge(
        tmp_path,
        "check",
        "downmod:bridge",
        TASKBRIDGE_DEFAULT_BACKEND="down",
        TASKBRIDGE_BACKENDS__DOWN__ENGINE="downmod:DownBackend",
    )
    assert down.returncode == 1
    assert "backend down: FAILED (BackendUnavailable: broker at redis://u:***@host" in down.stdout


def test_redact_url_hides_passwords_only() -> None:
    from taskbridge.backends import redact_url

    assert redact_url("amqp://guest:s3cret@mq:5672//") == "amqp://guest:***@mq:5672//"
    assert redact_url("rediss://:pw@cache:6380/1") == "rediss://:***@cache:6380/1"
    assert redact_url("redis://cache:6379/2") == "redis://cache:6379/2"
    assert redact_url("sentinel://:pw1@h1:26379;sentinel://:pw2@h2:26379/1") == (
        "sentinel://:***@h1:26379;sentinel://:***@h2:26379/1"
    )
    assert redact_url("amqp://u:a@h1//;amqp://u:b@h2//") == "amqp://u:***@h1//;amqp://u:***@h2//"


def test_worker_help_lists_the_backend_options_without_an_app_or_settings(
    tmp_path: Path,
) -> None:
    expected = {
        "celery": ["--health-file", "--queues", "--concurrency", "--pool", "--loglevel"],
        "arq": ["--health-file", "--queue", "--max-jobs", "--burst"],
    }
    for alias, *args in [
        ("celery", "--help"),
        ("celery", "nomodule:app", "-h"),  # an app that does not import: help all the same
        ("arq", "-h"),
        ("arq", "myapp:bridge", "--help"),
    ]:
        result = taskbridge(tmp_path, "worker", alias, *args)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stdout.startswith(f"usage: taskbridge worker {alias} "), result.stdout
        for option in expected[alias]:
            assert f" {option} " in result.stdout, (alias, args, option, result.stdout)


def test_worker_help_alone_shows_the_usage(tmp_path: Path) -> None:
    result = taskbridge(tmp_path, "worker", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: taskbridge worker [-h] ALIAS APP [worker options]" in result.stdout
    assert "taskbridge worker ALIAS --help" in result.stdout
    missing = taskbridge(tmp_path, "worker", "celery")
    assert missing.returncode == 2
    assert "the following arguments are required: APP" in missing.stderr


def test_worker_help_for_an_alias_without_a_worker_says_what_is_wrong(tmp_path: Path) -> None:
    unknown = taskbridge(tmp_path, "worker", "nope", "--help")
    assert unknown.returncode == 2
    assert "cannot list the worker options of 'nope'" in unknown.stderr
    assert "no backend named 'nope' is installed" in unknown.stderr
    in_process = taskbridge(tmp_path, "worker", "rec", "myapp:bridge", "--help")
    assert in_process.returncode == 2
    assert "backend 'rec' (RecordingBackend) has no worker" in in_process.stderr


OLD_STYLE = """
import argparse

from taskbridge.backends import Backend, BackendOptions


class OldOptions(BackendOptions):
    url: str


class OldBackend(Backend):
    supports_worker = True
    options_model = OldOptions

    async def enqueue(self, calls):
        raise AssertionError("not used")

    def add_worker_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--old-style", help=f"serves {self.options.url}")
"""


def test_worker_help_of_a_plugin_with_instance_method_arguments(tmp_path: Path) -> None:
    (tmp_path / "oldmod.py").write_text(OLD_STYLE)
    engine = {"TASKBRIDGE_BACKENDS__OLD__ENGINE": "oldmod:OldBackend"}
    configured = taskbridge(
        tmp_path, "worker", "old", "--help", **engine, TASKBRIDGE_BACKENDS__OLD__URL="x://h"
    )
    assert configured.returncode == 0, configured.stderr
    assert "--old-style OLD_STYLE" in configured.stdout and "serves x://h" in configured.stdout
    bare = taskbridge(tmp_path, "worker", "old", "--help", **engine)
    assert bare.returncode == 0, bare.stderr
    assert "--health-file" in bare.stdout
    assert "OldBackend lists its own options once 'old' has settings." in bare.stdout
