"""Schedules and on-startup calls as an application declares them: the decorator,
`bridge.schedule`, `bridge.on_startup`, settings, start-up validation, `taskbridge tasks` and a
worker that runs its own scheduler."""

from __future__ import annotations

import json
import os
import re
import signal
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis

from conftest import WorkerProcess, wait_until
from taskbridge import ConfigurationError, TaskBridge
from taskbridge._schedule import Schedule
from tests.command import run_taskbridge


def test_the_decorator_bridge_schedule_and_on_startup_declare_schedules_and_calls() -> None:
    bridge = TaskBridge()

    @bridge.task(schedule="*/5 * * * *")
    def cleanup() -> None: ...

    @bridge.task(schedule=30, on_startup=True)
    def warm(level: int = 1) -> None: ...

    @bridge.task
    def report(day: int, fmt: str = "pdf") -> None: ...

    returned = bridge.schedule(
        report, "0 3 * * *", 7, name="nightly", timezone="Europe/Paris", missed="skip", fmt="csv"
    )
    bridge.on_startup(report, 1, fmt="html")
    assert bridge.schedules == [
        Schedule(name=cleanup.name, task=cleanup.name, cron="*/5 * * * *"),
        Schedule(name=warm.name, task=warm.name, every=30.0),
        Schedule(
            name="nightly",
            task=report.name,
            cron="0 3 * * *",
            args=(7,),
            kwargs={"fmt": "csv"},
            timezone="Europe/Paris",
            missed="skip",
        ),
    ]
    assert returned is bridge.schedules[2] or returned == bridge.schedules[2]
    startup = bridge.periodic.startup
    assert sorted(startup) == sorted([warm.name, report.name])
    assert (startup[report.name].args, startup[report.name].kwargs) == ((1,), {"fmt": "html"})
    assert (startup[warm.name].args, startup[warm.name].kwargs) == ((), {})
    bridge.validate()  # all of it is valid


def test_a_schedule_name_declared_twice_is_refused() -> None:
    bridge = TaskBridge()

    @bridge.task(schedule=60)
    def sync() -> None: ...

    with pytest.raises(ConfigurationError) as caught:
        bridge.schedule(sync, "0 * * * *")
    assert str(caught.value) == f"schedule {sync.name!r} is declared twice; give one a name="
    bridge.schedule(sync, "0 * * * *", name="hourly")
    assert [s.name for s in bridge.schedules] == [sync.name, "hourly"]
    with pytest.raises(ConfigurationError, match="is already called on start-up"):
        bridge.on_startup(sync)
        bridge.on_startup(sync)


def test_decorating_the_same_function_again_declares_its_schedule_once() -> None:
    bridge = TaskBridge()

    def declare() -> object:
        # as an endpoint or a factory would: a new function object with the same name each time
        @bridge.task(schedule=10, on_startup=True)
        def tick() -> None: ...

        return tick

    first, second = declare(), declare()
    assert first is not second
    assert [s.name for s in bridge.schedules] == [bridge.schedules[0].task]
    assert len(bridge.periodic.startup) == 1
    bridge.validate()


def test_settings_change_disable_and_add_schedules() -> None:
    bridge = TaskBridge(
        {
            "schedules": {
                "tests.tick": {"every": 5},  # a cron declared in code becomes every 5 s
                "tests.off": {"enabled": False},
                "added": {"task": "tests.report", "cron": "0 6 * * 1", "args": [3]},
            }
        }
    )

    @bridge.task(name="tests.tick", schedule="* * * * *")
    def tick() -> None: ...

    @bridge.task(name="tests.off", schedule=60)
    def off() -> None: ...

    @bridge.task(name="tests.report")
    def report(day: int) -> None: ...

    by_name = {s.name: s for s in bridge.schedules}
    assert (by_name["tests.tick"].every, by_name["tests.tick"].cron) == (5, None)
    assert by_name["tests.off"].enabled is False
    assert by_name["added"] == Schedule(
        name="added", task="tests.report", cron="0 6 * * 1", args=(3,)
    )
    assert by_name["added"].source == "TASKBRIDGE_SCHEDULES[added]"
    here, queued = bridge.periodic.split()
    assert ([s.name for s in here], queued) == (["tests.tick", "added"], [])
    bridge.validate()


