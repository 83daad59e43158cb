"""The native ARQ side: plain ARQ functions and a WorkerSettings class (pickle, ARQ defaults).

`python -m bench.native_arq` runs `arq.run_worker(WorkerSettings)` with logging at WARNING
(ARQ's own CLI logs every job at INFO). BENCH_ARQ_POLL_DELAY sets `poll_delay` (default 0.5).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from arq import run_worker
from arq.connections import RedisSettings
from arq.worker import func

from .config import Config

CONFIG = Config.from_env()


async def arq_noop(ctx: dict[str, Any], n: int) -> None:
    """A queued no-op."""


async def arq_started(ctx: dict[str, Any], key: str) -> None:
    """Record the start time with the worker's own Redis pool."""
    now = time.time()
    await ctx["redis"].rpush(key, repr(now))


class WorkerSettings:
    functions = [  # noqa: RUF012 - ARQ reads class attributes
        func(arq_noop, name="bench.arq_noop"),
        func(arq_started, name="bench.arq_started"),
    ]
    queue_name = CONFIG.arq_queue("arqw-native")
    redis_settings = RedisSettings.from_dsn(CONFIG.redis_url) if CONFIG.redis_url else None
    poll_delay = float(os.environ.get("BENCH_ARQ_POLL_DELAY", "0.5"))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_worker(WorkerSettings)  # type: ignore[arg-type]
