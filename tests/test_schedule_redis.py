"""Schedulers on a real Redis: one leader, every slot once, takeover after the leader dies, missed
slots after a downtime, and on-startup calls claimed once per deployment start."""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import redis.asyncio

from conftest import WorkerProcess, wait_until
from taskbridge._schedule import (
    Schedule,
    Scheduler,
    _LeaseLost,
    _RedisStore,
    claim_startup,
    slot_id,
)

LEASE = 2.0  # seconds; short so that takeovers are quick to test


class Recorder:
    """A dispatch that records (scheduler, schedule, slot, when) and wakes waiters."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, datetime, float]] = []
        self.changed = asyncio.Event()

    def for_scheduler(self, who: str) -> Callable[[Schedule, datetime], Awaitable[None]]:
        async def dispatch(schedule: Schedule, slot: datetime) -> None:
            self.calls.append((who, schedule.name, slot, time.time()))
            self.changed.set()

        return dispatch

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"timed out after {timeout}s waiting for {what}: {self.calls}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                continue

    def slots(self, name: str = "tick") -> list[datetime]:
        return [slot for _, schedule, slot, _ in self.calls if schedule == name]


def assert_each_second_once(slots: list[datetime], max_gap: float = 1.0) -> None:
    epochs = [slot.timestamp() for slot in slots]
    assert len(epochs) == len(set(epochs)), f"a slot was dispatched twice: {epochs}"
    assert epochs == sorted(epochs)
    gaps = [b - a for a, b in itertools.pairwise(epochs)]
    assert all(0 < gap <= max_gap for gap in gaps), gaps


async def test_two_schedulers_dispatch_every_slot_exactly_once(
    redis_url: str, unique_name: Callable[[str], str]
) -> None:
    prefix = unique_name("sched") + ":"
    recorder, stop = Recorder(), asyncio.Event()
    tick = Schedule("tick", "app.tick", every=1)
    schedulers = [
        Scheduler([tick], recorder.for_scheduler(who), redis_url, lease_ttl=LEASE, prefix=prefix)
        for who in ("a", "b")
    ]
    runs = [asyncio.create_task(s.run(stop)) for s in schedulers]
    try:
        await recorder.wait_for(lambda: len(recorder.calls) >= 22, 40, "22 slots")
        assert sum(s.is_leader for s in schedulers) == 1
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*runs), 10)
    assert_each_second_once(recorder.slots())
    assert len({who for who, *_ in recorder.calls}) == 1, "only the leader dispatches"
    # each slot ran on time, within a fraction of a second of its instant
    assert all(0 <= when - slot.timestamp() < 0.5 for _, _, slot, when in recorder.calls)
    # the leader handed its lease over on stop
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.exists(f"{prefix}scheduler:leader") == 0
        last = int(client.get(f"{prefix}schedule:tick:last") or 0)
        assert last == round(recorder.slots()[-1].timestamp() * 1000)
    finally:
        client.close()


async def test_standby_takes_over_when_the_leader_dies(
    redis_url: str, unique_name: Callable[[str], str]
) -> None:
    prefix = unique_name("sched") + ":"
    recorder, stop = Recorder(), asyncio.Event()
    tick = Schedule("tick", "app.tick", every=1)
    schedulers = {
        who: Scheduler(
            [tick], recorder.for_scheduler(who), redis_url, lease_ttl=LEASE, prefix=prefix
        )
        for who in ("a", "b")
    }
    runs = {who: asyncio.create_task(s.run(stop)) for who, s in schedulers.items()}
    try:
        await recorder.wait_for(lambda: len(recorder.calls) >= 3, 20, "3 slots")
        leader = recorder.calls[0][0]
        standby = "b" if leader == "a" else "a"
        # a cancelled scheduler keeps its lease until it lapses, as a dead process would
        runs[leader].cancel()
        died = time.time()
        await asyncio.gather(runs[leader], return_exceptions=True)
        await recorder.wait_for(
            lambda: any(who == standby for who, *_ in recorder.calls), LEASE + 5, "the standby"
        )
        first = next(call for call in recorder.calls if call[0] == standby)
        assert first[3] - died <= LEASE + 1.0, f"took over {first[3] - died:.2f}s after"
        await recorder.wait_for(lambda: len(recorder.calls) >= 3 + 2 * LEASE + 3, 20, "more slots")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*runs.values(), return_exceptions=True), 10)
    # the slots that fell during the takeover were still within the grace, so none is lost
    assert_each_second_once(recorder.slots())
    assert schedulers[standby].is_leader is False  # stopped


async def test_slot_claims_are_fenced_by_the_lease(
    redis_url: str, unique_name: Callable[[str], str]
) -> None:
    prefix = unique_name("fence") + ":"
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        leader, stale = _RedisStore(client, prefix, "leader"), _RedisStore(client, prefix, "old")
        await client.set(leader.lease_key, "leader", px=10_000)
        tick = Schedule("tick", "app.tick", every=1)
        slot = datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)
        await leader.cursor(tick, slot - timedelta(seconds=1))
        # a scheduler whose lease lapsed (split brain) cannot claim anything
        with pytest.raises(_LeaseLost):
            await stale.claim(tick, slot)
        assert await leader.claim(tick, slot) is True
        assert await client.get(f"{prefix}schedule:tick:{slot_id(slot)}") == b"leader"
        assert await leader.claim(tick, slot) is False  # claimed, not yet committed
        await leader.commit(tick, slot)
        assert await client.exists(f"{prefix}schedule:tick:{slot_id(slot)}") == 0
        assert await leader.claim(tick, slot) is False  # the cursor has passed it
        assert await leader.claim(tick, slot + timedelta(seconds=1)) is True
    finally:
        await client.aclose()


async def test_missed_slots_after_a_downtime_follow_the_policy(
    redis_url: str, unique_name: Callable[[str], str]
) -> None:
    prefix = unique_name("missed") + ":"
    once = Schedule("hourly-once", "app.h", cron="0 * * * *")
    skip = Schedule("hourly-skip", "app.h", cron="0 * * * *", missed="skip")
    heartbeat = Schedule("tick", "app.tick", every=0.5)
    now = datetime.now(UTC)
    down_since = now - timedelta(hours=3, minutes=30)
    client = redis.Redis.from_url(redis_url)
    try:
        for schedule in (once, skip):
            client.set(f"{prefix}schedule:{schedule.name}:last", int(down_since.timestamp() * 1000))
        recorder, stop = Recorder(), asyncio.Event()
        scheduler = Scheduler(
            [once, skip, heartbeat], recorder.for_scheduler("a"), redis_url, prefix=prefix
        )
        run = asyncio.create_task(scheduler.run(stop))
        try:
            await recorder.wait_for(lambda: len(recorder.slots("tick")) >= 2, 20, "heartbeats")
        finally:
            stop.set()
            await asyncio.wait_for(run, 10)
        latest_hour = once.previous_slot(datetime.now(UTC) - timedelta(seconds=scheduler.grace))
        assert recorder.slots("hourly-once") == [latest_hour]
        assert recorder.slots("hourly-skip") == []
        stored = int(client.get(f"{prefix}schedule:hourly-once:last") or 0)
        assert stored == round(latest_hour.timestamp() * 1000)  # type: ignore[union-attr]
    finally:
        client.close()


SCHEDULER_SCRIPT = """
import asyncio, logging, os, signal, sys, time
import redis.asyncio
from taskbridge._schedule import Schedule, Scheduler

