"""What is known about a task call: its state, progress, result or error, and timestamps."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, Literal

from pydantic import BaseModel, Field

from ._codec import json_arguments
from ._ledger import Counts, Cursor, IndexEntry, IndexPage, Watchers

__all__ = [
    "KEPT_CALLS",
    "KEPT_JSON_BYTES",
    "RETRYABLE_STATES",
    "TERMINAL_STATES",
    "CancelResult",
    "KeptCall",
    "MemoryIndex",
    "MemoryStatusStore",
    "TaskErrorInfo",
    "TaskPage",
    "TaskState",
    "TaskStats",
    "TaskStatus",
    "newest_page",
    "timestamp",
    "to_ms",
]

TaskState = Literal["queued", "running", "retrying", "succeeded", "failed", "cancelled", "unknown"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


def timestamp(seconds: float | None) -> datetime | None:
    """A UTC datetime from epoch seconds (None stays None)."""
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def to_ms(seconds: float) -> int:
    """Epoch milliseconds of epoch seconds, rounded down: a call's place in the index (which
    orders calls by it, then by id), and the precision of its `enqueued_at`, so that the two
    agree (as with ARQ's and Celery's, whose enqueue times are in milliseconds)."""
    return int(seconds * 1000)


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
    "retry_of",
)
_INDEX = {name: i for i, name in enumerate(_FIELDS)}
_TASK, _STATE, _ENQUEUED, _RETRY_OF = (
    _INDEX[name] for name in ("task_name", "state", "enqueued_at", "retry_of")
)
_TOUCHED = len(_FIELDS)
"""Monotonic time of the record's last change."""
_PLACED = _TOUCHED + 1
"""Monotonic time the record took its place in the store's order."""
_TIMES = ("enqueued_at", "started_at", "finished_at")
Record = tuple[Any, ...]

RETRYABLE_STATES: frozenset[str] = frozenset({"failed", "cancelled"})
"""States whose calls keep their arguments, to be run again."""
KEPT_CALLS = 1000
"""Most failed or cancelled calls whose arguments a store keeps (the latest)."""
KEPT_JSON_BYTES = 64 * 1024
"""Largest JSON size of kept arguments that a status shows (and a shared store writes)."""

_Kept = tuple[str, tuple[Any, ...], dict[str, Any], tuple[list[Any], dict[str, Any]] | None]
"""What is kept of a failed or cancelled call: task name, the caller's args and kwargs, and
their JSON form (None when they are not JSON or too large)."""


