"""docker/compose.yaml is real: each service's command and environment run here, locally.

No Docker engine runs on our machines, so the commands of the API, the Celery worker, the ARQ
worker and Flower are taken from the compose file and started as local processes against the
test brokers (hosts `redis` and `rabbitmq` mapped onto them, queue names made unique), then the
example is driven end to end through them. `docker compose config` validates the file when the
compose plugin is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from conftest import WorkerProcess, wait_until
from taskbridge._dev import free_port as _free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"
BIN = Path(sys.executable).parent


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_compose_file_is_valid_for_docker_compose() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_every_service_has_a_health_check_and_workers_drain_within_their_stop_period() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "rabbitmq", "api", "celery-worker", "arq-worker", "flower"}
    for name, service in services.items():
        assert "healthcheck" in service, name
    from examples.shop.app import bridge

    longest = max(task.policy.timeout or 0 for task in bridge.tasks.values())
    for worker in ("celery-worker", "arq-worker"):
        grace = int(str(services[worker]["stop_grace_period"]).rstrip("s"))
        assert grace > longest, f"{worker} is killed before its longest task ({longest}s) ends"
    wait = int(
        services["arq-worker"]["environment"]["TASKBRIDGE_BACKENDS__ARQ__JOB_COMPLETION_WAIT"]
    )
    assert wait >= longest


def _local_env(
    service: dict[str, Any], redis_url: str, amqp_url: str, unique: Callable[[str], str]
) -> dict[str, str]:
    redis, amqp = urlsplit(redis_url), urlsplit(amqp_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBRIDGE_")}
    for key, value in (service.get("environment") or {}).items():
        value = str(value).replace("rabbitmq:5672", amqp.netloc.rpartition("@")[2])
        if value.startswith("amqp://"):
            value = amqp_url
        if value.startswith("redis://redis:6379"):
            value = redis_url  # one test database for all: names below keep them apart
        env[key] = value
    env["TASKBRIDGE_BACKENDS__CELERY__DEFAULT_QUEUE"] = unique("reports")
    env["TASKBRIDGE_BACKENDS__CELERY__KEY_PREFIX"] = unique("celery") + ":"
    env["TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME"] = unique("crm")
    env["TASKBRIDGE_BACKENDS__ARQ__HEALTH_CHECK_KEY"] = unique("crm-health")
    # ARQ's job keys cannot carry the run id: let results and progress expire soon
    env["TASKBRIDGE_BACKENDS__ARQ__KEEP_RESULT"] = "30"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    del redis
    return env


def _argv(command: list[str], ports: dict[str, str]) -> list[str]:
    argv = [ports.get(part, part) for part in command]
    if argv[0] in ("uvicorn", "taskbridge", "celery"):
        argv[0] = str(BIN / argv[0])
    return argv


def _http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            raw = response.read()
            if response.headers.get_content_type() == "application/json":
                return response.status, json.loads(raw)
            return response.status, raw.decode()
    except urllib.error.HTTPError as error:
        return error.code, None
    except OSError:
        return 0, None


def test_compose_commands_run_the_example_end_to_end(
    redis_url: str,
    amqp_url: str,
    unique_name: Callable[[str], str],
    spawn_process: Callable[..., WorkerProcess],
) -> None:
    services = compose()["services"]
    api_port, flower_port = _free_port(), _free_port()
    ports = {"8000": str(api_port), "--port=5555": f"--port={flower_port}"}
    started: dict[str, WorkerProcess] = {}
    for name in ("api", "celery-worker", "arq-worker", "flower"):
        service = services[name]
        env = _local_env(service, redis_url, amqp_url, unique_name)
        if name == "flower":  # its HTTP API, for this test only (the compose file keeps it off)
            env["FLOWER_UNAUTHENTICATED_API"] = "true"
        started[name] = spawn_process(_argv(service["command"], ports), env=env, cwd=ROOT)

    base = f"http://127.0.0.1:{api_port}"
    wait_until(lambda: _http("GET", f"{base}/openapi.json")[0] == 200, 30, "the API")
    wait_until(
        lambda: _http("GET", f"http://127.0.0.1:{flower_port}/healthcheck")[0] == 200,
        30,
        "Flower",
    )
    status, report = _http("POST", f"{base}/reports/2026-11?rounds=2000")
    assert status == 200
    status, signup = _http("POST", f"{base}/signup", {"email": "ada@example.com", "name": "Ada"})
    assert status == 200

    def settled(task_id: str) -> dict[str, Any] | None:
        code, body = _http("GET", f"{base}/tasks/{task_id}")
        return body if code == 200 and body["state"] == "succeeded" else None

    wait_until(lambda: settled(report["report"]), 60, "the report on the Celery worker")
    wait_until(lambda: settled(signup["crm_sync"]), 60, "the CRM sync on the ARQ worker")
    done_report, done_crm = settled(report["report"]), settled(signup["crm_sync"])
    assert done_report is not None and done_crm is not None
    assert (done_report["backend"], done_report["result"]["month"]) == ("celery", "2026-11")
    assert (done_crm["backend"], done_crm["result"]["user_id"]) == ("arq", 1)
    # Flower runs on the Celery alias's own app: it reads the report's result
    flower = f"http://127.0.0.1:{flower_port}/api/task/result/{report['report']}"
    status, result = _http("GET", flower)
    assert status == 200 and result["state"] == "SUCCESS"
    assert result["result"]["month"] == "2026-11"

    # the workers' health check command passes against the same environment
    env = _local_env(services["celery-worker"], redis_url, amqp_url, unique_name)
    check = subprocess.run(
        _argv(services["celery-worker"]["healthcheck"]["test"][1:], ports),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    for process in started.values():
        process.stop()
    from kombu import Connection

    with Connection(amqp_url) as connection:
        channel = connection.channel()
        queue = env["TASKBRIDGE_BACKENDS__CELERY__DEFAULT_QUEUE"]
        channel.queue_delete(queue)
        channel.exchange_delete(queue)
