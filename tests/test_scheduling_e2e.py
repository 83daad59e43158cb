"""Scheduling end to end: real workers, real `taskbridge scheduler` processes, real uvicorn.

Every slot of a 1-second schedule must run exactly once however many schedulers run, and keep
running when the leading one is SIGKILLed. A scheduled call's id derives from its schedule and
slot (`keyed_task_id(task, "schedule:<name>:<slot>")`), so the tasks record their call id and
the tests map each run back to its slot.

The schedulers' Redis keys (`taskbridge:scheduler:leader`, `taskbridge:schedule:<name>:*`) have
a fixed prefix: tests sharing a database tell theirs apart by schedule names that contain the
run id, and stop their schedulers (which releases the lease) before the next test starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import WorkerProcess, wait_until
from taskbridge._dev import free_port
from taskbridge._handle import keyed_task_id
from taskbridge._schedule import slot_id

LEASE = 2.0
"""Seconds of a scheduler's lease in these tests (TASKBRIDGE_SCHEDULER_LEASE): quick takeovers."""
LEADER_KEY = "taskbridge:scheduler:leader"

APP = '''
"""A scheduled task that records each of its runs in Redis."""

import json
import logging
import os
import time

import redis
from fastapi import FastAPI

from taskbridge import TaskBridge, current_task

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
PREFIX = os.environ["TBTEST_PREFIX"]
NAME = os.environ["TBTEST_NAME"]
BACKEND = os.environ["TBTEST_BACKEND"]
_redis = redis.Redis.from_url(os.environ["TBTEST_REDIS_URL"])
bridge = TaskBridge()
app = FastAPI(lifespan=bridge.lifespan)


def record(key: str, **seen: object) -> None:
    context = current_task()
    assert context is not None
    scheduled_at = getattr(context, "scheduled_at", None)
    entry = {
        "id": context.id,
        "at": time.time(),
        "pid": os.getpid(),
        "schedule": getattr(context, "schedule", None),
        "scheduled_at": scheduled_at.isoformat() if scheduled_at is not None else None,
        **seen,
    }
    _redis.rpush(PREFIX + key, json.dumps(entry))


@bridge.task(name=NAME + ".tick", backend=BACKEND, schedule=1)
def tick() -> None:
    record("tick")


@bridge.task(name=NAME + ".extra", backend=BACKEND)
def extra(label: str, times: int = 1) -> None:
    record("extra", label=label, times=times)


STARTUP = os.environ.get("TBTEST_STARTUP") == "1"


@bridge.task(name=NAME + ".hello", backend=BACKEND, on_startup=STARTUP)
async def hello() -> None:
    record("hello")
'''


@dataclass
class Setup:
    """An app module in `directory`, the environment its processes get, and its records."""

    directory: Path
    env: dict[str, str]
    name: str
    prefix: str
    store: redis.Redis

    @property
    def tick(self) -> str:
        """The scheduled task's name, which is also its schedule's name."""
        return self.name + ".tick"

    def records(self, key: str = "tick") -> list[dict[str, Any]]:
        """What the task recorded under `key`, oldest first."""
        return [json.loads(item) for item in self.store.lrange(self.prefix + key, 0, -1)]

    def slots(
        self, key: str = "tick", task: str | None = None, schedule: str | None = None
    ) -> list[datetime]:
        """The slot of each recorded run, in order of recording (the call id names the slot)."""
        task = task or self.tick
        return [self.slot_of(record["id"], task, schedule) for record in self.records(key)]

    def slot_of(self, call_id: str, task: str, schedule: str | None = None) -> datetime:
        """The 1-second slot whose call has `call_id`; fails for an id of no recent slot."""
        now, wanted = int(time.time()), uuid.UUID(call_id)  # engines may write ids without dashes
        for second in range(now - 300, now + 5):
            slot = datetime.fromtimestamp(second, UTC)
            key = f"schedule:{schedule or task}:{slot_id(slot)}"
            if uuid.UUID(keyed_task_id(task, key)) == wanted:
                return slot
        pytest.fail(f"call {call_id} of {task} is the call of no slot of the last 5 minutes")


