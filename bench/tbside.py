"""The taskbridge side: one bridge with the benchmark's tasks, configured from BENCH_* variables.

Workers run it as `taskbridge worker celery bench.tbside:bridge` / `... arq bench.tbside:bridge`;
the API app (bench/api_tb.py) and the orchestrator use `build()`. Settings not given here
(notably `TASKBRIDGE_ROUTES`) come from the environment, as in any deployment.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from taskbridge import TaskBridge

from . import tasks
from .config import Config

CONFIG = Config.from_env()


def settings_for(config: Config) -> dict[str, Any]:
    backends: dict[str, dict[str, Any]] = {}
    if config.has("celery-redis"):
        backends["celery"] = {
            "broker_url": config.redis_url,
            "key_prefix": config.prefix,
            "default_queue": config.queue("celery-tb"),
        }
    if config.has("celery-amqp"):
        backends["amqp"] = {
            "engine": "celery",
            "broker_url": config.amqp_url,
            "default_queue": config.queue("amqp-tb"),
        }
        backends["amqpnc"] = {
            "engine": "celery",
            "broker_url": config.amqp_url,
            "default_queue": config.queue("amqp-tbnc"),
            "celery": {"broker_transport_options": {"confirm_publish": False}},
        }
    if config.has("arq"):
        backends["arq"] = {"redis_url": config.redis_url, "queue_name": config.arq_queue("arq-tb")}
    return {"backends": backends}


# Task bodies: the same functions the native side registers.


def celery_noop(n: int) -> None:
    """A queued no-op (Celery)."""


def celery_started(key: str) -> None:
    """Record the start time (Celery)."""
    assert CONFIG.redis_url is not None
    tasks.record_sync(CONFIG.redis_url, key)


async def arq_noop(n: int) -> None:
    """A queued no-op (ARQ)."""


async def arq_started(key: str) -> None:
    """Record the start time (ARQ)."""
    assert CONFIG.redis_url is not None
    await tasks.record_async(CONFIG.redis_url, key)


def heavy(ms: float) -> None:
    """CPU-bound work: in-process by default, routed to a queue by TASKBRIDGE_ROUTES."""
    tasks.burn(ms)


def build(config: Config) -> tuple[TaskBridge, SimpleNamespace]:
    """A bridge for `config`, and its tasks by short name."""
    bridge = TaskBridge(settings_for(config))
    t = SimpleNamespace()
    t.sync_noop = bridge.task(name="bench.sync_noop")(tasks.sync_noop)
    t.async_noop = bridge.task(name="bench.async_noop")(tasks.async_noop)
    t.heavy = bridge.task(name="bench.heavy")(heavy)
    celery_alias = "celery" if config.has("celery-redis") else "amqp"
    if config.has("celery-redis") or config.has("celery-amqp"):
        t.celery_noop = bridge.task(name="bench.celery_noop", backend=celery_alias)(celery_noop)
        t.celery_started = bridge.task(name="bench.celery_started", backend=celery_alias)(
            celery_started
        )
    if config.has("celery-amqp"):
        t.amqp_noop = t.celery_noop.using(backend="amqp")
        t.amqpnc_noop = t.celery_noop.using(backend="amqpnc")
    if config.has("arq"):
        t.arq_noop = bridge.task(name="bench.arq_noop", backend="arq")(arq_noop)
        t.arq_started = bridge.task(name="bench.arq_started", backend="arq")(arq_started)
    return bridge, t


bridge, T = build(CONFIG)
