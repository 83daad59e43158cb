"""What is known about a task call: its state, progress, result or error, and timestamps."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "TERMINAL_STATES",
    "CancelResult",
    "MemoryStatusStore",
    "TaskErrorInfo",
    "TaskState",
    "TaskStatus",
    "timestamp",
]

TaskState = Literal["queued", "running", "retrying", "succeeded", "failed", "cancelled", "unknown"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


def timestamp(seconds: float | None) -> datetime | None:
    """A UTC datetime from epoch seconds (None stays None)."""
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


class TaskErrorInfo(BaseModel):
    """A task's error as it can travel: the exception's type and message."""

    type: str = Field(description="Qualified name of the exception class")
    message: str = Field(description="str() of the exception")


class TaskStatus(BaseModel):
    """Everything known about one task call (the body of `GET /tasks/{id}`)."""

    id: str
    task_name: str | None = None
    backend: str | None = None
    state: TaskState = "unknown"
    attempts: int = Field(default=0, description="Attempts started so far")
    progress: float | None = Field(default=None, ge=0, le=1)
    progress_message: str | None = None
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Any = Field(default=None, description="The return value, once succeeded (JSON)")
    error: TaskErrorInfo | None = None

    @property
    def done(self) -> bool:
        """Whether the call has settled (succeeded, failed or cancelled)."""
        return self.state in TERMINAL_STATES


class CancelResult(BaseModel):
    """The answer to a cancellation request (the body of `DELETE /tasks/{id}`)."""

    id: str
    cancelled: bool = Field(description="True when the call will not run, or was stopped")
    state: TaskState
    detail: str = Field(description="What happened, or why the call could not be stopped")


class MemoryStatusStore:
    """Status of calls run in this process: bounded in size, entries expire after `ttl` s.

    Entries are plain dicts updated in place (the runner writes several times per call, on the
    request's hot path); a TaskStatus is built only when someone asks. Times may be given as
    epoch seconds. Thread-safe: the runner updates it from worker threads too.
    """

    def __init__(self, max_entries: int = 10_000, ttl: float = 3600.0) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, task_id: str) -> TaskStatus | None:
        """The status of `task_id`, or None when unknown or expired."""
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is None:
                return None
            if time.monotonic() - entry[0] > self.ttl:
                del self._entries[task_id]
                return None
            fields = dict(entry[1])
        for name in ("enqueued_at", "started_at", "finished_at"):
            if isinstance(fields.get(name), float):
                fields[name] = timestamp(fields[name])
        return TaskStatus(id=task_id, **fields)

    def update(self, task_id: str, **fields: Any) -> None:
        """Merge `fields` into the status of `task_id`, creating it."""
        with self._lock:
            entry = self._entries.pop(task_id, None)
            if entry is None:
                entry = (time.monotonic(), fields)
            else:
                entry[1].update(fields)
                entry = (time.monotonic(), entry[1])
            self._entries[task_id] = entry
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
