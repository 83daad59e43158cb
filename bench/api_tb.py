"""The taskbridge FastAPI app: the same endpoints as api_native.py, through `Tasks`."""

from __future__ import annotations

from fastapi import FastAPI

from taskbridge import Tasks

from .tbside import CONFIG, T, bridge

app = FastAPI(lifespan=bridge.lifespan)


@app.post("/noop/{n}")
async def noop(n: int, tasks: Tasks) -> None:
    """The Tasks dependency, no call."""


@app.post("/inproc/none/{n}")
async def inproc_none(n: int, tasks: Tasks) -> None:
    """Takes `Tasks`, adds nothing (the same as /noop, named as its native counterpart)."""


@app.post("/inproc/sync/{n}")
async def inproc_sync(n: int, tasks: Tasks) -> None:
    tasks.add_task(T.sync_noop, n)


@app.post("/inproc/async/{n}")
async def inproc_async(n: int, tasks: Tasks) -> None:
    tasks.add_task(T.async_noop, n)


@app.post("/light/{n}")
async def light(n: int) -> dict[str, int]:
    return {"n": n}


@app.post("/heavy/{ms}/{n}")
async def heavy(ms: int, n: int, tasks: Tasks) -> None:
    tasks.add_task(T.heavy, ms)


if CONFIG.has("celery-redis"):

    @app.post("/celery/{k}/{n}")
    async def celery(k: int, n: int, tasks: Tasks) -> None:
        for _ in range(k):
            tasks.add_task(T.celery_noop, n)


if CONFIG.has("celery-amqp"):

    @app.post("/amqp/{k}/{n}")
    async def amqp(k: int, n: int, tasks: Tasks) -> None:
        for _ in range(k):
            tasks.add_task(T.amqp_noop, n)

    @app.post("/amqpnc/{k}/{n}")
    async def amqp_unconfirmed(k: int, n: int, tasks: Tasks) -> None:
        for _ in range(k):
            tasks.add_task(T.amqpnc_noop, n)


if CONFIG.has("arq"):

    @app.post("/arq/{k}/{n}")
    async def arq(k: int, n: int, tasks: Tasks) -> None:
        for _ in range(k):
            tasks.add_task(T.arq_noop, n)
