"""The ARQ worker heals after broker faults: a real `taskbridge worker arq` behind a TCP proxy.

The worker reaches a redis-server of the test's own (no persistence) only through a
`FaultProxy`, which the test cuts (every connection reset, new ones refused), freezes
(connections open, nothing forwarded: a hung link), or points at a second redis-server (a
failover); the server is also killed and started again empty (a restart with data loss). Jobs
are enqueued by the test over a direct connection to the server, so they are accepted during a
fault too.

Each job records its number, id and the time into lists of the shared test Redis (a connection
the proxy does not touch) when it starts and when it ends. After the fault: the worker process
is the same and still running, every accepted job ran, none twice, its outcome is stored, and
the time from the heal to the first job starting again is measured (printed with `-s`). The
`--health-file` exists exactly while the worker is connected; a worker started while Redis is
unreachable waits for it (a `--burst` one gives up after `conn_retries`), and one stopped then
exits at once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from conftest import WorkerProcess, wait_until
from taskbridge import TaskBridge
from tests.faults.proxy import FaultProxy
from tests.faults.servers import OwnRedis

pytest.importorskip("taskbridge_arq")

pytestmark = pytest.mark.timeout(60)

MAX_JOBS = 4
"""Jobs the worker runs at once."""
TASK_SECONDS = 0.5
"""How long each job runs."""
SOCKET_TIMEOUT = 1.0
"""The worker's socket_timeout: a command on a hung link fails after this."""
JOB_TIMEOUT = 10
"""A job's lock lives JOB_TIMEOUT + 11 s: longer than any fault here, so no job may run twice."""
RECOVERY_BOUND = 6.0
"""Longest accepted time from the end of a fault to a job starting again: the backoff's
longest pause (2 s), plus a connection attempt hung until the socket_timeout, plus a poll,
with room for a loaded 2-core CI machine."""
DB = 1

APP = '''
import asyncio
import os
import time

import redis.asyncio

from taskbridge import TaskBridge, current_task

bridge = TaskBridge()
_clients = []


def _client():
    if not _clients:  # not through the proxy: only the broker link fails
        _clients.append(redis.asyncio.Redis.from_url(os.environ["HEAL_RECORD_URL"]))
    return _clients[0]


@bridge.task(name="heal.work", backend="arq")
async def work(n: int, seconds: float) -> int:
    """Records its start (number, job id, time), sleeps, records its end (and the time)."""
    key = os.environ["HEAL_RECORD_KEY"]
    job = current_task().id
    await _client().rpush(key + ":started", f"{n} {job} {time.time()!r}")
    await asyncio.sleep(seconds)
    await _client().rpush(key + ":done", f"{n} {job} {time.time()!r}")
    return n
'''


@dataclass
class Run:
    """One recorded start or end of a job."""

    n: int
    id: str
    at: float