def _new(
    task_name: str | None,
    backend: str | None,
    now: float,
    enqueued_at: float | None = None,
    retry_of: str | None = None,
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
        retry_of,
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

    Each change notifies `watchers` (`GET /tasks/{id}/events`), only while someone watches: a
    dict's truth test per write otherwise. The arguments of the latest `KEPT_CALLS` failed or
    cancelled calls are kept (`keep`), to show and to run again.
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
        self._watchers = Watchers()
        self._watched = self._watchers.active
        self._kept: dict[str, _Kept] = {}

    @property
    def watchers(self) -> Watchers:
        """Notified of each change of a watched call (from whichever thread made it)."""
        return self._watchers

    @watchers.setter
    def watchers(self, watchers: Watchers) -> None:
        # each write tests `_watched` (`watchers.active`, a dict): an attribute of the store
        # itself, the cheapest test there is (a property or `bool(watchers)` costs a call)
        self._watchers, self._watched = watchers, watchers.active

    # -- writes (the runner's reporter) ---------------------------------------------------

    def queued(
        self,
        task_id: str,
        task_name: str,
        backend: str,
        enqueued_at: float | None,
        retry_of: str | None = None,
    ) -> None:
        """Record a new call, queued, placed last."""
        now = time.monotonic()
        self._place(task_id, _new(task_name, backend, now, enqueued_at, retry_of), now)
        if self._watched:
            self._watchers.notify(task_id)

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
        if self._watched:
            self._watchers.notify(task_id)

    def update(self, task_id: str, **fields: Any) -> None:
        """Set `fields` (TaskStatus field names; times as epoch seconds) on `task_id`'s record,
        creating it."""
        if task_id in self._records:
            self.change(task_id, None, None, **fields)
            return
        now = time.monotonic()
        values = list(_new(None, None, now))
        for name, value in fields.items():
            values[_INDEX[name]] = value
        self._place(task_id, tuple(values), now)
        if self._watched:
            self._watchers.notify(task_id)

    def keep(
        self, task_id: str, task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> None:
        """Keep the arguments of a call that failed or was cancelled (the latest `KEPT_CALLS`),
        so that it can be shown and run again."""
        shown = json_arguments(args, kwargs, KEPT_JSON_BYTES)
        kept = self._kept
        with self._lock:
            kept.pop(task_id, None)
            kept[task_id] = (task_name, tuple(args), dict(kwargs), shown)
            while len(kept) > KEPT_CALLS:
                del kept[next(iter(kept))]

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
        for name in _TIMES:
            fields[name] = timestamp(fields[name])
        if record[_ENQUEUED] is not None:
            fields["enqueued_at"] = timestamp(to_ms(record[_ENQUEUED]) / 1000)
        if record[_STATE] in RETRYABLE_STATES:
            kept = self._kept.get(task_id)
            if kept is not None and kept[3] is not None:
                fields["args"], fields["kwargs"] = kept[3]
        return TaskStatus(id=task_id, **fields)

    def kept_call(self, task_id: str) -> KeptCall | None:
        """The task and arguments of `task_id` when it failed or was cancelled and they were
        kept (the caller's own objects)."""
        if self.state(task_id) not in RETRYABLE_STATES:
            return None
        kept = self._kept.get(task_id)
        return None if kept is None else KeptCall(kept[0], kept[1], kept[2])

    def fields(self, task_id: str) -> dict[str, Any] | None:
        """The record of `task_id` as JSON values under TaskStatus field names (times in epoch
        seconds; what is None left out), with its kept arguments when they are JSON; None when
        not recorded. (What a shared store writes.)"""
        record = self._records.get(task_id)
        if record is None:
            return None
        found = {k: v for k, v in zip(_FIELDS, record, strict=False) if v is not None}
        if record[_ENQUEUED] is not None:
            found["enqueued_at"] = to_ms(record[_ENQUEUED]) / 1000
        error = found.get("error")
        if isinstance(error, TaskErrorInfo):
            found["error"] = error.model_dump(exclude_none=True)
        if record[_STATE] in RETRYABLE_STATES:
            kept = self._kept.get(task_id)
            if kept is not None and kept[3] is not None:
                found["args"], found["kwargs"] = kept[3]
        return found

    # -- the index: pages and counts, from a scan -----------------------------------------

    def _indexed(self) -> list[tuple[str, Record]]:
        """Live records that have an enqueue time (every call this process dispatched)."""
        with self._lock:  # a copy: threads place records meanwhile
            items = list(self._records.items())
        oldest = time.monotonic() - self.ttl
        return [(i, r) for i, r in items if r[_TOUCHED] >= oldest and r[_ENQUEUED] is not None]

    def page(
        self, *, state: str | None, task: str | None, after: Cursor | None, limit: int
    ) -> IndexPage:
        """Up to `limit` calls after `after`, newest first by (enqueue ms, id), in `state` and
        of `task` when given: a scan of the store (at most `max_entries`, in memory)."""
        rows = [
            (to_ms(r[_ENQUEUED]), task_id, r[_STATE], r[_TASK] or "", r[_RETRY_OF])
            for task_id, r in self._indexed()
            if (state is None or r[_STATE] == state) and (task is None or r[_TASK] == task)
        ]
        return newest_page(rows, after, limit)

    def counts(self) -> Counts:
        """Calls per state, and per task and state."""
        counts = Counts()
        states, tasks = counts.states, counts.tasks
        for _, r in self._indexed():
            state, per_task = r[_STATE], tasks.setdefault(r[_TASK] or "", {})
            states[state] = states.get(state, 0) + 1
            per_task[state] = per_task.get(state, 0) + 1
        return counts

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


Row = tuple[int, str, str, str, str | None]
"""One call for `newest_page`: enqueue ms, id, state, task, retry_of."""


def newest_page(rows: Iterable[Row], after: Cursor | None, limit: int) -> IndexPage:
    """The page of `rows` after `after`, newest first by (enqueue ms, id); it stops at its
    last entry when more remain."""
    if after is not None:
        top = (after.score, after.id)
        rows = [row for row in rows if (row[0], row[1]) < top]
    newest = heapq.nlargest(limit + 1, rows, key=itemgetter(0, 1))
    entries = [IndexEntry(i, score, s, t, r) for score, i, s, t, r in newest[:limit]]
    return IndexPage(entries, entries[-1].cursor if len(newest) > limit else None)


class MemoryIndex:
    """The `CallIndex` of an in-process backend without a shared store: its status store,
    scanned for pages and counts (each call it keeps, nothing else to write), and its watchers."""

    def __init__(self, store: MemoryStatusStore) -> None:
        self.store = store

    async def page(
        self, *, state: str | None, task: str | None, after: Cursor | None, limit: int
    ) -> IndexPage:
        return self.store.page(state=state, task=task, after=after, limit=limit)

    async def counts(self) -> Counts:
        return self.store.counts()

    def watch(self, task_id: str) -> contextlib.AbstractAsyncContextManager[asyncio.Event]:
        return self.store.watchers.watch(task_id)
