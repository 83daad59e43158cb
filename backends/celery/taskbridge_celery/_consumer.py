"""The worker's Celery consumer: a malformed task message is dropped, never fatal.

Celery's consumer hands each task message to `on_task_received`, which looks the task up by its
`task` header and runs its strategy. A header Celery cannot read (a task name that is a list, no
id on a message for an unknown task, a `stamped_headers` that is not a list...) raises there,
on any broker, and the exception stops the worker ("Unrecoverable error"), leaving the message
unacknowledged to come back on the next start. `GuardedConsumer` checks the headers first
(`check_celery_headers`), and drops what still raises: each such message is logged, rejected
(acked away, not requeued) and marked failed in the result backend when it has an id.

Messages whose envelope kombu itself cannot read never get here: on a Redis broker the worker's
transport (`_transport.GuardedRedisTransport`) drops them, and records them failed through
`record_failure` below.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from celery.worker.consumer import Consumer  # type: ignore[import-untyped]

from taskbridge import MessageError

from ._headers import check_celery_headers
from ._options import redis_transport
from ._protocol import ENQUEUED_HEADER
from ._sentinel import is_sentinel

if TYPE_CHECKING:
    from collections.abc import Callable

    from celery import Celery  # type: ignore[import-untyped]

    from ._options import CeleryOptions

__all__ = ["GuardedConsumer", "record_failure", "worker_settings"]

logger = logging.getLogger("taskbridge.celery")

CONSUMER = f"{__name__}:GuardedConsumer"
REDIS_TRANSPORT = "taskbridge_celery._transport:GuardedRedisTransport"
SENTINEL_TRANSPORT = "taskbridge_celery._transport:GuardedSentinelTransport"


def worker_settings(options: CeleryOptions) -> dict[str, Any]:
    """The Celery settings that give a worker's app the guarded consumer and, on a Redis
    broker, the guarded transport (its Sentinel variant for a `sentinel://` broker). Settings
    the alias sets itself (`celery` passthrough) win.

    The transport is named by `broker_transport`, next to the broker URL, which kombu still
    parses for host, port, database, credentials and `ssl_*` query options. One difference
    remains: kombu turns TLS on for a `rediss://` URL without SSL options only when the
    transport is named `rediss`; the same default is set here (`broker_use_ssl`, certificates
    not verified, as kombu does, with its warning).
    """
    own = options.celery
    settings: dict[str, Any] = {}
    if "worker_consumer" not in own:
        settings["worker_consumer"] = CONSUMER
    if redis_transport(options) and "broker_transport" not in own:
        if is_sentinel(options.broker_url):
            # kombu reads the Sentinel list (`;`), database and credentials from the URL, and
            # `master_name` from the transport options, exactly as for its own `sentinel`.
            settings["broker_transport"] = SENTINEL_TRANSPORT
            return settings
        settings["broker_transport"] = REDIS_TRANSPORT
        url = urlsplit(options.broker_url)
        query = dict(parse_qsl(url.query))
        if (
            url.scheme.lower() == "rediss"
            and "broker_use_ssl" not in own
            and not any(key.startswith("ssl_") for key in query)
        ):
            logger.warning(
                "Secure redis scheme specified (rediss) with no ssl options, defaulting to "
                "insecure SSL behaviour."
            )
            settings["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_NONE}
    return settings


class _Request(dict[str, Any]):
    """The attribute-style request `mark_as_failure` reads (Celery passes a Bunch)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def record_failure(
    app: Celery,
    headers: object,
    properties: object,
    problem: str,
) -> None:
    """Mark the call a dropped message carried as failed (a MessageError naming `problem`), when
    its headers give it an id; a result backend that does not answer only costs a warning."""
    if not isinstance(headers, Mapping):
        return
    task_id = _text(headers.get("id"))
    if task_id is None:
        return
    name = _text(headers.get("task"))
    properties = properties if isinstance(properties, Mapping) else {}
    retries = headers.get("retries")
    request = _Request(
        name=name,
        task=name,
        retries=retries if isinstance(retries, int) and not isinstance(retries, bool) else 0,
        chord=None,
        root_id=_text(headers.get("root_id")),
        correlation_id=_text(properties.get("correlation_id")),
        reply_to=_text(properties.get("reply_to")),
        errbacks=None,
        **{ENQUEUED_HEADER: headers.get(ENQUEUED_HEADER)},
    )
    error = MessageError(f"message for task {name!r} [{task_id}] rejected: {problem}")
    try:
        app.backend.mark_as_failure(task_id, error, request=request)
    except Exception as exc:  # the result backend is down: the log line stays
        logger.warning("could not record %s as failed: %s", task_id, exc)