def test_start_up_validation_reports_every_schedule_problem_with_the_others() -> None:
    bridge = TaskBridge(
        {
            "schedules": {
                "ghost": {"task": "nope.task", "every": 5},
                "badcron": {"task": "tests.report", "cron": "61 * * * *"},
                "badargs": {"task": "tests.report", "every": 5, "args": [1, 2, 3]},
                "badzone": {"task": "tests.report", "every": 5, "timezone": "Mars/Olympus"},
                "fine": {"task": "tests.report", "every": 5, "args": [1]},
            },
            "routes": {"nomatch.*": "inprocess"},
            "backends": {"rec": {"engine": "recording"}},
        }
    )

    @bridge.task(name="tests.report")
    def report(day: int, fmt: str = "pdf") -> None: ...

    @bridge.task(name="tests.stamp", backend="rec")
    def stamp(when: str) -> None: ...

    bridge.on_startup(report, 1, 2, 3)
    bridge.schedule(stamp, 10, datetime(2020, 1, 1, tzinfo=UTC))  # a queue needs JSON
    with pytest.raises(ConfigurationError) as caught:
        bridge.validate()
    hint = (
        "write 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds first, "
        "e.g. '*/5 * * * *'"
    )
    too_many = "cannot be called with these arguments: too many positional arguments"
    assert str(caught.value).splitlines() == [
        "7 configuration problems:",
        "  - schedule 'badcron' (TASKBRIDGE_SCHEDULES[badcron]): cron '61 * * * *' is invalid "
        f"(Bad minute); {hint}",
        "  - schedule 'badzone' (TASKBRIDGE_SCHEDULES[badzone]): timezone 'Mars/Olympus' is "
        "unknown; use an IANA name such as 'America/New_York' or 'UTC'",
        "  - schedule 'tests.stamp': task 'tests.stamp': argument 'when' is a datetime.datetime, "
        "which is not JSON; pass value.isoformat()",
        "  - TASKBRIDGE_SCHEDULES[ghost]: task 'nope.task' is not registered (registered: "
        "tests.report, tests.stamp)",
        f"  - TASKBRIDGE_SCHEDULES[badargs]: task 'tests.report' {too_many}",
        f"  - on_startup of task 'tests.report': task 'tests.report' {too_many}",
        "  - TASKBRIDGE_ROUTES: the route 'nomatch.*' matches no registered task (registered: "
        "tests.report, tests.stamp)",
    ]


def test_a_single_schedule_problem_is_raised_on_its_own() -> None:
    bridge = TaskBridge({"schedules": {"x": {"task": "nope", "every": 1}}})
    with pytest.raises(ConfigurationError) as caught:
        bridge.validate()
    assert str(caught.value) == (
        "TASKBRIDGE_SCHEDULES[x]: task 'nope' is not registered (registered: none)"
    )


TASKS_APP = """
from taskbridge import TaskBridge

bridge = TaskBridge({"backends": {"rec": {"engine": "recording"}}})


@bridge.task(schedule=30)
def heartbeat() -> None: ...


@bridge.task(backend="rec", on_startup=True)
def report(day: int = 1) -> None: ...


bridge.schedule(report, "0 3 * * *", 1, name="nightly", timezone="Europe/Paris")
bridge.schedule(heartbeat, 60, name="slow")
"""


def test_taskbridge_tasks_lists_schedules_with_their_next_run(tmp_path: Path) -> None:
    schedules = json.dumps(
        {"slow": {"enabled": False}, "extra": {"task": "tasksapp.heartbeat", "every": 3600}}
    )
    before = datetime.now(UTC)
    result = run_taskbridge(
        tmp_path,
        {"tasksapp": TASKS_APP},
        "tasks",
        "tasksapp:bridge",
        TASKBRIDGE_SCHEDULES=schedules,
    )
    after = datetime.now(UTC)
    assert result.returncode == 0, result.stderr
    listing = result.stdout.split("\nschedules:\n", 1)[1].splitlines()
    pattern = re.compile(r"  (\S+): (.+); next (\S+)(?: \((.+)\))?")
    found = {}
    for line in listing[:4]:
        matched = pattern.fullmatch(line)
        if matched is None:
            assert re.fullmatch(
                r"  slow: every 60s; disabled \(TASKBRIDGE_SCHEDULES\[slow\]\)", line
            )
            continue
        name, what, when, source = matched.groups()
        found[name] = (what, datetime.fromisoformat(when), source)
    assert listing[4:] == ["", "on start-up: tasksapp.report"]
    what, heartbeat, source = found["tasksapp.heartbeat"]
    assert (what, source) == ("every 30s", None)
    assert heartbeat.utcoffset() == timedelta(0)  # an absolute date-time, in UTC
    assert before < heartbeat <= after + timedelta(seconds=30)
    assert heartbeat.timestamp() % 30 == 0
    what, nightly, source = found["nightly"]
    assert (what, source) == ("cron '0 3 * * *' (Europe/Paris)", None)
    paris = nightly.astimezone(ZoneInfo("Europe/Paris"))
    assert nightly.utcoffset() == paris.utcoffset()  # shown in the schedule's own zone
    assert (paris.hour, paris.minute) == (3, 0)
    assert before < nightly <= after + timedelta(days=1)
    what, extra, source = found["extra"]
    assert (what, source) == ("every 3600s", "TASKBRIDGE_SCHEDULES[extra]")
    assert before < extra <= after + timedelta(hours=1)


