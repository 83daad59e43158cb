"""ARQ's own tools pointed at a taskbridge ARQ alias: `arq --check` and the plain `arq` worker.

    # myapp/arq_settings.py
    from taskbridge_arq import worker_settings

    WorkerSettings = worker_settings("myapp:bridge")

    $ arq --check myapp.arq_settings.WorkerSettings   # exit 0 while a worker is healthy
    $ arq myapp.arq_settings.WorkerSettings           # ARQ's own worker, taskbridge's tasks

The class holds what ARQ's CLI reads (`redis_settings`, `queue_name`, `health_check_key`, ...)
built from the alias's settings, including a Sentinel URL, and the bridge's tasks as ARQ
functions with the JSON serializer. ARQ's own worker runs them with everything taskbridge's
runner does (policy, retries, timeout, signatures); `taskbridge worker arq` adds the wake-ups,
the one-script claims, progress, and reconnection after faults.
"""

from __future__ import annotations

from typing import Any

from arq.connections import RedisSettings

from taskbridge import ConfigurationError, TaskBridge

from ._jobs import UNLIMITED_TRIES, job_functions
from ._options import ArqOptions, sentinel_address
from ._serializer import deserialize_for_worker, serialize
from ._wakeups import WakeUps

__all__ = ["redis_settings", "worker_settings"]


def redis_settings(options: ArqOptions) -> RedisSettings:
    """ARQ's RedisSettings for an alias's options (`redis://`, `rediss://`, `unix://`, or a
    `sentinel://` list, as `RedisSettings(host=[...], sentinel=True)`)."""
    address = sentinel_address(options.redis_url)
    if address is None:
        settings = RedisSettings.from_dsn(options.redis_url)
    else:
        settings = RedisSettings(
            host=address.sentinels,
            database=address.db,
            username=address.username,
            password=address.password,
            ssl=address.ssl,
            sentinel=True,
            sentinel_master=options.sentinel_master,
        )
    settings.conn_timeout = options.conn_timeout  # type: ignore[assignment]
    settings.conn_retries = options.conn_retries
    settings.conn_retry_delay = options.conn_retry_delay  # type: ignore[assignment]
    return settings


def worker_settings(
    target: str | TaskBridge, alias: str = "arq", *, queue: str | None = None
) -> type:
    """A `WorkerSettings` class for ARQ's CLI, for `alias` of the bridge at `target`
    (`module:attribute` of the bridge or the app, or the bridge itself)."""
    if isinstance(target, str):
        from taskbridge.cli import load_bridge

        bridge = load_bridge(target)
    else:
        bridge = target
    bridge.validate()
    backend = bridge.backend(alias)
    options = getattr(backend, "options", None)
    if not isinstance(options, ArqOptions):
        raise ConfigurationError(f"backend {alias!r} is not an ARQ backend")
    values: dict[str, Any] = {
        "__doc__": f"ARQ worker settings of taskbridge's ARQ alias {alias!r}.",
        "redis_settings": redis_settings(options),
        "queue_name": queue or options.queue_name,
        "functions": job_functions(bridge, alias, options, WakeUps()),
        "job_serializer": serialize,
        "job_deserializer": deserialize_for_worker,
        "max_jobs": options.max_jobs,
        "job_timeout": options.job_timeout,
        "keep_result": options.keep_result,
        "keep_result_forever": options.keep_result_forever,
        "max_tries": UNLIMITED_TRIES,
        "poll_delay": options.poll_delay,
        "queue_read_limit": options.queue_read_limit,
        "health_check_interval": options.health_check_interval,
        "allow_abort_jobs": True,
        "expires_extra_ms": options.expires_extra_ms,
        "job_completion_wait": options.job_completion_wait,
    }
    if options.health_check_key is not None:
        values["health_check_key"] = options.health_check_key
    return type("WorkerSettings", (), values)