url, prefix, out = sys.argv[1:4]
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")

async def main() -> None:
    client = redis.asyncio.Redis.from_url(url)
    async def dispatch(schedule, slot):
        await client.rpush(out, f"{slot.timestamp()} {os.getpid()} {time.time()}")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tick = Schedule("tick", "app.tick", every=1)
    await Scheduler([tick], dispatch, url, lease_ttl=float(sys.argv[4]), prefix=prefix).run(stop)
    await client.aclose()

asyncio.run(main())
"""


def test_scheduler_processes_survive_a_sigkilled_leader(
    redis_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    spawn_process: Callable[..., WorkerProcess],
) -> None:
    prefix, out = unique_name("proc") + ":", unique_name("dispatched")
    script = tmp_path / "scheduler.py"
    script.write_text(textwrap.dedent(SCHEDULER_SCRIPT))
    argv = [sys.executable, str(script), redis_url, prefix, out, str(LEASE)]
    processes = [spawn_process(argv), spawn_process(argv)]
    client = redis.Redis.from_url(redis_url)

    def entries() -> list[tuple[float, int, float]]:
        return [
            (float(slot), int(pid), float(when))
            for slot, pid, when in (raw.decode().split() for raw in client.lrange(out, 0, -1))
        ]

    try:
        for process in processes:
            process.wait_for_output("became leader|standing by")
        wait_until(lambda: len(entries()) >= 8, 30, "8 slots from the leader")
        leader_pid = entries()[0][1]
        leader = next(p for p in processes if p.process.pid == leader_pid)
        survivor = next(p for p in processes if p is not leader)
        leader.signal(signal.SIGKILL)
        killed = time.time()
        leader.process.wait(10)
        wait_until(
            lambda: sum(pid == survivor.process.pid for _, pid, _ in entries()) >= 8,
            30,
            "8 slots from the survivor",
        )
        survivor.stop()
        assert "became leader" in survivor.output
    finally:
        records = entries()
        client.close()
    slots = [slot for slot, _, _ in records]
    assert len(slots) == len(set(slots)), f"a slot was dispatched twice: {records}"
    assert len(slots) >= 16 and slots == sorted(slots)
    # a slot the leader claimed but had not sent when it died is the only gap allowed
    assert all(b - a <= 2.0 for a, b in itertools.pairwise(slots)), slots
    first_after = next(r for r in records if r[0] > killed)
    assert first_after[1] == survivor.process.pid
    assert first_after[2] - killed <= LEASE + 1.0, f"next slot {first_after[2] - killed:.2f}s after"


STARTUP_SCRIPT = """
import asyncio, os, sys
import redis.asyncio
from taskbridge._schedule import claim_startup

