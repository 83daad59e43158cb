"""The native FastAPI app: BackgroundTasks, Celery's delay()/send_task(), ARQ's enqueue_job.

Served by uvicorn (one process). BENCH_ENGINES picks which engines are set up; with none, only
FastAPI and Starlette are loaded (the in-process comparison and its memory figure).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI

from . import tasks
from .config import Config

CONFIG = Config.from_env()
state: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if CONFIG.has("arq"):
        from arq import create_pool
        from arq.connections import RedisSettings

        assert CONFIG.redis_url is not None
        state["arq"] = await create_pool(RedisSettings.from_dsn(CONFIG.redis_url))
    yield
    if "arq" in state:
        await state.pop("arq").aclose()


app = FastAPI(lifespan=lifespan)


@app.post("/noop/{n}")
async def noop(n: int) -> None:
    """No task: the server's own ceiling."""


@app.post("/inproc/none/{n}")
async def inproc_none(n: int, background_tasks: BackgroundTasks) -> None:
    """Takes `BackgroundTasks`, adds nothing: what a `Tasks` endpoint with no task compares to."""


async def _background(background_tasks: BackgroundTasks) -> BackgroundTasks:
    return background_tasks


Background = Annotated[BackgroundTasks, Depends(_background)]
"""`BackgroundTasks` through the smallest dependency there is: FastAPI's cost of injecting any
per-request object of one's own (what `Tasks` is), with nothing of taskbridge's."""


@app.post("/dep/none/{n}")
async def dep_none(n: int, background_tasks: Background) -> None:
    """`BackgroundTasks` through a one-line dependency, no task."""


@app.post("/dep/async/{n}")
async def dep_async(n: int, background_tasks: Background) -> None:
    background_tasks.add_task(tasks.async_noop, n)


@app.post("/inproc/sync/{n}")
async def inproc_sync(n: int, background_tasks: BackgroundTasks) -> None:
    background_tasks.add_task(tasks.sync_noop, n)


@app.post("/inproc/async/{n}")
async def inproc_async(n: int, background_tasks: BackgroundTasks) -> None:
    background_tasks.add_task(tasks.async_noop, n)


@app.post("/light/{n}")
async def light(n: int) -> dict[str, int]:
    return {"n": n}


if CONFIG.has("celery-redis"):
    from .native_celery import redis_app

    celery_redis = redis_app()
    redis_noop = celery_redis.tasks["bench.celery_noop"]
    redis_queue = CONFIG.queue("celery-native")

    @app.post("/celery/delay/{k}/{n}")
    async def celery_delay(k: int, n: int) -> None:
        for _ in range(k):
            redis_noop.delay(n)

    @app.post("/celery/send/{k}/{n}")
    async def celery_send(k: int, n: int) -> None:
        for _ in range(k):
            celery_redis.send_task("bench.celery_noop", (n,))


if CONFIG.has("celery-amqp"):
    from .native_celery import amqp_app

    amqp_plain = amqp_app("amqp-native")
    amqp_confirm = amqp_app("amqp-nativeconfirm", confirm_publish=True)
    amqp_plain_noop = amqp_plain.tasks["bench.celery_noop"]
    amqp_confirm_noop = amqp_confirm.tasks["bench.celery_noop"]

    @app.post("/amqp/delay/{k}/{n}")
    async def amqp_delay(k: int, n: int) -> None:
        for _ in range(k):
            amqp_plain_noop.delay(n)

    @app.post("/amqp/confirm/{k}/{n}")
    async def amqp_delay_confirmed(k: int, n: int) -> None:
        for _ in range(k):
            amqp_confirm_noop.delay(n)


if CONFIG.has("arq"):
    arq_queue = CONFIG.arq_queue("arq-native")

    @app.post("/arq/{k}/{n}")
    async def arq_enqueue(k: int, n: int) -> None:
        pool = state["arq"]
        if k == 1:
            await pool.enqueue_job("bench.arq_noop", n, _queue_name=arq_queue)
            return
        # Several jobs: what a careful user writes, the round trips awaited concurrently.
        await asyncio.gather(
            *(pool.enqueue_job("bench.arq_noop", n, _queue_name=arq_queue) for _ in range(k))
        )