@pytest.fixture
def make_setup(
    tmp_path: Path, redis_url: str, unique_name: Callable[[str], str]
) -> Iterator[Callable[..., Setup]]:
    store = redis.Redis.from_url(redis_url)

    def make(backend: str, env: dict[str, str], tag: str = "") -> Setup:
        # `tag` tells apart the parameters of a test: unique_name shortens the test's name
        (tmp_path / "schedapp.py").write_text(APP)
        name, prefix = unique_name(f"sched{tag}"), unique_name(f"rec{tag}:")
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TASKBRIDGE_")},
            "TBTEST_PREFIX": prefix,
            "TBTEST_NAME": name,
            "TBTEST_BACKEND": backend,
            "TBTEST_REDIS_URL": redis_url,
            "TASKBRIDGE_SCHEDULER_URL": redis_url,
            "TASKBRIDGE_SCHEDULER_LEASE": str(LEASE),
            **env,
        }
        return Setup(tmp_path, full_env, name, prefix, store)

    yield make
    store.close()


def _clean(process: WorkerProcess) -> None:
    process.stop()
    if process.process.stdout is not None:
        process.process.stdout.close()


@pytest.fixture
def processes(
    spawn_process: Callable[..., WorkerProcess],
) -> Iterator[Callable[[list[str], Setup], WorkerProcess]]:
    """Start `python -m <argv>` in the setup's directory with its environment."""
    started: list[WorkerProcess] = []

    def start(argv: list[str], setup: Setup) -> WorkerProcess:
        process = spawn_process([sys.executable, "-m", *argv], setup.env, setup.directory)
        started.append(process)
        return process

    yield start
    for process in started:
        _clean(process)


def engine_env(engine: str, redis_url: str, amqp_url: str | None, queue: str) -> dict[str, str]:
    """The TASKBRIDGE_BACKENDS__* variables of the `celery` or `arq` alias for `engine`."""
    if engine == "arq":
        return {
            "TASKBRIDGE_BACKENDS__ARQ__REDIS_URL": redis_url,
            "TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME": queue,
        }
    broker = amqp_url if engine == "celery-amqp" else redis_url
    assert broker is not None
    return {
        "TASKBRIDGE_BACKENDS__CELERY__BROKER_URL": broker,
        "TASKBRIDGE_BACKENDS__CELERY__RESULT_BACKEND": redis_url,
        "TASKBRIDGE_BACKENDS__CELERY__DEFAULT_QUEUE": queue,
        "TASKBRIDGE_BACKENDS__CELERY__KEY_PREFIX": queue + ":",
    }


def worker_argv(engine: str, queue: str) -> tuple[list[str], str]:
    """The worker's command line and the line it prints once ready."""
    if engine == "arq":
        return ["taskbridge.cli", "worker", "arq", "schedapp:bridge"], "taskbridge ARQ worker ready"
    argv = ["taskbridge.cli", "worker", "celery", "schedapp:bridge", "--hostname", f"{queue}@%h"]
    argv += ["--without-mingle", "--without-gossip", "--loglevel", "INFO", "--pool", "threads"]
    return argv, r"@\S+ ready\."


@contextlib.contextmanager
def amqp_queue_removed(url: str | None, queue: str) -> Iterator[None]:
    """Delete the RabbitMQ queue (and its exchange) the test's worker declared, after it."""
    try:
        yield
    finally:
        if url is not None:
            from kombu import Connection

            with Connection(url) as connection:
                channel = connection.channel()
                channel.queue_delete(queue)
                channel.exchange_delete(queue)


