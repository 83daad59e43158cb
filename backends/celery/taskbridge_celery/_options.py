"""The options of a Celery backend alias, and the Celery configuration they make."""

from __future__ import annotations

import difflib
import json
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator

from taskbridge.backends import BackendOptions

from ._sentinel import SENTINEL_SCHEME, is_sentinel, sentinel_address

__all__ = [
    "JSON_ONLY",
    "QUEUED_MARKERS",
    "CeleryOptions",
    "celery_config",
    "markers_with_results",
    "redis_transport",
]

BROKER_SCHEMES = ("redis", "rediss", SENTINEL_SCHEME, "amqp", "amqps")
RESULT_SCHEMES = ("redis", "rediss", SENTINEL_SCHEME)
REDIS_SCHEMES = ("redis", "rediss", SENTINEL_SCHEME)
"""Redis, directly or through Sentinel (kombu's `SentinelTransport`, Celery's
`SentinelBackend`)."""

_TRANSPORT_OPTIONS = {
    "broker_url": "broker_transport_options",
    "result_backend": "result_backend_transport_options",
}
"""Where kombu (broker) and Celery (result backend) read `master_name` and `sentinel_kwargs`."""

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

QUEUED_MARKERS = "taskbridge_queued_markers"
"""A setting of taskbridge's own in the Celery configuration, present when dispatch writes
`queued` markers: `{"prefix": the key prefix, "with_results": whether they live in the result
backend's Redis}`, so that the worker's claim deletes them (see `_keys`)."""

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
    """Broker URL: redis://, rediss://, amqp://, amqps://, or Redis Sentinel:
    `sentinel://[:password@]host:26379;sentinel://host2:26379/db` (with `sentinel_master`)."""
    result_backend: str | None = None
    """Redis URL where results and failures are stored (JSON), redis://, rediss:// or
    sentinel://...; None stores nothing."""
    default_queue: str = Field(default="taskbridge", min_length=1)
    """Queue of calls whose policy names none (Celery's `task_default_queue`)."""
    key_prefix: str | None = Field(default=None, min_length=1)
    """Prefix of every Redis key of the broker and the result backend (kombu's
    `global_keyprefix`), to share a Redis database between applications."""
    visibility_timeout: float | None = Field(default=None, gt=0)
    """Redis broker only: seconds before an unacknowledged message is delivered again
    (kombu's default is 3600). Must exceed the longest task and the longest delay."""
    track_queued: bool = True
    """With a result backend: write a `queued` marker with each call, so that status says
    "queued" (not unknown) before a worker starts it, and a call cancelled then keeps its
    arguments: a Redis broker's in the same round trip as the push, with RabbitMQ in the result
    backend's Redis while the message is published. False: calls not yet started read as
    unknown (and a Redis broker gets the plain LPUSH)."""
    cancel_wait: float = Field(default=5.0, ge=0)
    """Seconds `cancel` waits for a worker to stop a running call before answering."""
    index_max_entries: int = Field(default=100_000, ge=0)
    """With a result backend: most calls the call index keeps (`GET /tasks`, `/tasks/stats`,
    `/tasks/{id}/events`), the oldest dropped first; each is kept `result_expires` at most.
    0 keeps no index."""
    celery: dict[str, Any] = Field(default_factory=dict)
    """Any other Celery setting by its lowercase name: `{"worker_max_tasks_per_child": 100}`."""
    # After `celery`: their validators read the URLs and the transport options.
    sentinel_password: str | None = Field(default=None, min_length=1)
    """With a sentinel:// URL: the Sentinels' own password, if they require one (the URL's
    password is the master's); sets `sentinel_kwargs.password` of the transport options."""
    sentinel_master: str | None = Field(default=None, min_length=1, validate_default=True)
    """With a sentinel:// broker_url or result_backend: the name of the master the Sentinels
    monitor; sets kombu's and Celery's `master_name` transport option of each sentinel:// URL
    (`broker_transport_options`, `result_backend_transport_options`)."""

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        scheme = _scheme(value)
        if scheme not in BROKER_SCHEMES:
            raise ValueError(
                f"the scheme {scheme + '://' if scheme else '(none)'} is not supported; "
                f"use one of {', '.join(s + '://' for s in BROKER_SCHEMES)}"
            )
        sentinel_address(value)  # a Sentinel list kombu would read differently is refused
        return value

    @field_validator("result_backend")
    @classmethod
    def _result_scheme(cls, value: str | None) -> str | None:
        if value is not None and _scheme(value) not in RESULT_SCHEMES:
            raise ValueError(
                f"the scheme {_scheme(value) + '://' if _scheme(value) else '(none)'} is not "
                "supported; use a redis://, rediss:// or sentinel:// URL, or leave it unset to "
                "store no results"
            )
        if value is not None:
            sentinel_address(value)
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
    def _known_settings(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
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
            _check_sentinel_tls(name, info)
            option = options.get(name)
            if option is None:
                close = difflib.get_close_matches(name, options, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{key!r} is not a Celery setting{hint}")
            checked[name] = _coerce(item, option.type)
        return checked

    @field_validator("sentinel_password")
    @classmethod
    def _password_needs_sentinel(cls, value: str | None, info: ValidationInfo) -> str | None:
        urls = _sentinel_urls(info)
        if value is not None and urls is not None and not urls:
            raise ValueError(
                "sentinel_password applies to sentinel:// URLs, and neither broker_url nor "
                "result_backend is one"
            )
        return value

    @field_validator("sentinel_master")
    @classmethod
    def _master_for_sentinel(cls, value: str | None, info: ValidationInfo) -> str | None:
        urls = _sentinel_urls(info)
        if urls is None:  # a URL was refused already
            return value
        if value is not None and not urls:
            raise ValueError(
                "sentinel_master applies to sentinel:// URLs, and neither broker_url nor "
                "result_backend is one"
            )
        celery = info.data.get("celery") or {}
        for field in urls:
            setting = _TRANSPORT_OPTIONS[field]
            transport = celery.get(setting)
            native = transport.get("master_name") if isinstance(transport, dict) else None
            if value is None and not native:
                raise ValueError(
                    f"{field} is a sentinel:// URL, so the name of the master its Sentinels "
                    "monitor is needed: set this option (sentinel_master) to it, as in the "
                    f"Sentinels' `sentinel monitor <name> ...` (or Celery's own "
                    f"celery.{setting}.master_name)"
                )
            if value is not None and native and native != value:
                raise ValueError(
                    f"sentinel_master is {value!r} but celery.{setting}.master_name is "
                    f"{native!r}; set only one of them"
                )
        return value


def _sentinel_urls(info: ValidationInfo) -> list[str] | None:
    """The options among broker_url and result_backend that are sentinel:// URLs; None when
    one of them was refused (its own error says why)."""
    if any(field not in info.data for field in _TRANSPORT_OPTIONS):
        return None
    return [field for field in _TRANSPORT_OPTIONS if is_sentinel(info.data[field])]


_TLS_SETTINGS = {"broker_use_ssl": "broker_url", "redis_backend_use_ssl": "result_backend"}


def _check_sentinel_tls(name: str, info: ValidationInfo) -> None:
    field = _TLS_SETTINGS.get(name)
    if field is not None and is_sentinel(info.data.get(field)):
        raise ValueError(
            f"{name!r} with a sentinel:// {field} (TLS to a Sentinel-managed Redis) is not "
            "supported: taskbridge's API side would still connect to the master without TLS"
        )


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
    """Whether the broker is Redis, directly or through Sentinel (so calls are sent with the
    Redis fast path, and the worker uses the guarded Redis transport)."""
    return _scheme(options.broker_url) in REDIS_SCHEMES


def _sentinel_options(options: CeleryOptions, transport: dict[str, Any]) -> None:
    """Fill `master_name` and the Sentinels' password of a sentinel:// URL's transport options."""
    if options.sentinel_master is not None:
        transport["master_name"] = options.sentinel_master
    if options.sentinel_password is not None:
        transport["sentinel_kwargs"] = {
            **(transport.get("sentinel_kwargs") or {}),
            "password": options.sentinel_password,
        }


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
    if is_sentinel(options.broker_url):
        _sentinel_options(options, transport)
    config["broker_transport_options"] = transport
    results = dict(options.celery.get("result_backend_transport_options") or {})
    if options.key_prefix is not None and options.result_backend is not None:
        results["global_keyprefix"] = options.key_prefix
    if is_sentinel(options.result_backend):
        _sentinel_options(options, results)
    config["result_backend_transport_options"] = results
    if options.result_backend is not None and options.track_queued:
        # (with RabbitMQ, the markers are written to the result backend's Redis)
        with_results = not redis_transport(options) or markers_with_results(
            options, transport, results
        )
        config[QUEUED_MARKERS] = {"prefix": options.key_prefix or "", "with_results": with_results}
    return config


def markers_with_results(
    options: CeleryOptions, broker_options: dict[str, Any], result_options: dict[str, Any]
) -> bool:
    """Whether the broker's Redis (where `queued` markers live) is the result backend's: the
    same URL (and, for Sentinel, the same master)."""
    if options.broker_url != options.result_backend:
        return False
    return not is_sentinel(options.broker_url) or (
        broker_options.get("master_name") == result_options.get("master_name")
    )
