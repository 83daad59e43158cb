"""At-least-once delivery of the Celery backend when workers die, with real worker processes.

A worker with four prefork children takes four of 200 queued calls, which wait at a "gate" (a
Redis key) so that the fault strikes while they run and the rest are queued. Then:

- SIGKILL of the worker's whole process group: nothing acknowledges the four running calls. A
  new worker runs the 196 queued ones at once; RabbitMQ requeues the four as soon as the dead
  connection closes, and the Redis transport delivers them again once they are older than
  `visibility_timeout` (checked every `restore_interval`). Every call runs.
- SIGTERM of the worker's main process (what `docker stop` or systemd sends): warm shutdown. The
  four running calls finish there and are acknowledged; the new worker runs the rest once each.
- SIGTERM of the whole process group (a terminal's Ctrl-C, `kill -- -pgid`): the children die
  with the signal, the main process rejects their messages back to the queue
  (task_reject_on_worker_lost) and the new worker runs them again.

Each call records its id into Redis keys named with the run id: a set when it starts, a set and a
per-id counter when it finishes. No sleeps synchronise anything: every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import WorkerProcess, wait_until
from taskbridge import TaskBridge

pytest.importorskip("taskbridge_celery")

CALLS = 200
CHILDREN = 4
VISIBILITY_TIMEOUT = 2.0
"""Short, so that the Redis transport delivers unacknowledged messages again within the test."""

APP = '''
import os
import time

import redis

from taskbridge import TaskBridge, current_task

bridge = TaskBridge()
_client = None


def _redis():
    global _client
    if _client is None or _client.connection_pool.pid != os.getpid():
        _client = redis.Redis.from_url(os.environ["FAULT_REDIS_URL"])
    return _client


@bridge.task(name="fault.work", backend="celery")
def work(index: int) -> int:
    """Records its start, waits while the gate key exists (at most 20 s), records its end."""
    task_id = current_task().id
    prefix = os.environ["FAULT_PREFIX"]
    client = _redis()
    client.sadd(prefix + "started", task_id)
    deadline = time.monotonic() + 20
    while client.exists(prefix + "gate") and time.monotonic() < deadline:
        time.sleep(0.01)
    with client.pipeline() as pipe:
        pipe.sadd(prefix + "done", task_id)
        pipe.hincrby(prefix + "runs", task_id, 1)
        pipe.hset(prefix + "ran_by", task_id, os.environ["FAULT_WORKER"])
        pipe.execute()
    return index
'''


@dataclass
class Scenario:
    """A broker, the alias options the workers and the dispatcher share, and Redis to read."""

    broker: str
    options: dict[str, Any]
    prefix: str
    redis_url: str
    directory: Path
    spawn: Callable[..., WorkerProcess]
    store: redis.Redis
    workers: list[WorkerProcess] = field(default_factory=list)

    def key(self, name: str) -> str:
        return self.prefix + name

    def worker(self, name: str, pool: str = "prefork") -> WorkerProcess:
        env = {
            f"TASKBRIDGE_BACKENDS__CELERY__{option.upper()}": str(value)
            for option, value in self.options.items()
            if option != "celery"
        }
        for setting, value in self.options.get("celery", {}).items():
            env[f"TASKBRIDGE_BACKENDS__CELERY__CELERY__{setting.upper()}"] = json.dumps(value)
        env |= {
            "FAULT_REDIS_URL": self.redis_url,
            "FAULT_PREFIX": self.prefix,
            "FAULT_WORKER": name,
        }
        concurrency = CHILDREN if pool == "prefork" else 2 * CHILDREN
        args = ["worker", "celery", "faultapp:bridge", "--pool", pool]
        args += [
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}-{uuid.uuid4().hex[:6]}@%h",
        ]
        args += ["--without-mingle", "--without-gossip", "--loglevel", "INFO"]
        worker = self.spawn(args, env=env, cwd=self.directory)
        self.workers.append(worker)
        worker.wait_for_output(r"@\S+ ready\.", 30)
        return worker

    def dispatch(self, count: int) -> list[str]:
        """Send `count` calls in one batch; return their ids."""
        bridge = TaskBridge({"backends": {"celery": self.options}})

        @bridge.task(name="fault.work", backend="celery")
        def work(index: int) -> int:
            """Runs in the workers only."""
            return index

        async def send() -> list[str]:
            await bridge.open()
            try:
                batch = [bridge.prepare(work, (i,), {}) for i in range(count)]
                await bridge.dispatch(batch)
                return [call.id for _, call in batch]
            finally:
                await bridge.close()

        return asyncio.run(send())

    def members(self, name: str) -> set[str]:
        return {m.decode() for m in self.store.smembers(self.key(name))}

    def runs(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.store.hgetall(self.key("runs")).items()}

    def ran_by(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.store.hgetall(self.key("ran_by")).items()}

    def start_held(self) -> tuple[WorkerProcess, list[str], set[str]]:
        """Close the gate, start worker A, queue the calls; return once A runs CHILDREN of them
        (its prefetch: the other calls are still in the broker's queue)."""
        self.store.set(self.key("gate"), 1, ex=120)
        first = self.worker("A")
        ids = self.dispatch(CALLS)
        wait_until(
            lambda: len(self.members("started")) >= CHILDREN, 20, f"{CHILDREN} calls to start"
        )
        running = self.members("started")
        assert len(running) == CHILDREN and not self.members("done")
        return first, ids, running

    def open_gate(self) -> None:
        self.store.delete(self.key("gate"))


@pytest.fixture(params=["redis", "amqp"])
def scenario(
    request: pytest.FixtureRequest,
    redis_url: str,
    run_id: str,
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    unique_name: Callable[[str], str],
) -> Iterator[Scenario]:
    broker = request.param
    broker_url = redis_url if broker == "redis" else request.getfixturevalue("amqp_url")
    queue = unique_name("q")
    prefix = f"{run_id}:faults:{uuid.uuid4().hex[:8]}:"
    options: dict[str, Any] = {
        "broker_url": broker_url,
        "result_backend": redis_url,
        "default_queue": queue,
        "key_prefix": prefix,
    }
    if broker == "redis":
        options["visibility_timeout"] = VISIBILITY_TIMEOUT
        # A worker killed while restoring holds kombu's restore mutex until it expires (300 s
        # by default): keep that short too.
        options["celery"] = {"broker_transport_options": {"unacked_mutex_expire": 5}}
    (tmp_path / "faultapp.py").write_text(APP)
    store = redis.Redis.from_url(redis_url)
    scenario = Scenario(broker, options, prefix, redis_url, tmp_path, spawn_worker, store)
    try:
        yield scenario
    finally:
        store.close()
        for worker in scenario.workers:  # before the queue goes: a consumer would declare it again
            worker.stop()
        if broker == "amqp":
            from kombu import Connection

            with Connection(broker_url) as connection:
                channel = connection.channel()
                channel.queue_delete(queue)
                channel.exchange_delete(queue)


def _stopped(worker: WorkerProcess, timeout: float = 20) -> int:
    try:
        return worker.process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit within {timeout}s; output:\n{worker.output}")


def test_sigkill_of_a_busy_worker_loses_no_call(scenario: Scenario) -> None:
    first, ids, running = scenario.start_held()

    killed_at = time.monotonic()
    first.signal(signal.SIGKILL)  # the whole process group: main process and children
    assert _stopped(first) == -signal.SIGKILL
    scenario.open_gate()
    second = scenario.worker("B", pool="threads")
    ready_at = time.monotonic()

    def redelivered() -> bool:
        return running <= scenario.members("done")

    wait_until(redelivered, 30, "the calls running at the kill to run again")
    redelivery = time.monotonic() - killed_at
    wait_until(lambda: len(scenario.members("done")) >= CALLS, 30, f"all {CALLS} calls")
    runs = scenario.runs()
    assert set(runs) == set(ids)  # every call ran at least once (to its end)
    assert all(count >= 1 for count in runs.values())
    ran_by = scenario.ran_by()
    assert {ran_by[i] for i in running} == {"B"}
    if scenario.broker == "redis":
        # Due once older than the visibility timeout; found by the next periodic check.
        assert redelivery >= VISIBILITY_TIMEOUT * 0.9
        assert redelivery <= VISIBILITY_TIMEOUT + 1.0 + 10  # + restore interval + start-up
    print(
        f"\n[{scenario.broker}] SIGKILL: {len(running)} running calls ran again "
        f"{redelivery:.2f}s after the kill ({time.monotonic() - ready_at:.2f}s after the new "
        f"worker was ready); {sum(runs.values()) - len(runs)} duplicate run(s)"
    )
    assert second.process.poll() is None


# The group case is the pool's own requeue, the same on both brokers: Redis only.
@pytest.mark.parametrize(
    ("scenario", "target"),
    [("redis", "main"), ("amqp", "main"), ("redis", "group")],
    indirect=["scenario"],
)
def test_sigterm_finishes_or_reruns_running_calls_and_loses_none(
    scenario: Scenario, target: str
) -> None:
    first, ids, running = scenario.start_held()

    if target == "main":  # docker stop, systemd: warm shutdown
        first.process.send_signal(signal.SIGTERM)
        first.wait_for_output(r"worker: Warm shutdown \(MainProcess\)", 10)
    else:  # the whole group: the children die of it
        first.signal(signal.SIGTERM)
        first.wait_for_output(r"WorkerLostError|Warm shutdown", 10)
    scenario.open_gate()
    assert _stopped(first) == 0, first.output
    finished_by_a = {i for i, name in scenario.ran_by().items() if name == "A"}

    second = scenario.worker("B", pool="threads")
    wait_until(lambda: len(scenario.members("done")) >= CALLS, 30, f"all {CALLS} calls")
    runs, ran_by = scenario.runs(), scenario.ran_by()
    assert set(runs) == set(ids)
    if target == "main":
        # Warm shutdown: the running calls completed in A and were acknowledged there.
        assert finished_by_a == running
        assert all(runs[i] == 1 for i in ids), "no call ran twice"
    else:
        # The children were killed: their calls were requeued and run by B.
        assert {ran_by[i] for i in running} == {"B"}
    print(
        f"\n[{scenario.broker}] SIGTERM ({target}): {len(finished_by_a)} call(s) finished in the "
        f"stopping worker, {sum(runs.values()) - len(runs)} duplicate run(s)"
    )
    assert second.process.poll() is None
