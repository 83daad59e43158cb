"""One run's state, shared by the sections: options, names, results, processes and the load."""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .infra import LoadGen, Proc, cpu_seconds, memory, uvicorn
from .results import Results

DEFAULT_CONNECTIONS = 32
"""Row keys measured at this many connections carry no suffix (as in earlier results.json)."""


@dataclass
class Run:
    """Options, names, results and every process a run started (stopped at the end)."""

    args: argparse.Namespace
    config: Config
    results: Results
    workdir: Path
    rng: random.Random
    loadgen: LoadGen | None = None
    procs: list[Proc] = field(default_factory=list)
    arq_ids: list[str] = field(default_factory=list)
    amqp_queues: set[str] = field(default_factory=set)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        """Start a process (its log in the work directory)."""
        proc = Proc(name, argv, env, self.workdir / f"{name}.log")
        self.procs.append(proc)
        return proc

    def serve(self, name: str, app: str, env: dict[str, str]) -> tuple[Proc, int]:
        """Serve `app` with uvicorn; return the process and its port once it accepts."""
        proc, port = uvicorn(name, app, env, self.workdir)
        self.procs.append(proc)
        return proc, port

    def stop(self, *procs: Proc) -> None:
        """Stop processes this run started."""
        for proc in procs:
            proc.stop()
            if proc in self.procs:
                self.procs.remove(proc)

    def closed(
        self,
        port: int,
        path: str,
        *,
        connections: int,
        duration: float | None = None,
        server: Proc | None = None,
    ) -> dict[str, Any]:
        """Closed-loop load on `path`; with `server`, also its CPU time per answered request
        (insensitive to other processes' load, unlike req/s on a shared machine)."""
        assert self.loadgen is not None
        cpu = cpu_seconds(server.pid) if server is not None else 0.0
        outcome = self.loadgen.run(
            mode="closed",
            port=port,
            path=path,
            connections=connections,
            warmup=self.args.warmup,
            duration=duration or self.args.duration,
        )
        if server is not None:
            time.sleep(0.05)  # background tasks of the last answers
            used = cpu_seconds(server.pid) - cpu
            outcome["cpu_us"] = used * 1e6 / max(1, outcome["completed"])
        return outcome

    def sync_redis(self) -> Any:
        """A new synchronous client of the run's Redis (close it)."""
        import redis

        assert self.config.redis_url is not None
        return redis.Redis.from_url(self.config.redis_url)

    def memory_row(self, key: str, label: str, native: Proc, tb: Proc) -> None:
        """Record the memory of two processes (PSS over the tree when they have children)."""
        n, t = memory(native.pid), memory(tb.pid)
        metric = "tree_pss_mib" if n["processes"] > 1 else "rss_mib"
        self.results.compare(
            "memory",
            f"memory-{key}",
            label,
            "MiB PSS (all processes)" if metric == "tree_pss_mib" else "MiB RSS",
            ("native", [n[metric]]),
            ("taskbridge", [t[metric]]),
            higher_is_better=False,
            extra={"native": n, "tb": t},
        )


def connections_suffix(connections: int) -> str:
    """The row-key suffix for a connection count ("" at the default, so keys stay stable)."""
    return "" if connections == DEFAULT_CONNECTIONS else f"-c{connections}"


def connections_label(connections: int) -> str:
    return f"{connections} connection{'s' if connections != 1 else ''}"
