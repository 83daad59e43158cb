"""The public names are a contract: this fails when an export changes by accident."""

from __future__ import annotations

import taskbridge
import taskbridge.backends

EXPECTED = [
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

BACKEND_API = [
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


def test_top_level_exports() -> None:
    assert taskbridge.__all__ == EXPECTED
    assert all(hasattr(taskbridge, name) for name in EXPECTED)


def test_backend_author_api() -> None:
    assert taskbridge.backends.__all__ == BACKEND_API
    assert all(hasattr(taskbridge.backends, name) for name in BACKEND_API)


def test_every_error_has_the_one_root() -> None:
    errors = [
        getattr(taskbridge, n)
        for n in EXPECTED
        if n.endswith(("Error", "Unavailable", "Failed", "Cancelled"))
    ]
    assert all(issubclass(e, taskbridge.TaskBridgeError) for e in errors)
    assert issubclass(taskbridge.TaskArgumentError, TypeError)


def test_errors_can_be_rebuilt_from_their_message_alone() -> None:
    """Result backends (Celery's JSON results) rebuild exceptions as `cls(message)`."""
    for name in EXPECTED:
        cls = getattr(taskbridge, name)
        if isinstance(cls, type) and issubclass(cls, taskbridge.TaskBridgeError):
            rebuilt = cls("the message")
            assert "the message" in str(rebuilt)
