"""The call index of the in-process backends (`MemoryIndex`, a scan of the status store): pages
newest first under any filter, counts, a watched call's changes (from the loop and from worker
threads), the arguments kept of failed and cancelled calls, and that nobody watching costs the
store no notification."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import Counter

import pytest

from taskbridge import TaskBridge, TaskNotRetryable, report_progress
from taskbridge._ledger import Cursor, Watchers
from taskbridge._status import (
    KEPT_CALLS,
    KEPT_JSON_BYTES,
    MemoryIndex,
    MemoryStatusStore,
    to_ms,
)
from taskbridge.backends._builtin import MAX_TRACEBACK, InProcessBackend, RecordingBackend
from tests.index_walk import walk


async def settled(bridge: TaskBridge, *ids: str) -> None:
    for _ in range(500):
        states = [(await bridge.handle(i).info()).state for i in ids]
        if all(state in ("succeeded", "failed", "cancelled") for state in states):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"calls did not settle: {states}")


def store_of(bridge: TaskBridge) -> MemoryStatusStore:
    backend = bridge.backend("inprocess")
    assert isinstance(backend, InProcessBackend)
    return backend.reporter.store


async def test_pages_cover_every_call_once_newest_first_under_any_filter() -> None:
    rng = random.Random(11)
    store = MemoryStatusStore(max_entries=10_000, ttl=3600)
    base = time.time() - 100
    expected: list[tuple[int, str, str, str]] = []
    for n in range(400):
        task_id, task = str(uuid.uuid4()), rng.choice(["a", "b", "c"])
        enqueued = base + rng.randrange(40) / 1000  # 40 milliseconds: many calls share one
        store.queued(task_id, task, "inprocess", enqueued)
        state = rng.choice(["queued", "running", "succeeded", "failed"])
        if state != "queued":
            store.change(task_id, task, "inprocess", state=state)
        expected.append((int(enqueued * 1000), task_id, state, task))
        if n == 7:
            store.update(str(uuid.uuid4()), state="cancelled")  # no enqueue time: not indexed
    expected.sort(reverse=True)
    index = MemoryIndex(store)
    for limit in (1, 7, 50, 1000):
        got = await walk(index, limit)
        assert [(e.score, e.id, e.state, e.task) for e in got] == expected
    for state in ("queued", "failed"):
        got = await walk(index, 9, state=state)
        assert [e.id for e in got] == [row[1] for row in expected if row[2] == state]
    got = await walk(index, 5, task="b", state="running")
    assert [e.id for e in got] == [r[1] for r in expected if r[3] == "b" and r[2] == "running"]
    counts = await index.counts()
    assert counts.states == dict(Counter(row[2] for row in expected))
    assert counts.tasks["a"] == dict(Counter(row[2] for row in expected if row[3] == "a"))
    # a cursor in the middle of one millisecond goes on with the rest of that millisecond
    middle = expected[200]
    after = await index.page(state=None, task=None, after=Cursor(middle[0], middle[1]), limit=5)
    assert [e.id for e in after.entries] == [row[1] for row in expected[201:206]]


async def test_the_bridge_lists_and_counts_its_calls_and_retries_a_failed_one() -> None:
    bridge = TaskBridge()

    @bridge.task
    def add(a: int, b: int) -> int:
        return a + b

    @bridge.task
    async def boom(message: str, *, code: int = 0) -> None:
        raise ValueError(message)

    ids = [(await add.enqueue(n, 1)).id for n in range(6)]
    failed = [(await boom.enqueue(f"no {n}", code=n)).id for n in range(4)]
    await settled(bridge, *ids, *failed)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await bridge.list_calls(task=add.name, limit=4, cursor=cursor)
        seen += [item.id for item in page.items]
        cursor = page.next
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 6
    listed = (await bridge.list_calls(limit=50)).items
    newest_first = [(item.enqueued_at, item.id) for item in listed]
    assert newest_first == sorted(newest_first, reverse=True)
    only_failed = await bridge.list_calls(state="failed", backend="inprocess")
    assert sorted(item.id for item in only_failed.items) == sorted(failed)
    assert (await bridge.list_calls(backend="immediate")).items == []
    stats = await bridge.stats()
    assert stats.tasks == {add.name: {"succeeded": 6}, boom.name: {"failed": 4}}
    assert (stats.total, stats.states) == (10, {"succeeded": 6, "failed": 4})
    # a failed call shows its JSON arguments and its traceback, and runs again with them
    first = await bridge.handle(failed[0]).info()
    assert (first.args, first.kwargs) == (["no 0"], {"code": 0})
    assert first.error is not None and first.error.traceback is not None
    assert "in boom" in first.error.traceback
    assert first.error.traceback.rstrip().endswith("ValueError: no 0")
    again = await bridge.retry(failed[0])
    await settled(bridge, again.id)
    info = await again.info()
    assert (info.state, info.retry_of, info.args, info.kwargs) == (
        "failed",
        failed[0],
        ["no 0"],
        {"code": 0},
    )
    assert [i.retry_of for i in (await bridge.list_calls(limit=1)).items] == [failed[0]]
    with pytest.raises(TaskNotRetryable, match="only failed or cancelled"):
        await bridge.retry(ids[0])
    await bridge.close()


async def test_the_callers_own_arguments_are_kept_for_a_retry_and_json_ones_shown() -> None:
    bridge = TaskBridge()
    seen: list[object] = []

    class Thing:
        pass

    @bridge.task
    def fails_on(thing: object, blob: str = "") -> None:
        seen.append(thing)
        raise LookupError("no")

    thing = Thing()
    handle = await fails_on.enqueue(thing)
    big = await fails_on.enqueue("x", blob="y" * KEPT_JSON_BYTES)
    await settled(bridge, handle.id, big.id)
    status = await handle.info()
    assert status.state == "failed" and (status.args, status.kwargs) == (None, None)
    kept = await bridge.backend("inprocess").kept_call(handle.id)
    assert kept is not None and kept.task_name == fails_on.name and kept.args[0] is thing
    assert (await big.info()).args is None  # too large to show; still kept for a retry
    again = await bridge.retry(handle.id)
    await settled(bridge, again.id)
    assert seen[-1] is thing
    # cancelled before it started: kept too; a succeeded call keeps nothing
    later = await fails_on.using(delay=30).enqueue("soon")
    await asyncio.sleep(0.01)
    assert (await later.cancel()).cancelled
    await settled(bridge, later.id)
    kept = await bridge.backend("inprocess").kept_call(later.id)
    assert kept is not None and kept.args == ("soon",)

    @bridge.task
    def fine() -> int:
        return 1

    ok = await fine.enqueue()
    await settled(bridge, ok.id)
    assert await bridge.backend("inprocess").kept_call(ok.id) is None
    await bridge.close()


def test_kept_arguments_are_bounded_and_tracebacks_keep_their_end() -> None:
    store = MemoryStatusStore()
    ids = [str(uuid.uuid4()) for _ in range(KEPT_CALLS + 5)]
    for task_id in ids:
        store.queued(task_id, "t", "inprocess", time.time())
        store.change(task_id, "t", "inprocess", state="failed")
        store.keep(task_id, "t", [1], {})
    assert [store.kept_call(i) for i in ids[:5]] == [None] * 5
    assert all(store.kept_call(i) is not None for i in ids[5:])
    from taskbridge.backends._builtin import error_info

    try:
        raise RuntimeError("z" * (3 * MAX_TRACEBACK))
    except RuntimeError as exc:
        info = error_info(exc)
    assert info.traceback is not None and info.traceback.startswith("[...]")
    assert len(info.traceback.encode()) <= MAX_TRACEBACK
    assert error_info(RuntimeError("never raised")).traceback is None


class Counting(Watchers):
    """Watchers that count the notifications they get."""

    def __init__(self) -> None:
        super().__init__()
        self.notified: list[str] = []

    def notify(self, task_id: str) -> None:
        self.notified.append(task_id)
        super().notify(task_id)


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_watched_call_wakes_its_watcher_on_progress_and_on_finish(kind: str) -> None:
    bridge = TaskBridge()
    store = store_of(bridge)
    store.watchers = counting = Counting()
    gates = {"quiet": [threading.Event(), threading.Event()]}
    for gate in gates["quiet"]:
        gate.set()
    gates["watched"] = [threading.Event(), threading.Event()]

    async def wait_for(gate: threading.Event) -> None:
        while not gate.is_set():
            await asyncio.sleep(0.005)

    if kind == "async":

        @bridge.task(name="watched")
        async def watched(key: str) -> str:
            await wait_for(gates[key][0])
            report_progress(0.5, "half")
            await wait_for(gates[key][1])
            return "done"

    else:

        @bridge.task(name="watched")
        def watched(key: str) -> str:  # in a worker thread: notified across threads
            gates[key][0].wait(10)
            report_progress(0.5, "half")
            gates[key][1].wait(10)
            return "done"

    # nobody watches: the store never calls notify (a dict's truth test per change, no more)
    quiet = await watched.enqueue("quiet")
    await settled(bridge, quiet.id)
    assert (await quiet.info()).progress == 0.5
    assert not store.watchers and counting.notified == []
    handle = await watched.enqueue("watched")
    while (await handle.info()).state != "running":
        await asyncio.sleep(0.005)
    assert not store.watchers and counting.notified == []
    watching = bridge.watch(handle.id, "inprocess")
    assert watching is not None
    async with watching as changed:
        assert store.watchers
        gates["watched"][0].set()
        await asyncio.wait_for(changed.wait(), 5)
        changed.clear()
        status = await handle.info()
        assert (status.progress, status.progress_message) == (0.5, "half")
        gates["watched"][1].set()
        while (await handle.info()).state != "succeeded":
            await asyncio.wait_for(changed.wait(), 5)
            changed.clear()
    assert not store.watchers
    assert set(counting.notified) == {handle.id}
    await bridge.close()


async def test_immediate_and_recording_backends_list_their_calls() -> None:
    bridge = TaskBridge({"backends": {"rec": {"engine": "recording"}}})

    @bridge.task(backend="immediate")
    def now(n: int) -> int:
        if n < 0:
            raise ValueError("negative")
        return n

    @bridge.task(backend="rec")
    def later(n: int) -> None: ...

    done = [(await now.enqueue(n)).id for n in (1, -1)]
    recorded = [(await later.enqueue(n)).id for n in range(3)]
    listed = await bridge.list_calls(backend="immediate")
    assert {i.id: i.state for i in listed.items} == {done[0]: "succeeded", done[1]: "failed"}
    order = [(i.enqueued_at, i.id) for i in listed.items]
    assert order == sorted(order, reverse=True)
    kept = await bridge.backend("immediate").kept_call(done[1])
    assert kept is not None and kept.args == (-1,)
    recording = bridge.backend("rec")
    assert isinstance(recording, RecordingBackend)
    newest = [c.id for c in sorted(recording.calls, key=lambda c: (to_ms(c.enqueued_at), c.id))]
    newest.reverse()
    page = await bridge.list_calls(backend="rec", limit=2)
    assert [i.id for i in page.items] == newest[:2] and page.next is not None
    rest = await bridge.list_calls(backend="rec", limit=2, cursor=page.next)
    assert [i.id for i in rest.items] == newest[2:] and rest.next is None
    assert sorted(newest) == sorted(recorded)
    assert (await bridge.list_calls(backend="rec", state="failed")).items == []
    stats = await bridge.stats()
    assert stats.tasks[later.name] == {"queued": 3}
    assert stats.tasks[now.name] == {"succeeded": 1, "failed": 1}
    index = recording.index
    assert index is not None
    async with index.watch(recorded[0]) as changed:
        await bridge.handle(recorded[0], "rec").cancel()
        await asyncio.wait_for(changed.wait(), 1)
    assert (await index.counts()).states == {"queued": 2}
