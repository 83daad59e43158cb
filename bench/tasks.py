"""The task bodies both sides run: no-ops, a start-time recorder, and a CPU-heavy one."""

from __future__ import annotations

import time
from typing import Any

_sync_clients: dict[str, Any] = {}
_async_clients: dict[tuple[str, int], Any] = {}


def sync_noop(n: int) -> None:
    """Nothing: the cost measured is the machinery's."""


async def async_noop(n: int) -> None:
    """Nothing, as a coroutine."""


def record_sync(redis_url: str, key: str) -> None:
    """RPUSH the current time (epoch seconds, read first) onto `key`."""
    now = time.time()
    client = _sync_clients.get(redis_url)
    if client is None:
        import redis

        client = _sync_clients[redis_url] = redis.Redis.from_url(redis_url)
    client.rpush(key, repr(now))


async def record_async(redis_url: str, key: str) -> None:
    """RPUSH the current time (read first) onto `key`, from the running event loop."""
    now = time.time()
    import asyncio

    loop_id = id(asyncio.get_running_loop())
    client = _async_clients.get((redis_url, loop_id))
    if client is None:
        import redis.asyncio

        client = _async_clients[(redis_url, loop_id)] = redis.asyncio.Redis.from_url(redis_url)
    await client.rpush(key, repr(now))


def burn(ms: float) -> int:
    """Hold the CPU (and the GIL) for about `ms` milliseconds of pure-Python work."""
    end = time.perf_counter() + ms / 1000
    total = 0
    while time.perf_counter() < end:
        total += sum(range(200))
    return total
