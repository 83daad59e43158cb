"""Measure the ARQ backend against ARQ's own enqueue_job and worker, on the same Redis.

    cd backends/arq/bench && uv run python bench_arq.py all      # or: dispatch, latency, throughput

BENCH_REDIS_URL (default redis://127.0.0.1:6379/9; never database 0) names the Redis. Every key
the run creates (queues, jobs, results, records) is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from arq.worker import Worker, func
from fastapi import FastAPI
from redis.asyncio import Redis
from taskbridge_arq import ArqBackend

from taskbridge import TaskBridge, Tasks

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
RUN = f"tbbench-{uuid.uuid4().hex[:8]}"
HERE = Path(__file__).resolve().parent

bridge = TaskBridge(settings={"backends": {"arq": {"redis_url": REDIS_URL, "queue_name": RUN}}})


@bridge.task(backend="arq", name="bench.started")
async def started(key: str) -> None:
    """Record when the job started (the worker's clock, epoch seconds)."""
    await _record(key)


async def _record(key: str) -> None:
    client = _client()
    await client.rpush(key, repr(time.time()))


_clients: list[Redis] = []


def _client() -> Redis:
    if not _clients:
        _clients.append(Redis.from_url(REDIS_URL))
    return _clients[0]


async def native_started(ctx: dict[str, Any], key: str) -> None:
    """The same job for ARQ's own worker."""
    await _record(key)


# -- helpers ------------------------------------------------------------------------------


def _arq_backend() -> ArqBackend:
    backend = bridge.backend("arq")
    assert isinstance(backend, ArqBackend)
    return backend


async def _post(app: FastAPI, path: str) -> None:
    """One POST through the app's ASGI interface, as a server would make it."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 50000),
        "server": ("bench", 80),
    }
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    assert messages[0]["status"] == 200, messages


async def _timed(n: int, one: Callable[[int], Awaitable[Any]]) -> float:
    """Operations per second of `one(i)` run n times in sequence (after 50 warm-up runs)."""
    for i in range(50):
        await one(i)
    began = time.perf_counter()
    for i in range(n):
        await one(i)
    return n / (time.perf_counter() - began)


ROUNDS = 5


async def _compare(
    n: int, contenders: dict[str, Callable[[int], Awaitable[Any]]]
) -> dict[str, float]:
    """Median ops/s of each contender over ROUNDS rounds, interleaved so that load from other
    processes hits all of them alike."""
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(ROUNDS):
        for name, one in contenders.items():
            rates[name].append(await _timed(n, one))
    return {name: statistics.median(values) for name, values in rates.items()}


class Cleanup:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.keys: list[str] = []

    async def run(self) -> None:
        client = Redis.from_url(REDIS_URL)
        prefixes = ("arq:job:", "arq:result:", "arq:in-progress:", "arq:retry:")
        keys = [p + i for i in self.ids for p in prefixes] + self.keys
        for start in range(0, len(keys), 5000):
            await client.delete(*keys[start : start + 5000])
        async for key in client.scan_iter(match=f"*{RUN}*", count=1000):
            await client.delete(key)
        await client.aclose()


# -- dispatch -----------------------------------------------------------------------------


async def bench_dispatch(n: int, cleanup: Cleanup) -> None:
    await bridge.open()
    backend = _arq_backend()
    arq_json: ArqRedis = backend.connect()
    arq_pickle = ArqRedis.from_url(REDIS_URL)
    queue = RUN  # the alias's default queue: `started` as decorated, no `.using()`
    task = started
    key = f"{RUN}:unused"

    async def tb_one(i: int) -> None:
        cleanup.ids.append((await task.enqueue(key)).id)

    async def tb_five(i: int) -> None:
        calls = [bridge.prepare(task, (key,), {}) for _ in range(5)]
        cleanup.ids.extend(call.id for _, call in calls)
        await bridge.dispatch(calls)

    def arq_one(redis: ArqRedis) -> Callable[[int], Awaitable[None]]:
        async def one(i: int) -> None:
            job = await redis.enqueue_job("bench.started", key, _queue_name=queue)
            assert job is not None
            cleanup.ids.append(job.job_id)

        return one

    async def arq_five(i: int) -> None:
        for _ in range(5):
            await arq_one(arq_json)(i)

    async def arq_five_gathered(i: int) -> None:
        await asyncio.gather(*(arq_one(arq_json)(i) for _ in range(5)))

    print(f"\n## dispatch: {n} sequential operations, median of {ROUNDS} interleaved rounds")
    rates = await _compare(
        n,
        {
            "taskbridge task.enqueue (1 job, EVALSHA)": tb_one,
            "arq enqueue_job, JSON serializer (1 job)": arq_one(arq_json),
            "arq enqueue_job, pickle (1 job)": arq_one(arq_pickle),
            "taskbridge dispatch of 5 calls (1 EVALSHA)": tb_five,
            "arq enqueue_job x5, sequential": arq_five,
            "arq enqueue_job x5, asyncio.gather": arq_five_gathered,
        },
    )
    for name, ops in rates.items():
        per = 5 if "5" in name else 1
        print(f"  {name:<46} {ops:9.0f} ops/s  {ops * per:9.0f} jobs/s")
    values = list(rates.values())
    print(
        f"  ratio 1 job: {values[0] / values[1]:.2f}x; 5 jobs: {values[3] / values[4]:.2f}x "
        f"sequential, {values[3] / values[5]:.2f}x gathered"
    )
    cleanup.keys.append(queue)

    # The same through FastAPI endpoints, called directly over ASGI (no HTTP client in the way).
    app = FastAPI()
    bridge.attach(app)

    @app.post("/tb/{count}")
    async def tb_endpoint(count: int, tasks: Tasks) -> dict[str, int]:
        for _ in range(count):
            cleanup.ids.append(tasks.add_task(task, key).id)
        return {"n": count}

    @app.post("/arq/{count}")
    async def arq_endpoint(count: int) -> dict[str, int]:
        for _ in range(count):
            await arq_one(arq_json)(0)
        return {"n": count}

    print(f"\n## FastAPI endpoints over ASGI: {n} requests, median of {ROUNDS} rounds (req/s)")
    for count in (1, 5):
        for concurrency in (1, 10):

            def requests(path: str, c: int = concurrency) -> Callable[[int], Awaitable[None]]:
                async def batch(i: int) -> None:
                    await asyncio.gather(*(_post(app, path) for _ in range(c)))

                return batch

            tb, arq = (
                rate * concurrency
                for rate in (
                    await _compare(
                        n // concurrency,
                        {"tb": requests(f"/tb/{count}"), "arq": requests(f"/arq/{count}")},
                    )
                ).values()
            )
            print(
                f"  {count} job(s)/request, c={concurrency:<2}  taskbridge {tb:6.0f}  "
                f"arq enqueue_job {arq:6.0f}  ratio {tb / arq:.2f}x"
            )
    await arq_json.aclose()
    await arq_pickle.aclose()
    await bridge.close()


# -- latency and throughput, with real worker processes -----------------------------------


def _spawn_taskbridge_worker(queue: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "taskbridge.cli", "--log-level", "WARNING"),
            *("worker", "arq", "bench_arq:bridge", "--queue", queue),
        ],
        cwd=HERE,
        stdout=subprocess.DEVNULL,
    )


def _spawn_native_worker(queue: str, poll_delay: float = 0.5) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "bench_arq.py"), "native-worker", queue, str(poll_delay)],
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _native_worker(queue: str, poll_delay: float) -> None:
    from arq.connections import RedisSettings

    worker = Worker(
        [func(native_started, name="bench.native")],
        queue_name=queue,
        redis_settings=RedisSettings.from_dsn(REDIS_URL),
        poll_delay=poll_delay,
    )
    worker.run()


async def _wait_for_health(queue: str) -> None:
    client = _client()
    deadline = time.monotonic() + 20
    while not await client.exists(f"{queue}:health-check"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no worker came up on {queue}")
        await asyncio.sleep(0.05)


async def _enqueue_native(redis: ArqRedis, queue: str, key: str, cleanup: Cleanup) -> None:
    job = await redis.enqueue_job("bench.native", key, _queue_name=queue)
    assert job is not None
    cleanup.ids.append(job.job_id)


async def bench_latency(n: int, cleanup: Cleanup) -> None:
    print(
        f"\n## dispatch -> start latency, jobs one at a time (taskbridge n={n}, native n={n // 5})"
    )
    await bridge.open()
    client = _client()
    native_redis = ArqRedis.from_url(REDIS_URL)
    for kind in ("taskbridge", "native"):
        queue, key = f"{RUN}:latency-{kind}", f"{RUN}:latency-{kind}:starts"
        cleanup.keys += [queue, key]
        process = (_spawn_taskbridge_worker if kind == "taskbridge" else _spawn_native_worker)(
            queue
        )
        try:
            await _wait_for_health(queue)
            latencies = []
            for _ in range(n if kind == "taskbridge" else n // 5):
                # A random pause, so jobs arrive at random points of ARQ's poll cycle.
                await asyncio.sleep(random.uniform(0, 0.02 if kind == "taskbridge" else 0.5))
                dispatched = time.time()
                if kind == "taskbridge":
                    cleanup.ids.append((await started.using(queue=queue).enqueue(key)).id)
                else:
                    await _enqueue_native(native_redis, queue, key, cleanup)
                _, value = await client.blpop([key], timeout=10)  # type: ignore[misc]
                latencies.append((float(value) - dispatched) * 1000)
        finally:
            process.terminate()
            process.wait(20)
        latencies.sort()
        p50, p90 = statistics.median(latencies), latencies[int(len(latencies) * 0.9)]
        print(f"  {kind:<11} p50 {p50:7.2f} ms   p90 {p90:7.2f} ms   max {latencies[-1]:7.2f} ms")
    await native_redis.aclose()
    await bridge.close()


async def bench_throughput(n: int, cleanup: Cleanup) -> None:
    print(f"\n## worker throughput: {n} queued jobs, max_jobs=10, first start -> last start")
    await bridge.open()
    client = _client()
    native_redis = ArqRedis.from_url(REDIS_URL)
    for kind in ("taskbridge", "native", "native, poll_delay=0.005"):
        queue, key = f"{RUN}:throughput-{kind[:8]}", f"{RUN}:throughput-{kind}:starts"
        cleanup.keys += [queue, key]
        if kind == "taskbridge":
            task = started.using(queue=queue)
            for start in range(0, n, 500):
                calls = [bridge.prepare(task, (key,), {}) for _ in range(min(500, n - start))]
                cleanup.ids.extend(call.id for _, call in calls)
                await bridge.dispatch(calls)
        else:
            for _ in range(n):
                await _enqueue_native(native_redis, queue, key, cleanup)
        if kind == "taskbridge":
            process = _spawn_taskbridge_worker(queue)
        else:
            process = _spawn_native_worker(queue, 0.005 if "poll_delay" in kind else 0.5)
        try:
            deadline = time.monotonic() + 120
            while await client.llen(key) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind}: only {await client.llen(key)} of {n} jobs ran")
                await asyncio.sleep(0.05)
        finally:
            process.terminate()
            process.wait(20)
        starts = [float(v) for v in await client.lrange(key, 0, -1)]
        span = max(starts) - min(starts)
        print(f"  {kind:<26} {n / span:8.0f} jobs/s  ({n} jobs in {span:.2f} s)")
    await native_redis.aclose()
    await bridge.close()


async def main(what: str, n: int) -> None:
    cleanup = Cleanup()
    try:
        if what in ("dispatch", "all"):
            await bench_dispatch(n, cleanup)
        if what in ("latency", "all"):
            await bench_latency(min(n, 500), cleanup)
        if what in ("throughput", "all"):
            await bench_throughput(max(n, 2000), cleanup)
    finally:
        await cleanup.run()
        for client in _clients:
            await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "what", choices=["all", "dispatch", "latency", "throughput", "native-worker"]
    )
    parser.add_argument("queue_or_n", nargs="?", default="1000")
    parser.add_argument("poll_delay", nargs="?", type=float, default=0.5)
    arguments = parser.parse_args()
    if arguments.what == "native-worker":
        _native_worker(arguments.queue_or_n, arguments.poll_delay)
    else:
        asyncio.run(main(arguments.what, int(arguments.queue_or_n)))