url, prefix, out, go = sys.argv[1:5]

async def main() -> None:
    client = redis.asyncio.Redis.from_url(url)
    while not await client.exists(go):  # both processes start their claim together
        await asyncio.sleep(0.005)
    if await claim_startup("app.warm", url, prefix=prefix):
        await client.rpush(out, os.getpid())
    await client.rpush(out + ":done", os.getpid())
    await client.aclose()

asyncio.run(main())
"""


def test_on_startup_is_claimed_once_by_processes_started_together(
    redis_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    spawn_process: Callable[..., WorkerProcess],
) -> None:
    prefix, out, go = unique_name("start") + ":", unique_name("won"), unique_name("go")
    script = tmp_path / "startup.py"
    script.write_text(textwrap.dedent(STARTUP_SCRIPT))
    processes = [spawn_process([sys.executable, str(script), redis_url, prefix, out, go])]
    processes.append(spawn_process([sys.executable, str(script), redis_url, prefix, out, go]))
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(go, 1, ex=60)
        wait_until(lambda: client.llen(out + ":done") == 2, 30, "both processes to start")
        assert client.llen(out) == 1
        assert int(client.lindex(out, 0) or 0) in {p.process.pid for p in processes}
    finally:
        client.close()


async def test_on_startup_with_a_deployment_id(
    redis_url: str, unique_name: Callable[[str], str]
) -> None:
    prefix = unique_name("deploy") + ":"
    first = await asyncio.gather(
        *(claim_startup("app.warm", redis_url, deployment_id="v1", prefix=prefix) for _ in "ab")
    )
    assert sorted(first) == [False, True]
    # a later start of the same deployment does not run it again; a new deployment does
    assert await claim_startup("app.warm", redis_url, deployment_id="v1", prefix=prefix) is False
    assert await claim_startup("app.warm", redis_url, deployment_id="v2", prefix=prefix) is True
    assert await claim_startup("app.warm", None, deployment_id="v2") is True


async def test_on_startup_window_without_a_deployment_id(
    redis_url: str, unique_name: Callable[[str], str]
) -> None:
    prefix = unique_name("window") + ":"
    assert await claim_startup("app.warm", redis_url, window=0.3, prefix=prefix) is True
    assert await claim_startup("app.warm", redis_url, window=0.3, prefix=prefix) is False
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        # the window lapses: the next start is a new deployment start
        deadline = time.monotonic() + 5
        while await client.exists(f"{prefix}startup:app.warm"):
            assert time.monotonic() < deadline, "the start window never lapsed"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    assert await claim_startup("app.warm", redis_url, window=0.3, prefix=prefix) is True
