"""The call index (`taskbridge._ledger`) on a real Redis: pages, filters, counts, bounds, and
the events channel through a lost connection."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio

from taskbridge import TaskStatus
from taskbridge._ledger import (
    ADD_SCRIPT,
    MOVE_SCRIPT,
    Cursor,
    IndexEntry,
    IndexPage,
    RedisIndex,
    add_args,
    merge_pages,
    move_args,
)
from tests.faults.proxy import FaultProxy
from tests.faults.servers import OwnRedis
from tests.index_walk import walk

HOUR_MS = 3_600_000


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    connection = redis.asyncio.Redis.from_url(redis_url)
    yield connection
    await connection.aclose()


@pytest.fixture
def prefix(unique_name: Callable[[str], str]) -> str:
    return unique_name("index")


class Ledger:
    """Writes as a dispatcher and a worker would, through the scripts."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str, max_entries: int) -> None:
        self.prefix, self.max = prefix, max_entries
        self._add = client.register_script(ADD_SCRIPT)
        self._move = client.register_script(MOVE_SCRIPT)

    async def add(self, *calls: tuple[str, int, str, str], now: int | None = None) -> None:
        now = int(time.time() * 1000) if now is None else now
        rows = [(i, score, state, task, None) for i, score, state, task in calls]
        await self._add(args=add_args(self.prefix, now, HOUR_MS, self.max, rows))

    async def move(self, task_id: str, state: str | None, task: str | None = None) -> None:
        now = int(time.time() * 1000)
        await self._move(args=move_args(self.prefix, now, HOUR_MS, self.max, task_id, state, task))


async def test_pages_cover_every_call_once_newest_first_under_any_filter(
    client: redis.asyncio.Redis, prefix: str
) -> None:
    rng = random.Random(7)
    now = int(time.time() * 1000)
    states = ["queued", "running", "succeeded", "failed"]
    calls = [
        (f"id{i:04d}", now - rng.randrange(40), rng.choice(states), rng.choice(["a", "b", "c"]))
        for i in range(300)
    ]  # many ids share a millisecond: ties are ordered by id
    ledger = Ledger(client, prefix, 10_000)
    for chunk in range(0, len(calls), 50):
        await ledger.add(*calls[chunk : chunk + 50])
    expected = sorted(calls, key=lambda c: (c[1], c[0]), reverse=True)
    for budget in (5000, 7):  # a small budget stops walks early: they must still cover all
        index = RedisIndex(client, prefix, ttl=3600, max_entries=10_000, budget=budget)
        for limit in (1, 7, 50, 500):
            everything = await walk(index, limit)
            assert [e.id for e in everything] == [c[0] for c in expected]
            for state in states:
                got = await walk(index, limit, state=state)
                assert [e.id for e in got] == [c[0] for c in expected if c[2] == state]
            got = await walk(index, limit, state="failed", task="b")
            assert [e.id for e in got] == [c[0] for c in expected if c[2:] == ("failed", "b")]
    counts = await index.counts()
    assert counts.states == {s: sum(c[2] == s for c in calls) for s in states}
    assert counts.tasks["a"] == {
        s: n for s in states if (n := sum(c[2:] == (s, "a") for c in calls))
    }


async def test_moves_keep_sets_and_counts_in_step(client: redis.asyncio.Redis, prefix: str) -> None:
    ledger = Ledger(client, prefix, 100)
    now = int(time.time() * 1000)
    await ledger.add(("x", now, "queued", "t"), ("y", now, "queued", "t"))
    await ledger.add(("x", now, "queued", "t"))  # a duplicate dispatch counts once
    await ledger.move("x", "running")
    await ledger.move("x", None)  # progress: no change of state
    await ledger.move("x", "succeeded")
    await ledger.move("lost", "running", task="u")  # a call the index did not have
    index = RedisIndex(client, prefix, ttl=3600, max_entries=100)
    counts = await index.counts()
    assert counts.states == {"queued": 1, "succeeded": 1, "running": 1}
    assert counts.tasks == {"t": {"queued": 1, "succeeded": 1}, "u": {"running": 1}}
    page = await index.page(state="succeeded", task=None, after=None, limit=10)
    assert [e.id for e in page.entries] == ["x"]
    assert not await client.exists(f"{prefix}:state:running:none")


async def test_the_index_keeps_its_bounds(client: redis.asyncio.Redis, prefix: str) -> None:
    ledger = Ledger(client, prefix, 5)
    now = int(time.time() * 1000)
    for i in range(12):
        await ledger.add((f"c{i:02d}", now + i, "queued", "t"), now=now + i)
    index = RedisIndex(client, prefix, ttl=3600, max_entries=5)
    assert [e.id for e in await walk(index, 50)] == ["c11", "c10", "c09", "c08", "c07"]
    assert (await index.counts()).states == {"queued": 5}
    assert await client.hlen(f"{prefix}:meta") == 5
    # an hour later, the next add drops every expired call
    await ledger.add(("late", now + HOUR_MS + 100, "queued", "t"), now=now + HOUR_MS + 100)
    assert [e.id for e in await walk(index, 50)] == ["late"]
    assert (await index.counts()).tasks == {"t": {"queued": 1}}
    assert await client.zcard(f"{prefix}:task:t") == 1


