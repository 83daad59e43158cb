"""What is known about a task call: its state, progress, result or error, and timestamps."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "TERMINAL_STATES",
    "CancelResult",
    "MemoryStatusStore",
    "StatusRecord",
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


class StatusRecord:
    """What the in-process store keeps of one call: plain attributes, written in place by the
    runner's reporter (no model is built until someone asks)."""

    __slots__ = (
        "attempts",
        "backend",
        "cancel_requested",
        "enqueued_at",
        "error",
        "finished_at",
        "placed",
        "progress",
        "progress_message",
        "result",
        "runner",
        "started_at",
        "state",
        "task_name",
        "touched",
    )

    def __init__(self, now: float) -> None:
        self.task_name: str | None = None
        self.backend: str | None = None
        self.state: TaskState = "queued"
        self.attempts = 0
        self.progress: float | None = None
        self.progress_message: str | None = None
        self.enqueued_at: float | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.result: Any = None
        self.error: TaskErrorInfo | None = None
        self.touched = now
        """Monotonic time of the last update."""
        self.runner: asyncio.Task[Any] | None = None
        """The asyncio task running the call, while it can be cancelled."""
        self.cancel_requested = False
        self.placed = now
        """Monotonic time the record took its place in the store's order."""

    def status(self, task_id: str) -> TaskStatus:
        """The record as the API's TaskStatus."""
        return TaskStatus(
            id=task_id,
            task_name=self.task_name,
            backend=self.backend,
            state=self.state,
            attempts=self.attempts,
            progress=self.progress,
            progress_message=self.progress_message,
            enqueued_at=timestamp(self.enqueued_at),
            started_at=timestamp(self.started_at),
            finished_at=timestamp(self.finished_at),
            result=self.result,
            error=self.error,
        )


class MemoryStatusStore:
    """Status of calls run in this process, kept `ttl` seconds after their last update, and at
    most `max_entries` of them (past that cap the least recently updated go first).

    The two bounds work together: at a rate of R calls per second the store holds
    min(R x ttl, max_entries) entries, so it answers for the last `ttl` seconds as long as
    R x ttl <= max_entries, and for the last max_entries / R seconds above that rate. A finished
    call's entry costs about 800 bytes (measured: the runner's fields, a small JSON result), so
    the default cap of 100,000 entries holds at most about 80 MB: one hour of history up to
    ~28 calls/s, 11 minutes at 150 calls/s.

    Each call is a `StatusRecord` whose attributes the reporter writes in place: O(1), no lock,
    nothing built per write. Records stay in the order they were placed; expired ones are
    dropped from the front at most once a second, and a record updated since it was placed
    (a long call) is placed again at the back instead: nothing is scanned, each record moves
    at most once per `ttl`.
    """

    def __init__(self, max_entries: int = 100_000, ttl: float = 3600.0) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._records: dict[str, StatusRecord] = {}
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def add(self, task_id: str) -> StatusRecord:
        """A new record for `task_id` (replacing any), placed last."""
        now = time.monotonic()
        record = StatusRecord(now)
        with self._lock:
            records = self._records
            records.pop(task_id, None)
            records[task_id] = record
            if len(records) > self.max_entries:
                self._evict(now)
            if now >= self._next_sweep:
                self._sweep(now)
        return record

    def record(self, task_id: str) -> StatusRecord | None:
        """The live record of `task_id` (to write to), or None."""
        return self._records.get(task_id)

    def get(self, task_id: str) -> TaskStatus | None:
        """The status of `task_id`, or None when unknown or expired."""
        record = self._records.get(task_id)
        if record is None or time.monotonic() - record.touched > self.ttl:
            return None
        return record.status(task_id)

    def update(self, task_id: str, **fields: Any) -> None:
        """Set `fields` (TaskStatus field names; times as epoch seconds) on `task_id`'s record,
        creating it."""
        record = self._records.get(task_id)
        created = record is None
        if record is None:
            record = self.add(task_id)
        for name, value in fields.items():
            setattr(record, name, value)
        record.touched = now = time.monotonic()
        if created:
            record.placed = now
        if now >= self._next_sweep:
            with self._lock:
                self._sweep(now)

    def _evict(self, now: float) -> None:
        """Drop the least recently updated record; under the lock."""
        records = self._records
        for _ in range(len(records) + 1):  # each moves at most once
            task_id, first = next(iter(records.items()))
            del records[task_id]
            if first.touched <= first.placed:
                return
            first.placed = now  # updated since it was placed: a second chance, at the back
            records[task_id] = first

    def _sweep(self, now: float) -> None:
        """Drop expired records from the front; under the lock."""
        self._next_sweep = now + 1.0
        records, oldest = self._records, now - self.ttl
        while records:
            task_id, first = next(iter(records.items()))
            if first.placed > oldest:
                return  # placed within the ttl, and so is everything after it
            del records[task_id]
            if first.touched > oldest:  # updated since: kept, placed again at the back
                first.placed = now
                records[task_id] = first

    def __len__(self) -> int:
        return len(self._records)