WORKER_APP = """
import json
import os
import time

import redis

from taskbridge import TaskBridge, current_task

_redis = redis.Redis.from_url(os.environ["TBTEST_REDIS_URL"])
bridge = TaskBridge()


@bridge.task(name=os.environ["TBTEST_NAME"], backend="arq", schedule=1)
def tick() -> None:
    context = current_task()
    assert context is not None and context.scheduled_at is not None
    entry = {"pid": os.getpid(), "slot": context.scheduled_at.timestamp(), "id": context.id}
    _redis.rpush(os.environ["TBTEST_NAME"], json.dumps(entry))
"""


def test_worker_with_scheduler_runs_the_worker_and_the_schedule_in_one_process(
    tmp_path: Path,
    redis_url: str,
    unique_name: Callable[[str], str],
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    (tmp_path / "workerapp.py").write_text(WORKER_APP)
    name = unique_name("tick")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBRIDGE_")}
    env |= {
        "TBTEST_REDIS_URL": redis_url,
        "TBTEST_NAME": name,
        "TASKBRIDGE_BACKENDS__ARQ__REDIS_URL": redis_url,
        "TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME": unique_name("q"),
        "TASKBRIDGE_SCHEDULER_URL": redis_url,
        "TASKBRIDGE_SCHEDULER_LEASE": "2",
    }
    worker = spawn_worker(["worker", "arq", "workerapp:bridge", "--scheduler"], env=env)
    store = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: store.llen(name) >= 4, 40, f"4 slots to run\n{worker.output}")
        records = [json.loads(item) for item in store.lrange(name, 0, -1)]
    finally:
        store.close()
    assert {record["pid"] for record in records} == {worker.process.pid}
    slots = sorted(int(record["slot"]) for record in records)
    assert slots == list(range(slots[0], slots[0] + len(slots))), slots
    assert "taskbridge ARQ worker ready" in worker.output
    dispatched = Counter(
        re.findall(rf"schedule {re.escape(name)}: dispatched slot (\S+)", worker.output)
    )
    assert len(dispatched) >= 4 and set(dispatched.values()) == {1}, dispatched
    # SIGTERM stops both: the worker exits cleanly and the scheduler gives up its lease
    worker.signal(signal.SIGTERM)
    assert worker.process.wait(30) == 0, worker.output
    worker.stop()
    assert "lease released" in worker.output, worker.output
    from arq.constants import job_key_prefix, result_key_prefix
    from taskbridge_arq import DEDUP_KEY_PREFIX

    cleanup = redis.Redis.from_url(redis_url)
    try:
        ids = [record["id"] for record in records]
        cleanup.delete(
            *(p + i for i in ids for p in (job_key_prefix, result_key_prefix, DEDUP_KEY_PREFIX))
        )
    finally:
        cleanup.close()


async def test_two_apps_sharing_a_scheduler_url_each_run_their_schedules(
    redis_url: str, unique_name: Callable[[str], str]
) -> None:
    import asyncio

    bridges = []
    for app in ("a", "b"):
        bridge = TaskBridge(
            {
                "backends": {"rec": {"engine": "recording"}},
                "scheduler_url": redis_url,
                "scheduler_prefix": unique_name(f"{app}:"),  # one per application
            }
        )

        def tick() -> None: ...

        task = bridge.task(name=unique_name(f"{app}.tick"), backend="rec")(tick)
        bridge.schedule(task, 0.5)
        bridges.append(bridge)
    stop = asyncio.Event()
    running = [
        asyncio.create_task(bridge.periodic.scheduler(bridge.periodic.split()[1]).run(stop))
        for bridge in bridges
    ]
    try:
        deadline = asyncio.get_running_loop().time() + 5
        recorded = [bridge.backend("rec").calls for bridge in bridges]  # type: ignore[attr-defined]
        while not all(recorded) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*running)
    assert all(recorded), [len(calls) for calls in recorded]
