"""Questions about many calls at once, across every backend that keeps status: a page of calls
newest first, counts per state and task, and running a failed or cancelled call again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ._backends import Backend
from ._exceptions import TaskNotRetryable, UnknownTaskError
from ._handle import TaskHandle
from ._ledger import CallIndex, Counts, Cursor, IndexEntry, IndexPage, merge_pages
from ._status import TaskPage, TaskStats, TaskStatus
from ._task import Task, TaskCall

__all__ = ["RetrySource", "call_stats", "list_calls", "retry_call"]

RETRYABLE = frozenset({"failed", "cancelled"})


def _indexed(backends: Iterable[Backend], alias: str | None) -> list[tuple[Backend, CallIndex]]:
    """The indexes of `backends` (of `alias` alone, when given), each once: two aliases that
    keep calls in one Redis under one prefix share an index (`RedisIndex.identity`)."""
    found = []
    seen: set[object] = set()
    for backend in backends:
        index = backend.index if backend.supports_status else None
        if index is None or (alias is not None and backend.alias != alias):
            continue
        identity = getattr(index, "identity", None) or id(index)
        if identity not in seen:
            seen.add(identity)
            found.append((backend, index))
    return found


async def list_calls(
    backends: Iterable[Backend],
    *,
    state: str | None = None,
    task: str | None = None,
    backend: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> TaskPage:
    """Up to `limit` calls, newest first (by enqueue time), from every backend's index; the
    page's `next` goes on from where it ends. ValueError for a cursor this did not give."""
    after = None if cursor is None else Cursor.decode(cursor)
    indexed = _indexed(backends, backend)
    pages: Sequence[IndexPage] = await asyncio.gather(
        *(index.page(state=state, task=task, after=after, limit=limit) for _, index in indexed)
    )
    owner: dict[str, Backend] = {}
    for (source, _), page in zip(indexed, pages, strict=True):
        for entry in page.entries:
            owner.setdefault(entry.id, source)
    entries, stopped = merge_pages(pages, limit)
    statuses = await _read(entries, owner)
    items = []
    for entry in entries:
        status = statuses.get(entry.id)
        if status is None or (state is not None and status.state != state):
            continue  # expired meanwhile, or moved on since the index was read
        if status.retry_of is None and entry.retry_of is not None:
            status.retry_of = entry.retry_of
        items.append(status)
    return TaskPage(items=items, next=None if stopped is None else stopped.encode())


async def _read(entries: list[IndexEntry], owner: dict[str, Backend]) -> dict[str, TaskStatus]:
    """The statuses of `entries`, one read per backend, concurrently."""
    by_backend: dict[str, tuple[Backend, list[str]]] = {}
    for entry in entries:
        source = owner[entry.id]
        by_backend.setdefault(source.alias, (source, []))[1].append(entry.id)
    groups = list(by_backend.values())
    answers = await asyncio.gather(*(source.statuses(ids) for source, ids in groups))
    found: dict[str, TaskStatus] = {}
    for (_, ids), statuses in zip(groups, answers, strict=True):
        for task_id, status in zip(ids, statuses, strict=True):
            if status is not None and status.state != "unknown":
                found[task_id] = status
    return found


async def call_stats(backends: Iterable[Backend]) -> TaskStats:
    """Calls per state and per task and state, summed over every backend's index."""
    indexed = _indexed(backends, None)
    total = Counts()
    for counts in await asyncio.gather(*(index.counts() for _, index in indexed)):
        total.add(counts)
    return TaskStats(total=sum(total.states.values()), states=total.states, tasks=total.tasks)


class RetrySource(Protocol):
    """What `retry_call` needs of the bridge."""

    async def status(self, handle: TaskHandle) -> TaskStatus:
        """What the backends know of a call."""
        ...

    def backend(self, alias: str) -> Backend:
        """The backend built for `alias`."""
        ...

    def get_task(self, name: str) -> Task[..., Any]:
        """The task registered as `name`."""
        ...

    def prepare(
        self, task: Task[..., Any], args: tuple[Any, ...], kwargs: Any
    ) -> tuple[Backend, TaskCall]:
        """Route a call and check its arguments."""
        ...

    async def dispatch(self, batch: Iterable[tuple[Backend, TaskCall]]) -> None:
        """Send prepared calls."""
        ...


async def retry_call(bridge: RetrySource, task_id: str) -> TaskHandle:
    """Dispatch a failed or cancelled call again, with the arguments its backend kept, routed
    as its task is routed now; the new call (a new id) records `retry_of=task_id`.

    TaskNotRetryable (naming the call and the reason) when the call is unknown, did not fail
    and was not cancelled, has no kept arguments, or its task is not registered here.
    """
    status = await bridge.status(TaskHandle(task_id, None, None))
    if status.state == "unknown" or status.backend is None:
        raise TaskNotRetryable(f"no task call with id {task_id!r}", task_id, unknown=True)
    name = status.task_name or "?"
    if status.state not in RETRYABLE:
        raise TaskNotRetryable(
            f"task {name} [{task_id}] is {status.state}: only failed or cancelled calls can be "
            "retried",
            task_id,
        )
    kept = await bridge.backend(status.backend).kept_call(task_id)
    if kept is None:
        raise TaskNotRetryable(
            f"task {name} [{task_id}]: its arguments were not kept (backend {status.backend!r}), "
            "so it cannot be run again",
            task_id,
        )
    try:
        task = bridge.get_task(kept.task_name)
    except UnknownTaskError:
        raise TaskNotRetryable(
            f"task {kept.task_name} [{task_id}] is not registered in this application, so it "
            "cannot be run again from here",
            task_id,
        ) from None
    backend, call = bridge.prepare(task, kept.args, kept.kwargs)
    call.retry_of = task_id
    await bridge.dispatch([(backend, call)])
    return call.handle
