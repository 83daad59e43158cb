"""Dispatch cost: CeleryBackend against Celery's own `apply_async`, on the same broker.

    uv run python backends/celery/bench/dispatch.py redis://127.0.0.1:6379/9 [--http]
    uv run python backends/celery/bench/dispatch.py amqp://guest:guest@127.0.0.1:5672// [--http]

With nothing consuming the queue (deleted at the end), it times N single calls one after the
other (`await task.enqueue()` vs `apply_async()`) and N requests' worth of 5 calls (one
`bridge.dispatch()` batch vs 5 `apply_async()`). With --http it also serves http_app.py with
uvicorn (one process) and loads each endpoint with 50 keep-alive connections from a raw
asyncio client (cheap, so the server gets the CPU).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from taskbridge_celery._options import celery_config

from taskbridge import TaskBridge

N = 1000
HERE = Path(__file__).parent


def report(label: str, seconds: float, count: int) -> None:
    print(f"{label:<52} {seconds * 1e6 / count:8.1f} µs/op {count / seconds:9.0f} op/s")


async def timed(label: str, count: int, step: Callable[[int], Awaitable[Any]]) -> None:
    started = time.perf_counter()
    for i in range(count):
        await step(i)
    report(label, time.perf_counter() - started, count)


def timed_sync(label: str, count: int, step: Callable[[int], Any]) -> None:
    started = time.perf_counter()
    for i in range(count):
        step(i)
    report(label, time.perf_counter() - started, count)


def options_for(url: str, queue: str, prefix: str) -> dict[str, Any]:
    options: dict[str, Any] = {"broker_url": url, "default_queue": queue}
    if url.startswith("redis"):
        options["key_prefix"] = prefix
    return options


async def micro(url: str, queue: str, prefix: str) -> None:
    bridge = TaskBridge({"backends": {"celery": options_for(url, queue, prefix)}})

    @bridge.task(name="bench.task", backend="celery")
    def task(n: int, label: str) -> None:
        """Never runs: the benchmark only dispatches."""

    celery_app = Celery("bench", set_as_current=False)
    celery_app.conf.update(celery_config(bridge.backend("celery").options))  # type: ignore[arg-type]

    @celery_app.task(name="bench.task")  # type: ignore[untyped-decorator]
    def celery_task(n: int, label: str) -> None:
        """Never runs."""

    await bridge.open()
    try:
        await task.enqueue(0, "warm-up")
        celery_task.apply_async((0, "warm-up"), queue=queue)
        await timed("taskbridge: await task.enqueue() (1 call)", N, lambda i: task.enqueue(i, "x"))
        timed_sync(
            "celery: task.apply_async() (1 call)",
            N,
            lambda i: celery_task.apply_async((i, "x"), queue=queue),
        )

        async def batch(i: int) -> None:
            await bridge.dispatch([bridge.prepare(task, (i, "x"), {}) for _ in range(5)])

        def five(i: int) -> None:
            for _ in range(5):
                celery_task.apply_async((i, "x"), queue=queue)

        await timed("taskbridge: one dispatch() of 5 calls (per request)", N, batch)
        timed_sync("celery: 5 x apply_async() (per request)", N, five)
    finally:
        await bridge.close()
        with celery_app.connection_for_write() as connection:
            drop(celery_app, connection, queue)
        celery_app.close()


def drop(celery_app: Any, connection: Any, queue: str) -> None:
    """Delete the benchmark's queue and its same-named exchange (RabbitMQ keeps both)."""
    bound = celery_app.amqp.queues[queue](connection.default_channel)
    bound.declare()  # kombu's Redis transport only deletes what this channel declared
    bound.delete()
    if not celery_app.conf.broker_url.startswith("redis"):
        bound.exchange.delete()


async def load(port: int, path: str, seconds: float, connections: int = 50) -> float:
    """Requests per second `path` answers with 200 under `connections` keep-alive clients."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = 0
        while time.perf_counter() < stop_at:
            n += 1
            request = f"POST {path}/{n} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n"
            writer.write(request.encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1]
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            assert status == b"200", head
            done += 1
        writer.close()
        await writer.wait_closed()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    return done / (time.perf_counter() - started)


async def http(url: str, queue: str, prefix: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {**os.environ, "BENCH_BROKER_URL": url, "BENCH_QUEUE": queue, "BENCH_PREFIX": prefix}
    command = [sys.executable, "-m", "uvicorn", "http_app:app", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--log-level", "warning", "--no-access-log"], cwd=HERE, env=env
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "uvicorn did not start"
                await asyncio.sleep(0.05)
        for path in ("/none", "/tb1", "/celery1", "/tb5", "/celery5"):
            await load(port, path, 1.0)  # warm-up: connections, queue declarations
            rate = await load(port, path, 4.0)
            print(f"uvicorn endpoint {path:<9} (50 keep-alive clients)      {rate:9.0f} req/s")
    finally:
        server.terminate()
        server.wait(10)


async def main(url: str, with_http: bool) -> None:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    prefix = f"bench-{uuid.uuid4().hex[:6]}:"
    print(f"broker {url.split('@')[-1]}, N={N}")
    await micro(url, queue, prefix)
    if with_http:
        await http(url, queue, prefix)
        celery_app = Celery("bench", set_as_current=False)
        celery_app.conf.update(broker_url=url)
        if url.startswith("redis"):
            celery_app.conf.broker_transport_options = {"global_keyprefix": prefix}
        with celery_app.connection_for_write() as connection:
            drop(celery_app, connection, queue)
        celery_app.close()


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if not a.startswith("--")]
    target = arguments[0] if arguments else "redis://127.0.0.1:6379/9"
    asyncio.run(main(target, "--http" in sys.argv))
