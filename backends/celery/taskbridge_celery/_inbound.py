"""What a Celery worker accepts: every message is checked before Celery's strategy runs it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from taskbridge import MessageError, TaskBridgeError
from taskbridge.backends import Policy, Task, with_execution_fields

from ._protocol import ENQUEUED_HEADER, POLICY_HEADER, SIGNATURE_HEADER

if TYPE_CHECKING:
    from celery import Celery  # type: ignore[import-untyped]

__all__ = ["guarded_strategy", "policy_for"]

logger = logging.getLogger("taskbridge.celery")


def policy_for(base: Policy, carried: object) -> Policy:
    """`base` updated with the execution fields a message's policy header carried."""
    if carried is None:
        return base
    if not isinstance(carried, Mapping):
        raise MessageError(f"its {POLICY_HEADER} header is not a map: {carried!r}")
    return with_execution_fields(base, carried)


def _problem(task: Task[..., Any], message: Any) -> str | None:
    """Why a message for `task` cannot run (None if it can): checked before it is accepted."""
    try:
        payload = message.payload  # decoded once, JSON only; the default strategy reuses it
    except Exception as exc:
        return f"its body cannot be decoded ({type(exc).__name__}: {exc})"
    if not (isinstance(payload, list | tuple) and len(payload) == 3):
        return "its body is not Celery's [args, kwargs, embed]"
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return "its args are not a list or its kwargs not a map"
    if embed is not None and not isinstance(embed, dict):
        return "its embedded options are not a map"
    try:
        task.signature.bind(*args, **kwargs)
    except TypeError as exc:
        return f"its arguments do not fit the task: {exc}"
    try:
        policy_for(Policy(), message.headers.get(POLICY_HEADER))
        signer = task.bridge.signer
        if signer is not None:
            signature = message.headers.get(SIGNATURE_HEADER)
            signer.verify(signature, message.headers.get("id") or "", task.name, args, kwargs)
    except TaskBridgeError as exc:
        return str(exc)
    return None


def guarded_strategy(celery_task: Any, app: Celery, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default strategy, behind a check of the message.

    A malformed message (undecodable body, wrong shape, arguments that do not fit, a missing or
    wrong signature when the bridge has a `signing_key`) would otherwise reach the pool, where a
    solo pool lets the error stop the whole worker and the message be delivered again forever.
    Here it is logged, marked failed, and dropped.
    """
    from celery.worker.strategy import default  # type: ignore[import-untyped]

    handle = default(celery_task, app, consumer, **kwargs)
    task = celery_task.taskbridge_task

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any) -> Any:
        problem = _problem(task, message)
        if problem is None:
            return handle(message, body, ack, reject, callbacks)
        headers = message.headers or {}
        task_id = headers.get("id")
        logger.error(
            "rejected a message for task %s [%s]: %s; it is marked failed and dropped",
            task.name,
            task_id,
            problem,
        )
        message.reject_log_error(logger, consumer.connection_errors)
        if task_id:
            error = MessageError(f"message for task {task.name!r} rejected: {problem}")
            request = {
                "name": task.name,
                "task": task.name,
                "retries": headers.get("retries"),
                ENQUEUED_HEADER: headers.get(ENQUEUED_HEADER),
                "chord": None,
                "root_id": headers.get("root_id"),
                "correlation_id": message.properties.get("correlation_id"),
                "reply_to": message.properties.get("reply_to"),
                "errbacks": None,
            }
            app.backend.mark_as_failure(task_id, error, request=_Request(request))
        return None

    return on_message


class _Request(dict[str, Any]):
    """The attribute-style request `mark_as_failure` reads (Celery passes a Bunch)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None
