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
    """Status of calls run in this process, kept `ttl` seconds after their last update, and at
    most `max_entries` of them (the oldest go first past that cap).

    The two bounds work together: at a rate of R calls per second the store holds
    min(R x ttl, max_entries) entries, so it answers for the last `ttl` seconds as long as
    R x ttl <= max_entries, and for the last max_entries / R seconds above that rate. A finished
    call's entry costs about 800 bytes (measured: the runner's fields, a small JSON result), so
    the default cap of 100,000 entries holds at most about 80 MB: one hour of history up to
    ~28 calls/s, 11 minutes at 150 calls/s.

    Entries are plain dicts updated in place (the runner writes several times per call, on the
    request's hot path); a TaskStatus is built only when someone asks. Entries are kept in the
    order of their last update, so expired ones are at the front: they are dropped at most once
    a second, from the front, on an update (O(1) amortised, nothing to scan). Times may be given
    as epoch seconds. Thread-safe: the runner updates it from worker threads too.
    """

    def __init__(self, max_entries: int = 100_000, ttl: float = 3600.0) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: OrderedDict[str, list[Any]] = OrderedDict()
        """task id -> [monotonic time of the last update, fields]"""
        self._lock = threading.Lock()
        self._next_sweep = 0.0

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
        now = time.monotonic()
        with self._lock:
            entries = self._entries
            entry = entries.get(task_id)
            if entry is None:
                entries[task_id] = [now, fields]
                if len(entries) > self.max_entries:
                    entries.popitem(last=False)
            else:
                entry[0] = now
                entry[1].update(fields)
                entries.move_to_end(task_id)
            if now >= self._next_sweep:
                self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Drop the expired entries (the oldest updates, at the front); under the lock."""
        self._next_sweep = now + 1.0
        entries, oldest = self._entries, now - self.ttl
        while entries:
            first = next(iter(entries.values()))
            if first[0] >= oldest:
                break
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