def test_merge_keeps_only_what_every_index_has_shown() -> None:
    a = IndexPage([IndexEntry("a3", 30, "queued", "t"), IndexEntry("a1", 10, "queued", "t")], None)
    b = IndexPage([IndexEntry("b2", 20, "queued", "t")], Cursor(20, "b2"))  # b stopped early
    entries, after = merge_pages([a, b], 10)
    assert [e.id for e in entries] == ["a3", "b2"]  # a1 waits: b may hold calls above it
    assert after == Cursor(20, "b2")
    entries, after = merge_pages([a, IndexPage([], None)], 1)
    assert [e.id for e in entries] == ["a3"] and after == Cursor(30, "a3")
    assert Cursor.decode(Cursor(5, "x:y").encode()) == Cursor(5, "x:y")
    for bad in ("", "5", "x:1", ":a", "-1:a"):
        with pytest.raises(ValueError):
            Cursor.decode(bad)


async def test_a_watcher_hears_changes_and_survives_a_lost_connection(tmp_path: Path) -> None:
    server = OwnRedis(tmp_path / "redis")
    server.start()
    try:
        with FaultProxy(("127.0.0.1", server.port)) as proxy:
            listening = redis.asyncio.Redis(port=proxy.port)
            writer = redis.asyncio.Redis(port=server.port)
            index = RedisIndex(listening, "ix", ttl=3600, max_entries=100)
            ledger = Ledger(writer, "ix", 100)
            await ledger.add(("w", int(time.time() * 1000), "queued", "t"))
            async with index.watch("w") as changed, index.watch("other") as other:
                await ledger.move("w", "running")
                await asyncio.wait_for(changed.wait(), 5)
                assert not other.is_set()
                changed.clear()
                proxy.cut()
                await ledger.move("w", None)  # published while the watcher is cut off
                proxy.heal()
                # resubscribed, the hub wakes every watcher: the change is not missed
                await asyncio.wait_for(changed.wait(), 10)
                changed.clear()
                await ledger.move("w", "succeeded")
                await asyncio.wait_for(changed.wait(), 5)
            await index.close()
            await listening.aclose()
            await writer.aclose()
    finally:
        server.kill()


async def test_two_aliases_sharing_an_index_are_counted_once(
    client: redis.asyncio.Redis, prefix: str, redis_url: str
) -> None:
    from taskbridge._calls import call_stats, list_calls
    from taskbridge.backends import Backend

    ledger = Ledger(client, prefix, 100)
    await ledger.add(("s1", int(time.time() * 1000), "queued", "t"))

    class Shared(Backend):
        supports_status = True

        def __init__(self, alias: str) -> None:
            super().__init__(alias, {})
            self._index = RedisIndex(
                redis.asyncio.Redis.from_url(redis_url), prefix, ttl=60, max_entries=100
            )

        @property
        def index(self) -> RedisIndex:
            return self._index

        async def enqueue(self, calls: object) -> None:
            raise NotImplementedError

        async def status(self, task_id: str) -> TaskStatus | None:
            return TaskStatus(id=task_id, backend=self.alias, state="queued")

    one, two = Shared("one"), Shared("two")
    stats = await call_stats([one, two])
    assert (stats.total, stats.tasks) == (1, {"t": {"queued": 1}})
    page = await list_calls([one, two])
    assert [item.id for item in page.items] == ["s1"]
    assert [item.id for item in (await list_calls([one, two], backend="two")).items] == ["s1"]
    for backend in (one, two):
        await backend.index.client.aclose()


async def test_a_retry_indexed_first_by_its_worker_keeps_its_link(
    client: redis.asyncio.Redis, prefix: str
) -> None:
    # RabbitMQ dispatch writes the index beside the publish: the worker may get there first
    ledger = Ledger(client, prefix, 100)
    await ledger.move("new", "running", task="t")
    now = int(time.time() * 1000)
    args = add_args(prefix, now, HOUR_MS, 100, [("new", now, "queued", "t", "old")])
    await client.register_script(ADD_SCRIPT)(args=args)
    index = RedisIndex(client, prefix, ttl=3600, max_entries=100)
    page = await index.page(state=None, task=None, after=None, limit=10)
    assert [(e.id, e.state, e.retry_of) for e in page.entries] == [("new", "running", "old")]
    assert (await index.counts()).states == {"running": 1}