def arq_keys_removed(store: redis.Redis, ids: list[str]) -> None:
    """ARQ's job keys have fixed names the run-id clean-up cannot find: delete them."""
    from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
    from taskbridge_arq import DEDUP_KEY_PREFIX, PROGRESS_KEY_PREFIX

    prefixes = (
        job_key_prefix,
        result_key_prefix,
        in_progress_key_prefix,
        PROGRESS_KEY_PREFIX,
        DEDUP_KEY_PREFIX,
    )
    if ids:
        store.delete(*(prefix + call_id for call_id in ids for prefix in prefixes))


def dispatch_lines(*schedulers: WorkerProcess, schedule: str) -> Counter[str]:
    """How many times the schedulers logged dispatching each slot of `schedule`."""
    found: Counter[str] = Counter()
    pattern = re.compile(rf"schedule {re.escape(schedule)}: dispatched slot (\S+) of task")
    for scheduler in schedulers:
        found.update(pattern.findall(scheduler.output))
    return found


def _gaps(slots: list[datetime]) -> list[int]:
    seconds = sorted({int(slot.timestamp()) for slot in slots})
    return sorted(set(range(seconds[0], seconds[-1] + 1)) - set(seconds)) if seconds else []


def settled(
    setup: Setup, key: str = "tick", task: str | None = None, schedule: str | None = None
) -> list[datetime]:
    """The recorded slots once the runs of the slots up to the latest one are all recorded: a
    worker may run calls concurrently and record a slot after the next one. A slot still missing
    after 15 s is left for `assert_each_slot_once` to report."""
    deadline = time.monotonic() + 15
    slots = setup.slots(key, task, schedule)
    while _gaps(slots) and time.monotonic() < deadline:
        time.sleep(0.1)
        slots = setup.slots(key, task, schedule)
    return slots


