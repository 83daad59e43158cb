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
    UnknownBackendError,
    UnknownTaskError,
)
from ._fastapi import TaskQueue, Tasks
from ._handle import TaskHandle
from ._policy import Policy
from ._runner import TaskContext, current_task
from ._settings import TaskBridgeSettings
from ._task import Task

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BridgeNotFoundError",
    "ConfigurationError",
    "MessageError",
    "Policy",
    "Task",
    "TaskArgumentError",
    "TaskBridge",
    "TaskBridgeError",
    "TaskBridgeSettings",
    "TaskContext",
    "TaskHandle",
    "TaskQueue",
    "Tasks",
    "UnknownBackendError",
    "UnknownTaskError",
    "current_task",
]

__version__ = "0.1.0"
