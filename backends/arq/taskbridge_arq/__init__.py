"""ARQ backend for taskbridge: FastAPI tasks to ARQ workers over Redis, JSON only.

Configure an alias (`TASKBRIDGE_BACKENDS__ARQ__REDIS_URL=redis://localhost:6379/1`), route tasks
to it (`@bridge.task(backend="arq")`) and run `taskbridge worker arq myapp.tasks:bridge`.
`worker_settings("myapp.tasks:bridge")` gives ARQ's own CLI (`arq --check`, `arq`) a
WorkerSettings class for the same alias.
"""

from ._backend import ArqBackend
from ._dispatch import (
    DEDUP_KEY_PREFIX,
    JOB_FIELD,
    POLICY_KWARG,
    QUEUE_FIELD,
    SIGNATURE_FIELD,
    SYNC_FIELD,
    WAKE_CHANNEL_PREFIX,
)
from ._index import INDEX_PREFIX
from ._native import redis_settings, worker_settings
from ._options import DEFAULT_QUEUE, ArqOptions
from ._progress import ProgressReporter
from ._serializer import (
    RemoteTaskError,
    deserialize,
    deserialize_for_worker,
    exception_from_json,
    exception_to_json,
    serialize,
)
from ._status import PROGRESS_KEY_PREFIX
from ._worker import TaskbridgeWorker

__all__ = [
    "DEDUP_KEY_PREFIX",
    "DEFAULT_QUEUE",
    "INDEX_PREFIX",
    "JOB_FIELD",
    "POLICY_KWARG",
    "PROGRESS_KEY_PREFIX",
    "QUEUE_FIELD",
    "SIGNATURE_FIELD",
    "SYNC_FIELD",
    "WAKE_CHANNEL_PREFIX",
    "ArqBackend",
    "ArqOptions",
    "ProgressReporter",
    "RemoteTaskError",
    "TaskbridgeWorker",
    "deserialize",
    "deserialize_for_worker",
    "exception_from_json",
    "exception_to_json",
    "redis_settings",
    "serialize",
    "worker_settings",
]