def dispatch_times(scheduler: WorkerProcess, schedule: str) -> dict[datetime, float]:
    """When `scheduler` logged dispatching each slot of `schedule` (Unix time)."""
    pattern = re.compile(
        rf"^(\S+ \S+) INFO taskbridge\.scheduler: schedule {re.escape(schedule)}: "
        r"dispatched slot (\S+) of task",
        re.MULTILINE,
    )
    return {
        datetime.fromisoformat(slot): datetime.strptime(at, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for at, slot in pattern.findall(scheduler.output)
    }


def assert_each_slot_once(slots: list[datetime], at_least: int, *logs: WorkerProcess) -> None:
    """No slot twice, no slot missing between the first and the last, and enough of them
    (the output of `logs`, the processes involved, shown when not)."""
    shown = "\n".join(f"--- {' '.join(p.argv[2:])}\n{p.output}" for p in logs)
    counts = Counter(slots)
    twice = sorted(slot.isoformat() for slot, n in counts.items() if n > 1)
    assert not twice, f"slots run more than once: {twice}\n{shown}"
    seconds = sorted(int(slot.timestamp()) for slot in counts)
    missing = sorted(set(range(seconds[0], seconds[-1] + 1)) - set(seconds))
    assert not missing, f"slots never run: {missing} (ran {seconds})\n{shown}"
    assert len(seconds) >= at_least, f"only {len(seconds)} slots ran: {seconds}"


ENGINES = [
    pytest.param("celery-redis", id="celery-redis"),
    pytest.param("celery-amqp", id="celery-amqp"),
    pytest.param("arq", id="arq"),
]


@pytest.mark.parametrize("engine", ENGINES)
def test_two_schedulers_run_every_slot_once_and_survive_the_leaders_death(
    engine: str,
    request: pytest.FixtureRequest,
    redis_url: str,
    unique_name: Callable[[str], str],
    make_setup: Callable[..., Setup],
    processes: Callable[[list[str], Setup], WorkerProcess],
) -> None:
    amqp_url: str | None = request.getfixturevalue("amqp_url") if "amqp" in engine else None
    queue = unique_name(f"{engine}-q")
    alias = "arq" if engine == "arq" else "celery"
    setup = make_setup(alias, engine_env(engine, redis_url, amqp_url, queue), engine)
    with amqp_queue_removed(amqp_url, queue):
        argv, ready = worker_argv(engine, queue)
        worker = processes(argv, setup)
        worker.wait_for_output(ready, timeout=60)
        schedulers = [processes(["taskbridge.cli", "scheduler", "schedapp:bridge"], setup)]
        schedulers.append(processes(["taskbridge.cli", "scheduler", "schedapp:bridge"], setup))
        wait_until(lambda: any("became leader" in s.output for s in schedulers), 30, "a leader")
        wait_until(lambda: len(setup.records()) >= 22, 60, "22 slots to run")
        before = settled(setup)
        assert_each_slot_once(before, 22, worker, *schedulers)
        dispatched = dispatch_lines(*schedulers, schedule=setup.tick)
        assert max(dispatched.values()) == 1, dispatched

        # Kill the leader just after a slot ran, so that it dies between slots (a leader killed
        # between claiming and sending a slot loses that slot, by design: at most once).
        count = len(setup.records())
        wait_until(lambda: len(setup.records()) > count, 10, "the next slot")
        owner = setup.store.get(LEADER_KEY)
        assert owner is not None, "no scheduler holds the lease"
        leader_pid = int(owner.decode().split(":")[1])
        [leader] = [s for s in schedulers if s.process.pid == leader_pid]
        [standby] = [s for s in schedulers if s is not leader]
        killed_at = time.time()
        leader.signal(signal.SIGKILL)
        leader.process.wait(10)
        wait_until(lambda: "became leader" in standby.output, LEASE + 5, "the standby to lead")
        # the slots that fell during the takeover ran, each dispatched within the lease + 1 s of
        # its time
        first = datetime.fromtimestamp(int(killed_at) + 1, UTC)
        wait_until(
            lambda: sum(slot >= first for slot in setup.slots()) >= 4, 30, "4 slots after it"
        )
        slots = settled(setup)
        records = setup.records()
        assert_each_slot_once(slots, len(before) + 4, worker, *schedulers)
        taken_over = dispatch_times(standby, setup.tick)
        late = [
            (slot.isoformat(), round(taken_over[slot] - slot.timestamp(), 3))
            for slot in sorted(slot for slot in set(slots) if slot >= first)[:3]
        ]
        assert all(delay <= LEASE + 1 for _, delay in late), late
        dispatched = dispatch_lines(*schedulers, schedule=setup.tick)
        assert max(dispatched.values()) == 1, dispatched
        assert len(dispatched) >= len(set(slots)), (dispatched, slots)
        for scheduler in schedulers:
            _clean(scheduler)
        _clean(worker)
        if engine == "arq":
            arq_keys_removed(setup.store, [record["id"] for record in records])


def test_settings_add_a_schedule_and_disable_one_from_code(
    redis_url: str,
    unique_name: Callable[[str], str],
    make_setup: Callable[..., Setup],
    processes: Callable[[list[str], Setup], WorkerProcess],
) -> None:
    queue = unique_name("q")
    setup = make_setup("arq", engine_env("arq", redis_url, None, queue))
    added = unique_name("extra")
    setup.env["TASKBRIDGE_SCHEDULES"] = json.dumps(
        {
            added: {"task": setup.name + ".extra", "every": 1, "args": ["from-settings"]},
            setup.tick: {"enabled": False},
        }
    )
    argv, ready = worker_argv("arq", queue)
    worker = processes(argv, setup)
    worker.wait_for_output(ready, timeout=60)
    scheduler = processes(["taskbridge.cli", "scheduler", "schedapp:bridge"], setup)
    wait_until(lambda: len(setup.records("extra")) >= 4, 30, "4 slots of the added schedule")
    slots = settled(setup, "extra", setup.name + ".extra", added)
    records = setup.records("extra")
    assert_each_slot_once(slots, 4, worker, scheduler)
    assert {(r["label"], r["times"]) for r in records} == {("from-settings", 1)}
    assert setup.records("tick") == []  # 4 of its slots passed: disabled by the settings
    assert f"schedule {setup.tick}" not in scheduler.output
    _clean(scheduler)
    _clean(worker)
    arq_keys_removed(setup.store, [record["id"] for record in records])


def _uvicorn(setup: Setup, port: int, workers: int = 2) -> list[str]:
    return ["uvicorn", "schedapp:app", "--port", str(port), "--workers", str(workers)]


def test_in_process_schedule_runs_each_slot_once_across_api_processes(
    make_setup: Callable[..., Setup],
    processes: Callable[[list[str], Setup], WorkerProcess],
) -> None:
    setup = make_setup("inprocess", {})
    api = processes(_uvicorn(setup, free_port()), setup)
    wait_until(
        lambda: api.output.count("Application startup complete") >= 2, 60, "two API processes"
    )
    wait_until(lambda: len(setup.records()) >= 12, 60, "12 slots to run")
    slots = settled(setup)
    records = setup.records()
    assert_each_slot_once(slots, 12, api)
    # current_task() in a scheduled call names its schedule and slot
    assert [(r["schedule"], r["scheduled_at"]) for r in records] == [
        (setup.tick, slot.isoformat()) for slot in slots
    ]
    # every run happened in one of the API processes (the in-process backend)
    pids = {int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", api.output)}
    assert len(pids) == 2 and {r["pid"] for r in records} <= pids, (pids, records)


def test_on_startup_call_runs_once_when_api_processes_start_together(
    unique_name: Callable[[str], str],
    make_setup: Callable[..., Setup],
    processes: Callable[[list[str], Setup], WorkerProcess],
) -> None:
    setup = make_setup("inprocess", {"TBTEST_STARTUP": "1"})
    # no schedule for the in-process tick here: only the start-up call matters
    setup.env["TASKBRIDGE_SCHEDULES"] = json.dumps({setup.name + ".tick": {"enabled": False}})
    api = processes(_uvicorn(setup, free_port()), setup)
    wait_until(
        lambda: api.output.count("Application startup complete") >= 2, 60, "two API processes"
    )
    hello = setup.name + ".hello"
    # Both processes claimed before completing their start-up: one won, the other says so.
    assert api.output.count(f"on-startup call of {hello} dispatched") == 1, api.output
    assert api.output.count(f"on-startup call of {hello}: another process made it") == 1
    wait_until(lambda: setup.records("hello"), 10, "the on-startup call to run")
    # the in-process call has run by the time the other process's claim was refused
    assert len(setup.records("hello")) == 1


@pytest.mark.parametrize("engine", ["celery-redis", "arq"])
def test_a_queued_scheduled_call_knows_its_schedule_and_slot(
    engine: str,
    redis_url: str,
    unique_name: Callable[[str], str],
    make_setup: Callable[..., Setup],
    processes: Callable[[list[str], Setup], WorkerProcess],
) -> None:
    queue = unique_name(f"{engine}-q")
    setup = make_setup(engine.split("-")[0], engine_env(engine, redis_url, None, queue), engine)
    argv, ready = worker_argv(engine, queue)
    worker = processes(argv, setup)
    worker.wait_for_output(ready, timeout=60)
    scheduler = processes(["taskbridge.cli", "scheduler", "schedapp:bridge"], setup)
    try:
        wait_until(lambda: len(setup.records()) >= 3, 30, "3 slots to run")
        slots = setup.slots()
        assert [(r["schedule"], r["scheduled_at"]) for r in setup.records()[:3]] == [
            (setup.tick, slot.isoformat()) for slot in slots[:3]
        ]
    finally:
        _clean(scheduler)
        _clean(worker)
        if engine == "arq":
            arq_keys_removed(setup.store, [record["id"] for record in setup.records()])
