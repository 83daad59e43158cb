"""Every error taskbridge raises, under one root.

    TaskBridgeError
    ├── ConfigurationError            settings, registration or routing is wrong (start-up)
    │   ├── UnknownBackendError       a backend name resolves to nothing installed
    │   └── BridgeNotFoundError       `Tasks` used in an app that has no bridge
    ├── TaskArgumentError (TypeError) a call's arguments cannot be sent (at add_task time)
    ├── UnknownTaskError (LookupError) a worker got a message for a task it does not know
    ├── MessageError (ValueError)     a message cannot be decoded
    ├── TaskFailed                    `handle.result()` of a call that failed (type, message)
    ├── TaskCancelled                 `handle.result()` of a call that was cancelled
    └── BackendError                  an engine failed at run time
        └── BackendUnavailable        the broker did not accept the calls in time (also an
                                      HTTPException: FastAPI answers 503 + Retry-After)

Configuration errors are raised at start-up; the others at run time. Each message names the task,
setting or backend concerned and says what to do next.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BridgeNotFoundError",
    "ConfigurationError",
    "MessageError",
    "TaskArgumentError",
    "TaskBridgeError",
    "TaskCancelled",
    "TaskFailed",
    "UnknownBackendError",
    "UnknownTaskError",
]


class TaskBridgeError(Exception):
    """Root of every error raised by taskbridge."""


class ConfigurationError(TaskBridgeError):
    """Settings, task registration or routing is invalid; raised at start-up."""


class UnknownBackendError(ConfigurationError):
    """A backend name is not built in, not an installed plugin and not an import string."""


class BridgeNotFoundError(ConfigurationError):
    """`Tasks` was used in an application that has no TaskBridge attached."""


class TaskArgumentError(TaskBridgeError, TypeError):
    """A task call's arguments do not fit the task or cannot be encoded as JSON.

    Raised by `add_task` / `enqueue`, in the caller, so nothing reaches a worker that would fail
    there to decode it.
    """

    def __init__(
        self, message: str, *, task_name: str | None = None, parameter: str | None = None
    ) -> None:
        super().__init__(message)
        self.task_name = task_name
        self.parameter = parameter


class UnknownTaskError(TaskBridgeError, LookupError):
    """A message names a task that is not registered on the bridge."""

    def __init__(self, task_name: str, message: str | None = None) -> None:
        super().__init__(
            message
            or f"no task named {task_name!r} is registered on this bridge; is the module that "
            "defines it imported by the bridge's module?"
        )
        self.task_name = task_name


class MessageError(TaskBridgeError, ValueError):
    """A queued message is malformed, truncated or not JSON."""


class TaskFailed(TaskBridgeError):
    """The call failed; raised by `handle.result()`. `error_type` and `error_message` are the
    task's own exception's qualified type name and message (it may have run in another process).
    """

    def __init__(
        self,
        task_id: str,
        task_name: str | None = None,
        error_type: str = "unknown",
        message: str = "",
    ) -> None:
        super().__init__(f"task {task_name or '?'} [{task_id}] failed: {error_type}: {message}")
        self.task_id = task_id
        self.task_name = task_name
        self.error_type = error_type
        self.error_message = message


class TaskCancelled(TaskBridgeError):
    """The call was cancelled; raised by `handle.result()`."""

    def __init__(self, task_id: str, task_name: str | None = None) -> None:
        super().__init__(f"task {task_name or '?'} [{task_id}] was cancelled")
        self.task_id = task_id
        self.task_name = task_name


class BackendError(TaskBridgeError):
    """A backend failed while talking to its engine."""

    def __init__(self, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.backend = backend


class BackendUnavailable(BackendError, HTTPException):
    """The broker could not be reached or did not accept the calls within the dispatch timeout.

    It is also an HTTPException (503 with Retry-After), so FastAPI answers a request whose tasks
    were not accepted with 503 and no handler has to be installed; an app that registers its own
    handler for BackendUnavailable still gets it called first.
    """

    def __init__(self, message: str, *, backend: str | None = None, retry_after: int = 5) -> None:
        BackendError.__init__(self, message, backend=backend)
        HTTPException.__init__(
            self,
            status_code=503,
            detail="a task queue is unavailable; the request was not completed, try again later",
            headers={"Retry-After": str(retry_after)},
        )
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"BackendUnavailable({self.message!r}, backend={self.backend!r})"


class TaskNotRetryable(TaskBridgeError):
    """`retry` was asked of a call that cannot be run again: it did not fail and was not
    cancelled, its arguments were not kept, or its task is not registered here (the message
    says which); the router answers 409 with it."""

    def __init__(self, message: str, task_id: str | None = None, *, unknown: bool = False) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.unknown = unknown
        """No backend knows the call (the router answers 404, not 409)."""