@dataclass
class Rig:
    """A broker behind a proxy, a worker connected through it, and the records of what ran."""

    server: OwnRedis
    proxy: FaultProxy
    queue: str
    record_key: str
    store: redis.Redis
    store_url: str
    directory: Path
    spawn: Callable[..., WorkerProcess]
    health_file: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(
        self, *args: str, wait: bool = True, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        env = (env or {}) | {
            "TASKBRIDGE_BACKENDS__ARQ__REDIS_URL": f"redis://127.0.0.1:{self.proxy.port}/{DB}",
            "TASKBRIDGE_BACKENDS__ARQ__QUEUE_NAME": self.queue,
            "TASKBRIDGE_BACKENDS__ARQ__MAX_JOBS": str(MAX_JOBS),
            "TASKBRIDGE_BACKENDS__ARQ__JOB_TIMEOUT": str(JOB_TIMEOUT),
            "TASKBRIDGE_BACKENDS__ARQ__SOCKET_TIMEOUT": str(SOCKET_TIMEOUT),
            "HEAL_RECORD_URL": self.store_url,
            "HEAL_RECORD_KEY": self.record_key,
        }
        argv = ["worker", "arq", "arqhealapp:bridge", "--health-file", str(self.health_file)]
        worker = self.spawn([*argv, *args], env=env, cwd=self.directory)
        self.workers.append(worker)
        if wait:
            worker.wait_for_output("taskbridge ARQ worker ready", 30)
        return worker

    def enqueue(self, numbers: range, seconds: float, port: int | None = None) -> dict[int, str]:
        """Enqueue `work(n, seconds)` for each n, directly on the server on `port` (default:
        the rig's); returns each n's job id. All are accepted: Redis stored them."""
        url = f"redis://127.0.0.1:{port or self.server.port}/{DB}"
        bridge = TaskBridge({"backends": {"arq": {"redis_url": url, "queue_name": self.queue}}})

        @bridge.task(name="heal.work", backend="arq")
        async def work(n: int, seconds: float) -> int:
            """Runs in the worker only."""
            return n

        async def go() -> dict[int, str]:
            await bridge.open()
            try:
                return {n: (await work.enqueue(n, seconds)).id for n in numbers}
            finally:
                await bridge.close()

        return asyncio.run(go())

    def runs(self, phase: str) -> list[Run]:
        entries = self.store.lrange(f"{self.record_key}:{phase}", 0, -1)
        parsed = (entry.decode().split() for entry in entries)
        return [Run(int(n), job, float(at)) for n, job, at in parsed]

    def wait_ran(self, jobs: dict[int, str], timeout: float = 30) -> None:
        """Wait until every job in `jobs` ended; fail with the worker's output if not."""
        deadline = time.monotonic() + timeout
        while not set(jobs.values()) <= {run.id for run in self.runs("done")}:
            if time.monotonic() > deadline:
                missing = set(jobs.values()) - {run.id for run in self.runs("done")}
                output = "\n\n".join(w.output[-4000:] for w in self.workers)
                pytest.fail(f"{len(missing)} accepted job(s) never ran: {missing}\n{output}")
            time.sleep(0.05)

    def assert_each_ran_once(self, jobs: dict[int, str]) -> None:
        for phase in ("started", "done"):
            counts: dict[str, int] = {}
            for run in self.runs(phase):
                counts[run.id] = counts.get(run.id, 0) + 1
            twice = {job: count for job, count in counts.items() if count > 1}
            assert not twice, f"job(s) {phase} more than once: {twice}"
            assert set(jobs.values()) <= set(counts)

    def first_start_after(self, moment: float) -> float:
        later = [run.at for run in self.runs("started") if run.at >= moment]
        assert later, "no job started after the fault"
        return min(later) - moment

    def assert_settled(self, jobs: dict[int, str], client: redis.Redis) -> None:
        """Every job's success is stored on the server behind `client`; none is left queued
        or locked."""

        def settled() -> bool:
            if client.zcard(self.queue):
                return False
            if any(client.exists(f"arq:in-progress:{job}") for job in jobs.values()):
                return False
            return all(client.exists(f"arq:result:{job}") for job in jobs.values())

        wait_until(settled, 10, "every outcome to be stored")
        for job in jobs.values():
            raw = client.get(f"arq:result:{job}")
            assert raw is not None and json.loads(raw)["s"] is True, job


@pytest.fixture
def rig(
    tmp_path: Path,
    redis_url: str,
    spawn_worker: Callable[..., WorkerProcess],
    unique_name: Callable[[str], str],
) -> Iterator[Rig]:
    (tmp_path / "arqhealapp.py").write_text(APP)
    server = OwnRedis(tmp_path / "broker")
    server.start()
    store = redis.Redis.from_url(redis_url)
    record_key = unique_name("runs")
    try:
        with FaultProxy(("127.0.0.1", server.port)) as proxy:
            rig = Rig(
                server,
                proxy,
                unique_name("q"),
                record_key,
                store,
                redis_url,
                tmp_path,
                spawn_worker,
                tmp_path / "worker.health",
            )
            try:
                yield rig
            finally:
                for worker in rig.workers:
                    worker.stop()
    finally:
        store.delete(f"{record_key}:started", f"{record_key}:done")
        store.close()
        server.stop()


def _hold(until: float) -> None:
    """Keep the fault on until `until` (time.time())."""
    time.sleep(max(0.0, until - time.time()))


def _report(what: str, seconds: float) -> None:
    print(f"\n[arq healing] {what}: {seconds:.2f}s")


@pytest.mark.parametrize(("fault", "seconds"), [("cut", 2.0), ("freeze", 3.0)])
def test_a_failed_link_heals_and_every_job_runs_once(rig: Rig, fault: str, seconds: float) -> None:
    worker = rig.start_worker()
    first = rig.enqueue(range(0, 12), TASK_SECONDS)
    wait_until(lambda: len(rig.runs("started")) >= MAX_JOBS, 15, "the first jobs to run")
    began = time.time()
    rig.proxy.cut() if fault == "cut" else rig.proxy.freeze()
    during = rig.enqueue(range(12, 20), TASK_SECONDS)  # stored by Redis, out of the worker's reach
    _hold(began + seconds)
    rig.proxy.heal()
    healed = time.time()
    jobs = first | during

    rig.wait_ran(jobs)
    recovered = rig.first_start_after(healed)
    _report(f"{fault} {seconds}s: heal -> first job started", recovered)
    assert worker.process.poll() is None, "the worker must survive the fault"
    assert rig.workers == [worker]
    rig.assert_each_ran_once(jobs)
    # jobs that were running when the link failed finished during the fault...
    ended_during = {run.id for run in rig.runs("done") if began < run.at < healed}
    assert ended_during, "the fault must catch jobs running"
    # ...and their outcomes, kept by the worker, were stored once the link was back
    with rig.server.client(DB) as client:
        rig.assert_settled(jobs, client)
    assert recovered < RECOVERY_BOUND


def test_a_redis_restart_with_data_loss_heals(rig: Rig) -> None:
    worker = rig.start_worker()
    before = rig.enqueue(range(0, 4), 0.1)
    rig.wait_ran(before)
    rig.server.kill()
    killed = time.time()
    _hold(killed + 1.0)
    rig.server.start()  # same port, empty
    restarted = time.time()
    after = rig.enqueue(range(4, 12), TASK_SECONDS)

    rig.wait_ran(after)
    recovered = rig.first_start_after(restarted)
    _report("restart: Redis back -> first job started", recovered)
    assert worker.process.poll() is None
    rig.assert_each_ran_once(before | after)
    with rig.server.client(DB) as client:
        rig.assert_settled(after, client)
        # ARQ's health-check key, lost with the data, is written again
        wait_until(lambda: client.exists(f"{rig.queue}:health-check"), 5, "the health check")
    assert recovered < RECOVERY_BOUND


def test_a_failover_to_another_redis_heals_without_a_restart(rig: Rig, tmp_path: Path) -> None:
    worker = rig.start_worker()
    before = rig.enqueue(range(0, 4), 0.1)
    rig.wait_ran(before)
    other = OwnRedis(tmp_path / "failover")
    other.start()
    try:
        rig.proxy.retarget(("127.0.0.1", other.port))
        moved = time.time()
        after = rig.enqueue(range(4, 12), TASK_SECONDS, port=other.port)

        rig.wait_ran(after)
        recovered = rig.first_start_after(moved)
        _report("failover: retarget -> first job started", recovered)
        assert worker.process.poll() is None
        assert rig.workers == [worker]
        rig.assert_each_ran_once(before | after)
        with other.client(DB) as client:
            rig.assert_settled(after, client)
            wait_until(lambda: client.exists(f"{rig.queue}:health-check"), 5, "the health check")
        assert recovered < RECOVERY_BOUND
    finally:
        other.stop()


def test_the_health_file_exists_exactly_while_the_worker_is_connected(rig: Rig) -> None:
    worker = rig.start_worker()
    health = rig.health_file
    wait_until(health.exists, 10, "the health file")
    content = json.loads(health.read_text())
    assert content["connected"] is True and content["pid"] == worker.process.pid

    began = time.time()
    rig.proxy.cut()
    wait_until(lambda: not health.exists(), 5, "the health file to go during the cut")
    _report("cut -> health file removed (idle worker)", time.time() - began)
    _hold(began + 2.0)
    assert not health.exists()
    rig.proxy.heal()
    healed = time.time()
    wait_until(health.exists, RECOVERY_BOUND, "the health file to come back")
    _report("heal -> health file back", time.time() - healed)
    assert worker.process.poll() is None

    jobs = rig.enqueue(range(0, 2), 0.1)
    rig.wait_ran(jobs)
    assert worker.stop() == 0
    assert not health.exists(), "a stopped worker is not a healthy one"


def test_a_worker_started_while_redis_is_unreachable_waits_for_it(rig: Rig) -> None:
    rig.proxy.cut()
    worker = rig.start_worker(wait=False)
    jobs = rig.enqueue(range(0, 4), 0.1)
    worker.wait_for_output("cannot reach the broker", 30)
    began = time.time()
    _hold(began + 2.0)
    assert worker.process.poll() is None, "the worker must keep trying, not exit"
    assert not rig.health_file.exists()
    rig.proxy.heal()
    healed = time.time()
    worker.wait_for_output("taskbridge ARQ worker ready", 30)
    rig.wait_ran(jobs)
    _report("start-up: heal -> first job started", rig.first_start_after(healed))
    assert rig.health_file.exists()
    rig.assert_each_ran_once(jobs)
    # the outage was logged once, not once per attempt
    assert worker.output.count("cannot reach the broker") == 1, worker.output
    assert "lost the broker" not in worker.output, "it never had it"


def test_a_worker_stops_at_once_while_redis_is_unreachable(rig: Rig) -> None:
    rig.proxy.cut()
    worker = rig.start_worker(wait=False)
    worker.wait_for_output("cannot reach the broker", 30)
    began = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.process.wait(10) == 0
    _report("SIGTERM while disconnected -> exit", time.monotonic() - began)
    assert not rig.health_file.exists()


def test_a_burst_worker_gives_up_after_conn_retries(rig: Rig) -> None:
    rig.proxy.cut()
    retries = {
        "TASKBRIDGE_BACKENDS__ARQ__CONN_RETRIES": "2",
        "TASKBRIDGE_BACKENDS__ARQ__CONN_RETRY_DELAY": "0.1",
    }
    worker = rig.start_worker("--burst", wait=False, env=retries)
    assert worker.process.wait(30) == 1
    worker.wait_for_output("cannot reach Redis at .* at worker start-up")
