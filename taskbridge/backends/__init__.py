"""The plugin SDK: what a backend (built in or a plugin distribution) is built from.

A backend subclasses `Backend` and is registered in the entry-point group
`taskbridge.backends` (or named by import string in its alias's `engine` option). A queue
engine's worker maps each native message to an `Envelope`, lets a `Receiver` check it into a
`ReadyCall`, and executes it with `run` / `run_blocking` / `run_with_retries`, recording what
happens through a `StatusReporter`.
"""

from __future__ import annotations

from .._backends import (
    Backend,
    BackendOptions,
    WorkerBridge,
    installed_backends,
    load_backend_class,
    redact_url,
)
from .._batching import GroupCommit
from .._codec import decode_json, encode_json, normalize_arguments
from .._deadline import dispatch_deadline
from .._health import ConnectionState
from .._inbound import Envelope, ReadyCall, Receiver
from .._ledger import (
    ADD_SCRIPT,
    MOVE_SCRIPT,
    CallIndex,
    Counts,
    Cursor,
    IndexEntry,
    IndexPage,
    RedisIndex,
    Watchers,
    add_args,
    compose_with_index,
    composed_args,
    index_lost,
    move_args,
    run_with_index,
)
from .._policy import Policy, execution_fields, with_execution_fields
from .._runner import (
    Outcome,
    StatusReporter,
    TaskContext,
    close_thread_loop,
    run,
    run_blocking,
    run_with_retries,
)
from .._signing import Signer
from .._status import CancelResult, KeptCall, TaskErrorInfo, TaskStatus, timestamp
from .._task import Task, TaskCall

__all__ = [
    "ADD_SCRIPT",
    "MOVE_SCRIPT",
    "Backend",
    "BackendOptions",
    "CallIndex",
    "CancelResult",
    "ConnectionState",
    "Counts",
    "Cursor",
    "Envelope",
    "GroupCommit",
    "IndexEntry",
    "IndexPage",
    "KeptCall",
    "Outcome",
    "Policy",
    "ReadyCall",
    "Receiver",
    "RedisIndex",
    "Signer",
    "StatusReporter",
    "Task",
    "TaskCall",
    "TaskContext",
    "TaskErrorInfo",
    "TaskStatus",
    "Watchers",
    "WorkerBridge",
    "add_args",
    "close_thread_loop",
    "compose_with_index",
    "composed_args",
    "decode_json",
    "dispatch_deadline",
    "encode_json",
    "execution_fields",
    "index_lost",
    "installed_backends",
    "load_backend_class",
    "move_args",
    "normalize_arguments",
    "redact_url",
    "run",
    "run_blocking",
    "run_with_index",
    "run_with_retries",
    "timestamp",
    "with_execution_fields",
]
