"""The FastAPI app `dispatch.py --http` serves with uvicorn: Tasks endpoints and delay() ones.

Configured by BENCH_BROKER_URL, BENCH_QUEUE and BENCH_PREFIX (Redis key prefix).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from fastapi import FastAPI
from taskbridge_celery._options import celery_config

from taskbridge import TaskBridge, Tasks

url, queue = os.environ["BENCH_BROKER_URL"], os.environ["BENCH_QUEUE"]
options: dict[str, Any] = {"broker_url": url, "default_queue": queue}
if url.startswith("redis"):
    options["key_prefix"] = os.environ["BENCH_PREFIX"]
bridge = TaskBridge({"backends": {"celery": options}})


@bridge.task(name="bench.task", backend="celery")
def task(n: int, label: str) -> None:
    """Never runs: the benchmark only dispatches."""


celery_app = Celery("bench", set_as_current=False)
celery_app.conf.update(celery_config(bridge.backend("celery").options))  # type: ignore[arg-type]


@celery_app.task(name="bench.task")  # type: ignore[untyped-decorator]
def celery_task(n: int, label: str) -> None:
    """Never runs."""


app = FastAPI(lifespan=bridge.lifespan)


@app.post("/tb1/{n}")
async def tb1(n: int, tasks: Tasks) -> None:
    tasks.add_task(task, n, "x")


@app.post("/tb5/{n}")
async def tb5(n: int, tasks: Tasks) -> None:
    for _ in range(5):
        tasks.add_task(task, n, "x")


@app.post("/celery1/{n}")
async def celery1(n: int) -> None:
    celery_task.delay(n, "x")


@app.post("/celery5/{n}")
async def celery5(n: int) -> None:
    for _ in range(5):
        celery_task.delay(n, "x")


@app.post("/none/{n}")
async def none(n: int) -> None:
    """No task at all: the server's own ceiling."""


@app.post("/tbnone/{n}")
async def tbnone(n: int, tasks: Tasks) -> None:
    """The Tasks dependency, no call."""
