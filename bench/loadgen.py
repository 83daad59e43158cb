"""The load generator: a separate process driving HTTP/1.1 keep-alive load at loopback servers.

    python -m bench.loadgen serve            # JSON commands on stdin, one JSON result per line
    python -m bench.loadgen trivial PORT     # a minimal HTTP server: this client's ceiling

Commands (one JSON object per line):

- closed loop: `{"mode": "closed", "port": P, "path": "/x", "connections": 32,
  "warmup": 0.3, "duration": 1.5}`: every connection sends its next request as soon as the
  previous answer arrived. Result: requests/s completed in the measured window and latency
  percentiles of those requests. Each request's path is `path/<n>` (n counts up).
- open loop: `{"mode": "open", "port": P, "streams": [{"path": "/light", "rate": 200}, ...],
  "warmup": 0.5, "duration": 3}`: requests start on a fixed schedule whatever the server does;
  latency is measured from the scheduled start (no coordinated omission), per stream.

Safety: only loopback hosts are accepted; every command ends after warmup + duration (plus at
most `drain` seconds for answers in flight), and at most MAX_REQUESTS requests are sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

MAX_REQUESTS = 2_000_000
MAX_CONNECTIONS = 512
HOST = "127.0.0.1"


def _check_loopback(host: str) -> None:
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"refusing to send load to {host}: loopback addresses only")


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of sorted values, nearest rank; nan when empty."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


@dataclass
class Window:
    """Latencies (s) of requests that started inside the measured window."""

    start: float
    end: float
    latencies: list[float] = field(default_factory=list)
    completed: int = 0
    """Every answer received, warm-up included (for CPU per request)."""
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def summary(self, duration: float) -> dict[str, Any]:
        values = sorted(self.latencies)
        return {
            "requests": len(values),
            "rps": len(values) / duration,
            "p50_ms": percentile(values, 0.50) * 1000,
            "p90_ms": percentile(values, 0.90) * 1000,
            "p99_ms": percentile(values, 0.99) * 1000,
            "max_ms": (values[-1] * 1000) if values else float("nan"),
            "errors": self.errors,
            "completed": self.completed,
            "statuses": {str(k): v for k, v in self.statuses.items()},
        }


class Connection:
    """One keep-alive HTTP/1.1 connection sending bodiless POSTs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def post(self, path: str) -> int:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n\r\n".encode()
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        lowered = head.lower()
        at = lowered.find(b"\r\ncontent-length:")
        if at >= 0:
            end = lowered.find(b"\r\n", at + 2)
            length = int(lowered[at + 17 : end])
        if length:
            await self.reader.readexactly(length)
        return status

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def closed_loop(
    port: int, path: str, connections: int, warmup: float, duration: float
) -> dict[str, Any]:
    connections = min(connections, MAX_CONNECTIONS)
    pool = [await Connection.open(port) for _ in range(connections)]
    begin = time.perf_counter()
    window = Window(begin + warmup, begin + warmup + duration)
    sent = 0

    async def client(conn: Connection) -> None:
        nonlocal sent
        while sent < MAX_REQUESTS:
            started = time.perf_counter()
            if started >= window.end:
                return
            sent += 1
            try:
                status = await conn.post(f"{path}/{sent}")
            except (OSError, asyncio.IncompleteReadError, ValueError):
                window.errors += 1
                return
            window.completed += 1
            if started >= window.start:
                window.latencies.append(time.perf_counter() - started)
                window.statuses[status] = window.statuses.get(status, 0) + 1
                if status != 200:
                    window.errors += 1

    try:
        await asyncio.wait_for(asyncio.gather(*(client(c) for c in pool)), warmup + duration + 30)
    finally:
        for conn in pool:
            await conn.close()
    return window.summary(duration)


async def open_loop(
    port: int, streams: list[dict[str, Any]], warmup: float, duration: float, drain: float = 10
) -> dict[str, Any]:
    idle: list[Connection] = []
    opened = 0
    loop = asyncio.get_running_loop()
    begin = loop.time() + 0.05
    windows = {s["path"]: Window(begin + warmup, begin + warmup + duration) for s in streams}
    pending: set[asyncio.Task[None]] = set()
    dropped = 0

    async def one(path: str, scheduled: float, n: int) -> None:
        nonlocal opened
        window = windows[path]
        conn = idle.pop() if idle else None
        if conn is None:
            opened += 1
            conn = await Connection.open(port)
        try:
            status = await conn.post(f"{path}/{n}")
        except (OSError, asyncio.IncompleteReadError, ValueError):
            window.errors += 1
            await conn.close()
            return
        idle.append(conn)
        if scheduled >= window.start:
            window.latencies.append(loop.time() - scheduled)
            window.statuses[status] = window.statuses.get(status, 0) + 1
            if status != 200:
                window.errors += 1

    schedule: list[tuple[float, str]] = []
    for stream in streams:
        interval = 1.0 / float(stream["rate"])
        t = begin
        while t < begin + warmup + duration:
            schedule.append((t, stream["path"]))
            t += interval
    schedule.sort()
    for n, (at, path) in enumerate(schedule[:MAX_REQUESTS]):
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if opened - len(idle) >= MAX_CONNECTIONS:  # all connections busy: count as dropped
            dropped += 1
            continue
        task = loop.create_task(one(path, at, n))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        _, late = await asyncio.wait(pending, timeout=drain)
        for task in late:
            task.cancel()
    for conn in idle:
        await conn.close()
    return {
        "streams": {path: w.summary(duration) for path, w in windows.items()},
        "connections_opened": opened,
        "dropped": dropped,
    }


async def run_command(command: dict[str, Any]) -> dict[str, Any]:
    _check_loopback(command.get("host", HOST))
    warmup, duration = float(command.get("warmup", 0.3)), float(command["duration"])
    if not 0 < duration <= 120 or not 0 <= warmup <= 30:
        raise ValueError("duration must be in (0, 120] s and warmup in [0, 30] s")
    if command["mode"] == "closed":
        return await closed_loop(
            int(command["port"]),
            command["path"],
            int(command.get("connections", 32)),
            warmup,
            duration,
        )
    if command["mode"] == "open":
        return await open_loop(int(command["port"]), command["streams"], warmup, duration)
    raise ValueError(f"unknown mode {command['mode']!r}")


def serve() -> None:
    """Answer commands from stdin until it closes."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            result = asyncio.run(run_command(json.loads(line)))
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


class _Trivial(asyncio.Protocol):
    """Answers every request with a fixed 200 (requests have no body)."""

    RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4\r\n\r\nnull"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        count = self.buffer.count(b"\r\n\r\n")
        if count:
            self.buffer = self.buffer[self.buffer.rfind(b"\r\n\r\n") + 4 :]
            self.transport.write(self.RESPONSE * count)


async def trivial_server(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Trivial, HOST, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["trivial"]:
        asyncio.run(trivial_server(int(sys.argv[2])))
    else:
        sys.exit(__doc__)
