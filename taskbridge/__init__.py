"""taskbridge: one `add_task` for FastAPI, routed to BackgroundTasks, Celery or ARQ by policy."""

from ._bridge import TaskBridge
from ._exceptions import (
    BackendError,
    BackendUnavailable,
    BridgeNotFoundError,
    ConfigurationError,
    MessageError,
    TaskArgumentError,
    TaskBridgeError,
    TaskCancelled,
    TaskFailed,
    TaskNotRetryable,
    UnknownBackendError,
    UnknownTaskError,
)
from ._fastapi import TaskQueue, Tasks
from ._handle import TaskHandle
from ._policy import Policy
from ._runner import TaskContext, current_task, report_progress
from ._settings import TaskBridgeSettings
from ._status import CancelResult, TaskPage, TaskState, TaskStats, TaskStatus
from ._task import Task

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BridgeNotFoundError",
    "CancelResult",
    "ConfigurationError",
    "MessageError",
    "Policy",
    "Task",
    "TaskArgumentError",
    "TaskBridge",
    "TaskBridgeError",
    "TaskBridgeSettings",
    "TaskCancelled",
    "TaskContext",
    "TaskFailed",
    "TaskHandle",
    "TaskNotRetryable",
    "TaskPage",
    "TaskQueue",
    "TaskState",
    "TaskStats",
    "TaskStatus",
    "Tasks",
    "UnknownBackendError",
    "UnknownTaskError",
    "current_task",
    "report_progress",
]

__version__ = "0.1.0"