def describe(headers: object, queue: object) -> tuple[str, str, str]:
    """(task name, id, queue) of a message for a log line, '?' where unreadable."""
    if not isinstance(headers, Mapping):
        headers = {}
    return (
        _text(headers.get("task")) or "?",
        _text(headers.get("id")) or "?",
        _text(queue) or "?",
    )


RECONNECT_START = 0.1
"""Seconds before the worker's second attempt to reach a lost broker (kombu's default: 2)."""
RECONNECT_STEP = 0.4
"""Seconds added to each following pause (kombu's default: 2)."""
RECONNECT_MAX = 2.0
"""Longest pause between attempts (kombu's default: 30)."""


class GuardedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, dropping the task messages its handler cannot take (see the module)."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle = super().create_task_handler(*args, **kwargs)
        link_errors = tuple(self.connection_errors) + tuple(self.channel_errors)

        def on_task_received(message: Any) -> Any:
            problem = check_celery_headers(message.headers)
            if problem is not None:
                return self._drop(message, problem)
            try:
                return handle(message)
            except link_errors:
                raise  # the consumer reconnects
            except Exception as exc:  # Celery tripped over something not checked above
                problem = f"Celery could not take it ({type(exc).__name__}: {exc})"
                return self._drop(message, problem, exc_info=True)

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """Celery logs and acks a message kombu cannot decode (a bad `compression` header, a
        body refused by the accepted content types); its call is also marked failed."""
        super().on_decode_error(message, exc)
        record_failure(
            self.app,
            message.headers,
            message.properties,
            f"it cannot be decoded ({type(exc).__name__}: {exc})",
        )

    def _drop(self, message: Any, problem: str, exc_info: bool = False) -> None:
        delivery_info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
        name, task_id, queue = describe(message.headers, delivery_info.get("routing_key"))
        logger.error(
            "rejected a message for task %s [%s] from queue %s: %s; %s",
            name,
            task_id,
            queue,
            problem,
            "dropped (no id to mark failed)"
            if task_id == "?"
            else "it is marked failed and dropped",
            exc_info=exc_info,
        )
        if not message.acknowledged:
            message.reject_log_error(logger, self.connection_errors)
        record_failure(self.app, message.headers, message.properties, problem)

    def ensure_connected(self, conn: Any) -> Any:
        """Celery's reconnection, with kombu's pauses between attempts shortened from 2 s growing
        by 2 s up to 30 s (so up to 30 s lost after a long outage) to 0.1 s growing by 0.4 s up
        to 2 s: the worker is back within about 2 s of its broker, as the ARQ worker is."""
        ensure = conn.ensure_connection

        def sooner(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("interval_start", RECONNECT_START)
            kwargs.setdefault("interval_step", RECONNECT_STEP)
            kwargs.setdefault("interval_max", RECONNECT_MAX)
            return ensure(*args, **kwargs)

        conn.ensure_connection = sooner
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection

    def connect(self) -> Any:
        """Connect as Celery does; the guarded Redis transport of the connection records the
        calls of the envelopes it drops as failed through this consumer's app."""
        connection = super().connect()
        transport = connection.transport
        if hasattr(transport, "on_rejected"):
            app = self.app

            def on_rejected(headers: object, properties: object, problem: str) -> None:
                record_failure(app, headers, properties, problem)

            transport.on_rejected = on_rejected
        return connection
