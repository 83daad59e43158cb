"""ARQ backend for taskbridge: FastAPI tasks to ARQ workers over Redis, JSON only.

Configure an alias (`TASKBRIDGE_BACKENDS__ARQ__REDIS_URL=redis://localhost:6379/1`), route tasks
to it (`@bridge.task(backend="arq")`) and run `taskbridge worker arq myapp.tasks:bridge`.
"""

from ._backend import ArqBackend
from ._dispatch import POLICY_KWARG, WAKE_CHANNEL_PREFIX
from ._options import DEFAULT_QUEUE, ArqOptions
from ._serializer import (
    RemoteTaskError,
    deserialize,
    exception_from_json,
    exception_to_json,
    serialize,
)
from ._worker import TaskbridgeWorker

__all__ = [
    "DEFAULT_QUEUE",
    "POLICY_KWARG",
    "WAKE_CHANNEL_PREFIX",
    "ArqBackend",
    "ArqOptions",
    "RemoteTaskError",
    "TaskbridgeWorker",
    "deserialize",
    "exception_from_json",
    "exception_to_json",
    "serialize",
]
