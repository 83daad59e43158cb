"""What a Celery worker accepts: every message is checked before Celery's strategy runs it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from taskbridge import MessageError, TaskBridgeError
from taskbridge.backends import Envelope, Receiver

from ._headers import engine_fields_of
from ._protocol import ENQUEUED_HEADER, POLICY_HEADER, SIGNATURE_HEADER, TRACE_HEADER

if TYPE_CHECKING:
    from celery import Celery  # type: ignore[import-untyped]

__all__ = ["envelope", "guarded_strategy"]

logger = logging.getLogger("taskbridge.celery")


def envelope(headers: Mapping[str, Any], payload: Any) -> Envelope:
    """The core envelope of a Celery message (protocol v2 headers, `[args, kwargs, embed]`).

    MessageError when the body is not Celery's triple or a header Celery's worker reads is
    malformed (checked here, before Celery's strategy builds a Request from it).
    """
    if not (isinstance(payload, list | tuple) and len(payload) == 3):
        raise MessageError("its body is not Celery's [args, kwargs, embed]")
    args, kwargs, embed = payload
    if embed is not None and not isinstance(embed, dict):
        raise MessageError("its embedded options are not a map")
    return Envelope(
        id=headers.get("id"),
        task=headers.get("task"),
        args=args,
        kwargs=kwargs,
        policy=headers.get(POLICY_HEADER),
        engine=engine_fields_of(headers),
        signature=headers.get(SIGNATURE_HEADER),
        trace=headers.get(TRACE_HEADER),
    )


def _problem(receiver: Receiver, message: Any) -> str | None:
    """Why a message cannot run (None if it can): checked before Celery accepts it."""
    try:
        payload = message.payload  # decoded once, JSON only; the default strategy reuses it
    except Exception as exc:
        return f"its body cannot be decoded ({type(exc).__name__}: {exc})"
    headers = message.headers
    if not isinstance(headers, Mapping):
        return "its headers are not a map"
    try:
        receiver.receive(envelope(headers, payload))
    except TaskBridgeError as exc:
        return str(exc)
    return None


def guarded_strategy(celery_task: Any, app: Celery, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default strategy, behind the core's check of the message (`Receiver`).

    A malformed message (undecodable body, wrong shape, bad headers, arguments that do not fit,
    an invalid policy, a missing or wrong signature when the bridge has a `signing_key`) would
    otherwise reach Celery's Request or the pool, where it can stop the whole worker and be
    delivered again forever. Here it is logged, marked failed (when it has an id), and acked.
    """
    from celery.worker.strategy import default  # type: ignore[import-untyped]

    handle = default(celery_task, app, consumer, **kwargs)
    receiver: Receiver = celery_task.taskbridge_receiver
    name = celery_task.name

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any) -> Any:
        problem = _problem(receiver, message)
        if problem is None:
            return handle(message, body, ack, reject, callbacks)
        headers = message.headers if isinstance(message.headers, Mapping) else {}
        task_id = headers.get("id")
        logger.error(
            "rejected a message for task %s [%s]: %s; it is marked failed and dropped",
            name,
            task_id,
            problem,
        )
        message.reject_log_error(logger, consumer.connection_errors)
        if isinstance(task_id, str) and task_id:
            error = MessageError(f"message for task {name!r} rejected: {problem}")
            properties = message.properties if isinstance(message.properties, Mapping) else {}
            request = {
                "name": name,
                "task": name,
                "retries": headers.get("retries"),
                ENQUEUED_HEADER: headers.get(ENQUEUED_HEADER),
                "chord": None,
                "root_id": headers.get("root_id"),
                "correlation_id": properties.get("correlation_id"),
                "reply_to": properties.get("reply_to"),
                "errbacks": None,
            }
            try:
                app.backend.mark_as_failure(task_id, error, request=_Request(request))
            except Exception as exc:  # the result backend is down: the log line stays
                logger.warning("could not record %s as failed: %s", task_id, exc)
        return None

    return on_message


class _Request(dict[str, Any]):
    """The attribute-style request `mark_as_failure` reads (Celery passes a Bunch)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None
