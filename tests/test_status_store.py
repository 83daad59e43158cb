"""The in-process status store: entries kept by time (`status_ttl`) up to a count cap."""

from __future__ import annotations

import time
import uuid

from conftest import wait_until
from taskbridge import TaskBridge
from taskbridge._status import MemoryStatusStore
from taskbridge.backends._builtin import StoreOptions


def _finished(store: MemoryStatusStore, task_id: str) -> None:
    """The three writes the runner makes for a call that succeeds."""
    now = time.time()
    store.update(task_id, task_name="t", backend="inprocess", state="queued", enqueued_at=now)
    store.update(task_id, state="running", attempts=1, started_at=now)
    store.update(task_id, state="succeeded", result={"ok": True}, finished_at=now)


def test_entries_are_kept_for_their_ttl_then_dropped_without_a_lookup() -> None:
    store = MemoryStatusStore(max_entries=1000, ttl=0.3)
    ids = [str(uuid.uuid4()) for _ in range(20)]
    for task_id in ids:
        _finished(store, task_id)
    found = store.get(ids[0])
    assert found is not None and found.state == "succeeded" and found.result == {"ok": True}
    assert len(store) == 20
    # Updates of another call drop the expired ones (at most a second after they expire),
    # although nobody looked them up.
    probe = str(uuid.uuid4())

    def swept() -> bool:
        store.update(probe, state="queued")
        return len(store) == 1

    wait_until(swept, 5, "the expired entries to be dropped")
    assert [store.get(i) for i in ids] == [None] * 20
    assert store.get(probe) is not None


def test_an_expired_entry_reads_unknown_even_before_it_is_dropped() -> None:
    store = MemoryStatusStore(max_entries=1000, ttl=0.2)
    task_id = str(uuid.uuid4())
    _finished(store, task_id)
    wait_until(lambda: store.get(task_id) is None, 5, "the entry to expire")


def test_the_ttl_counts_from_the_last_update() -> None:
    store = MemoryStatusStore(max_entries=1000, ttl=2.0)
    old, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    store.update(old, state="queued")
    store.update(fresh, state="queued")
    time.sleep(1.0)  # (time passing is what is tested)
    store.update(fresh, state="running")  # moved to the end, its clock restarted
    wait_until(lambda: store.get(old) is None, 5, "the first entry to expire")
    found = store.get(fresh)  # a second of its ttl is left
    assert found is not None and found.state == "running"


def test_past_the_cap_the_least_recently_updated_go_first() -> None:
    store = MemoryStatusStore(max_entries=100, ttl=3600)
    ids = [str(uuid.uuid4()) for _ in range(150)]
    for task_id in ids[:100]:
        store.update(task_id, state="queued")
    store.update(ids[0], state="running")  # updated last: kept
    for task_id in ids[100:]:
        store.update(task_id, state="queued")
    assert len(store) == 100
    assert store.get(ids[0]) is not None
    assert [store.get(i) for i in ids[1:51]] == [None] * 50
    assert all(store.get(i) is not None for i in ids[51:])


def test_within_both_bounds_every_call_is_kept() -> None:
    store = MemoryStatusStore(max_entries=5000, ttl=3600)
    ids = [str(uuid.uuid4()) for _ in range(5000)]
    for task_id in ids:
        _finished(store, task_id)
    assert len(store) == 5000
    assert all(store.get(i) is not None for i in ids)


def test_the_defaults_keep_an_hour_with_a_memory_cap() -> None:
    options = StoreOptions()
    assert (options.status_ttl, options.status_max_entries) == (3600.0, 100_000)
    bridge = TaskBridge({"backends": {"inprocess": {"status_ttl": 60, "status_max_entries": 7}}})
    store = bridge.backend("inprocess").reporter.store  # type: ignore[attr-defined]
    assert isinstance(store, MemoryStatusStore)
    assert (store.ttl, store.max_entries) == (60, 7)
