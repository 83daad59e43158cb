"""The native Celery side: hand-written Celery apps with the same task names and bodies.

`python -m celery -A bench.native_celery:worker_app worker -P prefork -c 2 -Q <queue>` runs the
native worker. BENCH_CELERY_DELIVERY=taskbridge gives it taskbridge's delivery defaults
(acks_late, prefetch 1, reject on worker lost, track started) instead of Celery's.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery  # type: ignore[import-untyped]

from . import tasks
from .config import Config

CONFIG = Config.from_env()

TASKBRIDGE_DELIVERY = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "task_track_started": True,
}


def celery_started(key: str) -> None:
    """Record the start time."""
    assert CONFIG.redis_url is not None
    tasks.record_sync(CONFIG.redis_url, key)


def heavy(ms: float) -> None:
    tasks.burn(ms)


def make_app(
    broker_url: str,
    queue: str,
    *,
    prefix: str | None = None,
    confirm_publish: bool | None = None,
    delivery: str = "celery",
) -> Celery:
    """A plain Celery app: Celery's defaults except the broker, the queue and (if asked) the
    key prefix, publisher confirms, or taskbridge's delivery settings."""
    app = Celery("bench_native", set_as_current=False)
    conf: dict[str, Any] = {"broker_url": broker_url, "task_default_queue": queue}
    transport: dict[str, Any] = {}
    if prefix is not None:
        transport["global_keyprefix"] = prefix
    if confirm_publish is not None:
        transport["confirm_publish"] = confirm_publish
    if transport:
        conf["broker_transport_options"] = transport
    if delivery == "taskbridge":
        conf.update(TASKBRIDGE_DELIVERY)
    app.conf.update(conf)
    app.task(name="bench.celery_noop")(tasks.sync_noop)
    app.task(name="bench.celery_started")(celery_started)
    app.task(name="bench.heavy")(heavy)
    return app


def redis_app(queue_kind: str = "celery-native", prefix: str | None = None, **kw: Any) -> Celery:
    assert CONFIG.redis_url is not None
    return make_app(
        CONFIG.redis_url, CONFIG.queue(queue_kind), prefix=prefix or CONFIG.prefix, **kw
    )


def amqp_app(queue_kind: str, **kw: Any) -> Celery:
    assert CONFIG.amqp_url is not None
    return make_app(CONFIG.amqp_url, CONFIG.queue(queue_kind), **kw)


# What `celery -A bench.native_celery:worker_app worker` runs (Redis broker).
worker_app = (
    redis_app(delivery=os.environ.get("BENCH_CELERY_DELIVERY", "celery"))
    if CONFIG.redis_url
    else None
)
