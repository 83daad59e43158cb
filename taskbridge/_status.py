"""What is known about a task call: its state, progress, result or error, and timestamps."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "TERMINAL_STATES",
    "CancelResult",
    "KeptCall",
    "MemoryStatusStore",
    "TaskErrorInfo",
    "TaskPage",
    "TaskState",
    "TaskStats",
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
    traceback: str | None = Field(
        default=None, description="The formatted traceback, where the backend keeps it"
    )


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
    retry_of: str | None = Field(
        default=None, description="The id of the failed or cancelled call this one re-runs"
    )
    args: list[Any] | None = Field(
        default=None, description="Positional arguments (JSON), where the backend keeps them"
    )
    kwargs: dict[str, Any] | None = Field(
        default=None, description="Keyword arguments (JSON), where the backend keeps them"
    )

    @property
    def done(self) -> bool:
        """Whether the call has settled (succeeded, failed or cancelled)."""
        return self.state in TERMINAL_STATES


@dataclass(frozen=True, slots=True)
class KeptCall:
    """What a backend kept of a call to run it again (`POST /tasks/{id}/retry`)."""

    task_name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class TaskPage(BaseModel):
    """A page of calls, newest first (the body of `GET /tasks`)."""

    items: list[TaskStatus]
    next: str | None = Field(
        description="Pass as `cursor` for the next page; null when there is none"
    )


class TaskStats(BaseModel):
    """How many calls the backends know, per state and per task (the body of
    `GET /tasks/stats`): the calls they index, within their status lifetimes."""

    total: int
    states: dict[str, int]
    tasks: dict[str, dict[str, int]]


class CancelResult(BaseModel):
    """The answer to a cancellation request (the body of `DELETE /tasks/{id}`)."""

    id: str
    cancelled: bool = Field(description="True when the call will not run, or was stopped")
    state: TaskState
    detail: str = Field(description="What happened, or why the call could not be stopped")


# A call's record is a plain tuple of these fields, replaced whole on each change: a tuple of
# strings and numbers is untracked by the garbage collector, so a store of 100,000 finished
# calls costs a full collection nothing (objects with attributes would be traversed by every
# one of them, and the store would make collections frequent).
_FIELDS = (
    "task_name",
    "backend",
    "state",
    "attempts",
    "progress",
    "progress_message",
    "enqueued_at",
    "started_at",
    "finished_at",
    "result",
    "error",
)
_INDEX = {name: i for i, name in enumerate(_FIELDS)}
_STATE, _ATTEMPTS, _PROGRESS, _STARTED, _FINISHED, _RESULT, _ERROR = (
    _INDEX[name]
    for name in ("state", "attempts", "progress", "started_at", "finished_at", "result", "error")
)
_TOUCHED = len(_FIELDS)
"""Monotonic time of the record's last change."""
_PLACED = _TOUCHED + 1
"""Monotonic time the record took its place in the store's order."""
Record = tuple[Any, ...]


def _new(
    task_name: str | None, backend: str | None, now: float, enqueued_at: float | None = None
) -> Record:
    return (
        task_name,
        backend,
        "queued",
        0,
        None,
        None,
        enqueued_at,
        None,
        None,
        None,
        None,
        now,
        now,
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

    Each call is a tuple of plain values, replaced whole by each change (see `_FIELDS`): O(1),
    nothing built per write but the tuple, and nothing for the garbage collector to traverse.
    Records stay in the order they were placed; expired ones are dropped from the front at most
    once a second, and a record updated since it was placed (a long call) is placed again at
    the back instead: nothing is scanned, each record moves at most once per `ttl`.
    """

    def __init__(self, max_entries: int = 100_000, ttl: float = 3600.0) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._records: dict[str, Record] = {}
        self._lock = threading.Lock()
        self._next_sweep = 0.0
        self.runners: dict[str, asyncio.Task[Any]] = {}
        """The asyncio tasks running cancellable in-process calls, by call id."""
        self.cancel_requested: set[str] = set()
        """Ids of running calls whose cancellation was asked for."""

    # -- writes (the runner's reporter) ---------------------------------------------------

    def queued(self, task_id: str, task_name: str, backend: str, enqueued_at: float | None) -> None:
        """Record a new call, queued, placed last."""
        now = time.monotonic()
        self._place(task_id, _new(task_name, backend, now, enqueued_at), now)

    def change(
        self, task_id: str, task_name: str | None, backend: str | None, **fields: Any
    ) -> None:
        """Set `fields` (TaskStatus names) of `task_id`'s record, recording it again (with its
        task and backend) if the store dropped it meanwhile."""
        record = self._records.get(task_id)
        now = time.monotonic()
        if record is None:
            self._place(task_id, _new(task_name, backend, now), now)
            record = self._records[task_id]
        values = list(record)
        for name, value in fields.items():
            values[_INDEX[name]] = value
        values[_TOUCHED] = now
        self._records[task_id] = tuple(values)
        if now >= self._next_sweep:
            with self._lock:
                self._sweep(now)

    def update(self, task_id: str, **fields: Any) -> None:
        """Set `fields` (TaskStatus field names; times as epoch seconds) on `task_id`'s record,
        creating it."""
        if task_id not in self._records:
            now = time.monotonic()
            values = list(_new(None, None, now))
            for name, value in fields.items():
                values[_INDEX[name]] = value
            self._place(task_id, tuple(values), now)
            return
        self.change(task_id, None, None, **fields)

    def _place(self, task_id: str, record: Record, now: float) -> None:
        with self._lock:
            records = self._records
            records.pop(task_id, None)
            records[task_id] = record
            if len(records) > self.max_entries:
                self._evict(now)
            if now >= self._next_sweep:
                self._sweep(now)

    # -- reads ----------------------------------------------------------------------------

    def state(self, task_id: str) -> str | None:
        """The recorded state of `task_id` (None when not recorded)."""
        record = self._records.get(task_id)
        return None if record is None else str(record[_STATE])

    def get(self, task_id: str) -> TaskStatus | None:
        """The status of `task_id`, or None when unknown or expired."""
        record = self._records.get(task_id)
        if record is None or time.monotonic() - record[_TOUCHED] > self.ttl:
            return None
        fields = dict(zip(_FIELDS, record, strict=False))
        for name in ("enqueued_at", "started_at", "finished_at"):
            fields[name] = timestamp(fields[name])
        return TaskStatus(id=task_id, **fields)

    # -- bounds ---------------------------------------------------------------------------

    def _evict(self, now: float) -> None:
        """Drop the least recently updated record; under the lock."""
        records = self._records
        for _ in range(len(records) + 1):  # each moves at most once
            task_id, first = next(iter(records.items()))
            del records[task_id]
            if first[_TOUCHED] <= first[_PLACED]:
                return
            records[task_id] = (*first[:_PLACED], now)  # updated since placed: a second chance

    def _sweep(self, now: float) -> None:
        """Drop expired records from the front; under the lock."""
        self._next_sweep = now + 1.0
        records, oldest = self._records, now - self.ttl
        while records:
            task_id, first = next(iter(records.items()))
            if first[_PLACED] > oldest:
                return  # placed within the ttl, and so is everything after it
            del records[task_id]
            if first[_TOUCHED] > oldest:  # updated since: kept, placed again at the back
                records[task_id] = (*first[:_PLACED], now)

    def __len__(self) -> int:
        return len(self._records)
