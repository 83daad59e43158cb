"""The options of a Celery backend alias, and the Celery configuration they make."""

from __future__ import annotations

import difflib
import json
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator

from taskbridge.backends import BackendOptions

__all__ = ["JSON_ONLY", "CeleryOptions", "celery_config", "redis_transport"]

BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps")
RESULT_SCHEMES = ("redis", "rediss")
REDIS_SCHEMES = ("redis", "rediss")

JSON_ONLY: dict[str, Any] = {
    "task_serializer": "json",
    "accept_content": ["json"],
    "result_serializer": "json",
    "result_accept_content": ["json"],
    "event_serializer": "json",
}
"""Never pickle: every message and result is JSON, so Flower and `celery inspect` can read them."""

DELIVERY_DEFAULTS: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "task_track_started": True,
    "task_create_missing_queues": True,
    "broker_connection_retry_on_startup": True,
    "enable_utc": True,
    "timezone": "UTC",
}
"""At-least-once delivery: a message is acknowledged after its task ran, one at a time."""

# Set through the alias's own options, not through the `celery` passthrough.
_OWN = {
    "broker_url": "broker_url",
    "result_backend": "result_backend",
    "task_default_queue": "default_queue",
    "task_default_exchange": "default_queue",
    "task_default_routing_key": "default_queue",
}


def _scheme(url: str) -> str:
    return urlsplit(url).scheme.lower()


class CeleryOptions(BackendOptions):
    """Options of a `celery` backend alias (`TASKBRIDGE_BACKENDS__<ALIAS>__<OPTION>`)."""

    broker_url: str
    """Broker URL: redis://, rediss://, amqp:// or amqps://."""
    result_backend: str | None = None
    """Redis URL where results and failures are stored (JSON); None stores nothing."""
    default_queue: str = Field(default="taskbridge", min_length=1)
    """Queue of calls whose policy names none (Celery's `task_default_queue`)."""
    key_prefix: str | None = Field(default=None, min_length=1)
    """Prefix of every Redis key of the broker and the result backend (kombu's
    `global_keyprefix`), to share a Redis database between applications."""
    visibility_timeout: float | None = Field(default=None, gt=0)
    """Redis broker only: seconds before an unacknowledged message is delivered again
    (kombu's default is 3600). Must exceed the longest task and the longest delay."""
    track_queued: bool = True
    """Redis broker with a result backend: write a `queued` marker with each call, in the same
    round trip as the push, so that status says "queued" (not unknown) before a worker starts
    it. False: the plain LPUSH, and calls not yet started read as unknown."""
    cancel_wait: float = Field(default=5.0, ge=0)
    """Seconds `cancel` waits for a worker to stop a running call before answering."""
    celery: dict[str, Any] = Field(default_factory=dict)
    """Any other Celery setting by its lowercase name: `{"worker_max_tasks_per_child": 100}`."""

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        scheme = _scheme(value)
        if scheme not in BROKER_SCHEMES:
            raise ValueError(
                f"the scheme {scheme + '://' if scheme else '(none)'} is not supported; "
                f"use one of {', '.join(s + '://' for s in BROKER_SCHEMES)}"
            )
        return value

    @field_validator("result_backend")
    @classmethod
    def _result_scheme(cls, value: str | None) -> str | None:
        if value is not None and _scheme(value) not in RESULT_SCHEMES:
            raise ValueError(
                f"the scheme {_scheme(value) + '://' if _scheme(value) else '(none)'} is not "
                "supported; use a redis:// or rediss:// URL, or leave it unset to store no results"
            )
        return value

    @field_validator("key_prefix")
    @classmethod
    def _prefix_needs_redis(cls, value: str | None, info: ValidationInfo) -> str | None:
        broker, results = info.data.get("broker_url"), info.data.get("result_backend")
        if value is not None and broker is not None:
            uses_redis = _scheme(broker) in REDIS_SCHEMES or (
                results is not None and _scheme(results) in REDIS_SCHEMES
            )
            if not uses_redis:
                raise ValueError("key_prefix applies to Redis keys, and this alias uses no Redis")
        return value

    @field_validator("visibility_timeout")
    @classmethod
    def _visibility_needs_redis(cls, value: float | None, info: ValidationInfo) -> float | None:
        broker = info.data.get("broker_url")
        if value is not None and broker is not None and _scheme(broker) not in REDIS_SCHEMES:
            raise ValueError("visibility_timeout applies to a Redis broker only")
        return value

    @field_validator("celery")
    @classmethod
    def _known_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        from celery.app.defaults import NAMESPACES, flatten  # type: ignore[import-untyped]

        options = dict(flatten(NAMESPACES))
        checked: dict[str, Any] = {}
        for key, item in value.items():
            name = key.lower()
            if name in _OWN:
                raise ValueError(f"{key!r} is set by this alias's own option {_OWN[name]!r}")
            if name in JSON_ONLY and item != JSON_ONLY[name]:
                raise ValueError(
                    f"{key!r} must stay {JSON_ONLY[name]!r}: taskbridge sends JSON only, never "
                    "pickle"
                )
            option = options.get(name)
            if option is None:
                close = difflib.get_close_matches(name, options, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{key!r} is not a Celery setting{hint}")
            checked[name] = _coerce(item, option.type)
        return checked


def _coerce(value: Any, kind: str) -> Any:
    """Settings from the environment arrive as strings: give them the setting's type."""
    if not isinstance(value, str) or kind in ("string", "any"):
        return value
    if kind == "bool":
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{value!r} is not a boolean")
    if kind in ("int", "float"):
        return int(value) if kind == "int" else float(value)
    try:
        return json.loads(value)  # list, tuple, dict: JSON text from an environment variable
    except ValueError:
        raise ValueError(f"{value!r} is not JSON (expected a {kind})") from None


def redis_transport(options: CeleryOptions) -> bool:
    """Whether the broker is Redis (so calls are sent with the Redis fast path)."""
    return _scheme(options.broker_url) in REDIS_SCHEMES


def celery_config(options: CeleryOptions) -> dict[str, Any]:
    """The Celery configuration of an alias: the same for the API side and the worker."""
    config: dict[str, Any] = {
        **DELIVERY_DEFAULTS,
        **options.celery,
        **JSON_ONLY,
        "broker_url": options.broker_url,
        "result_backend": options.result_backend,
        "task_default_queue": options.default_queue,
        "task_default_exchange": options.default_queue,
        "task_default_routing_key": options.default_queue,
    }
    transport = dict(options.celery.get("broker_transport_options") or {})
    if options.key_prefix is not None and redis_transport(options):
        transport["global_keyprefix"] = options.key_prefix
    if options.visibility_timeout is not None:
        transport["visibility_timeout"] = options.visibility_timeout
    config["broker_transport_options"] = transport
    results = dict(options.celery.get("result_backend_transport_options") or {})
    if options.key_prefix is not None and options.result_backend is not None:
        results["global_keyprefix"] = options.key_prefix
    config["result_backend_transport_options"] = results
    return config
