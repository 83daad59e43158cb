"""The Celery backend heals after broker faults: the API and a real worker behind a TCP proxy.

Both sides reach the broker only through a `FaultProxy`: the API (the FastAPI app served in this
process on its own event loop, as under uvicorn, requests sent with httpx's ASGI transport) and a
real `taskbridge worker celery` process (threads pool, 4 threads). Brokers: a redis-server of
the test's own (no persistence; the shared Redis is only used for records and results) and the
machine's RabbitMQ (a queue unique to the test, deleted after). The result backend does not go
through the proxy: only the broker link fails.

The proxy is cut (every connection reset, new ones refused) or frozen (connections open, nothing
forwarded) while 4 calls run (0.4 s each), 8 wait in the queue and 12 more requests arrive. Each
call records its request number, id and the time into lists of the shared Redis (a connection
that does not go through the proxy) when it starts and when it ends. After the heal:

- requests during the fault were answered 503 with Retry-After within the dispatch timeout, and
  none of them ran, except (frozen link) the one batch already written when it froze, which
  the link delivers when it heals (the README's guarantee table says so);
- requests after the heal are accepted at once (the API's publisher reconnects by itself);
- the worker process is alive and every accepted call ran, none twice. The calls running at a
  cut are delivered again after the reconnection: on RabbitMQ because their acks died with the
  connection, on Redis because they are older than `visibility_timeout` by then (see
  VISIBILITY_TIMEOUT). They had succeeded meanwhile, so the worker's claim in the result backend
  skips them ("not run: it already succeeded"): counted as redeliveries, not runs. A call still
  running when its message comes back (a task longer than the outage and the reconnection)
  would run twice: delivery is at least once. On Redis the test also waits until no message is
  left unacknowledged, within the README's redelivery bound, so that none comes back unseen;
- the first call starts again within a bound after the heal: about 0 s after a freeze (the
  connections survive), and after a cut when the worker's next reconnection attempt comes
  (pauses from 0.1 s growing by 0.4 s up to 2 s, where kombu's default grows from 2 s to 30 s):
  within 2 s of the heal.

Also a Redis restart with data loss (SIGKILL, started again empty on the same port): the worker
reconnects and runs the calls dispatched after the restart.

The worker side of these faults found two bugs, fixed in `taskbridge_celery/_worker.py`: the
periodic timers set at `worker_ready` (threads-pool wake-up, Redis restore) were cleared by
Celery at the first reconnection (calls then started in bursts every 2 s), and after a
reconnection to RabbitMQ a threads-pool worker could stop consuming for good (Celery's
prefetch restore sends basic.qos from a pool thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx2 as httpx
import pytest
import redis
from fastapi import FastAPI

from conftest import WorkerProcess, wait_until
from taskbridge import TaskBridge, Tasks

from .proxy import FaultProxy
from .servers import OwnRedis

pytest.importorskip("taskbridge_celery")

THREADS = 4
"""The worker's pool size: calls running at once (prefetch is one per thread, acks_late)."""
TASK_SECONDS = 0.4
DISPATCH_TIMEOUT = 1.0
"""A request during a fault is answered 503 after at most about this."""
RETRY_AFTER = "3"
VISIBILITY_TIMEOUT = 5.0
"""Redis broker: a taken, unacknowledged message is delivered again after this (the worker
checks every half of it). Longer than a call, as the README asks, and than the freeze; shorter
than a cut and the reconnection after it (6 s): kombu then restores the calls that were running
at the cut when the worker reconnects, before their late acks go through, and they are
delivered again (the claim in the result backend skips them: they had succeeded)."""
DOWN_SECONDS = 1.0
"""How long the test's Redis stays down when it is restarted."""
RECONNECT_SLACK = 1.0
"""Allowed beyond kombu's reconnection schedule (a loaded 2-core CI machine)."""

APP = '''
import os
import time

import redis

from taskbridge import TaskBridge, current_task

bridge = TaskBridge()
_client = redis.Redis.from_url(os.environ["HEAL_RECORD_URL"])  # thread-safe; not proxied


@bridge.task(name="heal.work", backend="celery")
def work(n: int, seconds: float) -> int:
    """Records its start (request number, call id, time), sleeps, records its end."""
    key = os.environ["HEAL_RECORD_KEY"]
    entry = f"{n} {current_task().id}"
    _client.rpush(key + ":started", f"{entry} {time.time()!r}")
    time.sleep(seconds)
    _client.rpush(key + ":done", f"{entry} {time.time()!r}")
    return n
'''


def build_api(options: dict[str, Any]) -> FastAPI:
    """The API: one call of the worker module's task (same name) per request."""
    bridge = TaskBridge(
        {
            "backends": {"celery": options},
            "dispatch_timeout": DISPATCH_TIMEOUT,
            "unavailable_retry_after": int(RETRY_AFTER),
        }
    )

    @bridge.task(name="heal.work", backend="celery")
    def work(n: int, seconds: float) -> int:
        """Runs in the worker only."""
        return n

    app = FastAPI(lifespan=bridge.lifespan)

    @app.post("/work/{n}")
    async def endpoint(n: int, tasks: Tasks) -> dict[str, Any]:
        handle = tasks.add_task(work, n, TASK_SECONDS)
        return {"n": n, "id": handle.id}

    return app


@dataclass
class Response:
    status: int
    seconds: float
    retry_after: str | None


class Api:
    """The app served on its own event-loop thread, lifespan included, so that requests keep
    arriving while the test thread holds a fault."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.responses: dict[int, Response] = {}
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._client: httpx.AsyncClient | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._served: concurrent.futures.Future[None] | None = None

    def __enter__(self) -> Api:
        self._thread.start()
        self._served = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        if not self._ready.wait(10):
            self._served.result(1)  # raises what failed
            pytest.fail("the API did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._served is not None
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        try:
            self._served.result(20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.app.router.lifespan_context(self.app):
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                self._client = client
                self._ready.set()
                await self._stop.wait()

    async def _post(self, n: int) -> None:
        assert self._client is not None
        started = time.monotonic()
        response = await self._client.post(f"/work/{n}")
        self.responses[n] = Response(
            response.status_code, time.monotonic() - started, response.headers.get("retry-after")
        )

    def fire(self, numbers: range) -> concurrent.futures.Future[list[None]]:
        """Send one request per number, concurrently; resolved once all are answered."""

        async def all_of() -> list[None]:
            return await asyncio.gather(*(self._post(n) for n in numbers))

        return asyncio.run_coroutine_threadsafe(all_of(), self.loop)

    def post(self, numbers: range) -> dict[int, int]:
        """Send them and return their statuses."""
        self.fire(numbers).result(30)
        return self.statuses(numbers)

    def statuses(self, numbers: range) -> dict[int, int]:
        return {n: self.responses[n].status for n in numbers}

    def accepted(self) -> set[int]:
        return {n for n, response in self.responses.items() if response.status == 200}


@dataclass
class Run:
    """One recorded start or end of a call."""

    n: int
    id: str
    at: float


@dataclass
class Rig:
    """A broker behind a proxy; a worker and the API both connected through it; the records."""

    broker: str
    proxy: FaultProxy
    options: dict[str, Any]
    records_url: str
    record_key: str
    store: redis.Redis
    """The shared test Redis (records), not through the proxy."""
    directory: Path
    spawn: Callable[..., WorkerProcess]
    own_redis: OwnRedis | None = None
    workers: list[WorkerProcess] = field(default_factory=list)

    def worker(self) -> WorkerProcess:
        env = {
            f"TASKBRIDGE_BACKENDS__CELERY__{option.upper()}": str(value)
            for option, value in self.options.items()
        }
        env |= {"HEAL_RECORD_URL": self.records_url, "HEAL_RECORD_KEY": self.record_key}
        args = ["worker", "celery", "healapp:bridge", "--pool", "threads"]
        args += ["--concurrency", str(THREADS), "--hostname", f"heal-{uuid.uuid4().hex[:6]}@%h"]
        args += ["--without-mingle", "--without-gossip", "--loglevel", "INFO"]
        worker = self.spawn(args, env=env, cwd=self.directory)
        self.workers.append(worker)
        worker.wait_for_output(r"@\S+ ready\.", 30)
        return worker

    def runs(self, phase: str = "done") -> list[Run]:
        entries = self.store.lrange(f"{self.record_key}:{phase}", 0, -1)
        parsed = (entry.decode().split() for entry in entries)
        return [Run(int(n), call, float(at)) for n, call, at in parsed]

    def ran(self, phase: str = "done") -> set[int]:
        return {run.n for run in self.runs(phase)}

    def duplicates(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for run in self.runs():
            counts[run.n] = counts.get(run.n, 0) + 1
        return {n: count for n, count in counts.items() if count > 1}

    def first_start_after(self, moment: float) -> float | None:
        """Seconds from `moment` (time.time()) to the first call starting after it."""
        later = [run.at for run in self.runs("started") if run.at >= moment]
        return min(later) - moment if later else None

    def unacknowledged(self) -> int:
        """Redis broker: messages taken by a worker and neither acknowledged nor restored."""
        assert self.own_redis is not None
        client = redis.Redis(port=self.own_redis.port, db=1)  # directly, not through the proxy
        try:
            return int(client.zcard(f"{self.options['key_prefix']}unacked_index"))
        finally:
            client.close()

    def settle(self, delivered_by: float) -> float | None:
        """Redis: wait until no taken message is left unacknowledged (one would be delivered
        again), within the README's bound after `delivered_by` (time.time()), so that every
        duplicate is counted; return when (seconds after `delivered_by`), or None if there was
        nothing to wait for. RabbitMQ delivers unacknowledged messages again at once, at the
        reconnection, before any other."""
        if self.broker != "redis" or self.unacknowledged() == 0:
            return None
        bound = delivered_by + VISIBILITY_TIMEOUT * 1.5 + RECONNECT_SLACK - time.time()
        what = "the unacknowledged messages to be delivered again (README's bound)"
        wait_until(lambda: self.unacknowledged() == 0, bound, what)
        return time.time() - delivered_by


def _through(url: str, proxy: FaultProxy) -> str:
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture(params=["redis", "amqp"])
def rig(
    request: pytest.FixtureRequest,
    redis_url: str,
    run_id: str,
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    unique_name: Callable[[str], str],
) -> Iterator[Rig]:
    broker: str = request.param
    own = uuid.uuid4().hex[:8]  # the test's name is cut short: parameters would share names
    queue = unique_name(f"{own}-q")
    own_redis: OwnRedis | None = None
    if broker == "redis":
        own_redis = OwnRedis(tmp_path / "broker")
        own_redis.start()
        broker_url = f"redis://127.0.0.1:{own_redis.port}/1"
    else:
        broker_url = request.getfixturevalue("amqp_url")
    parts = urlsplit(broker_url)
    target = (parts.hostname or "127.0.0.1", parts.port or (6379 if broker == "redis" else 5672))
    (tmp_path / "healapp.py").write_text(APP)
    store = redis.Redis.from_url(redis_url)
    try:
        with FaultProxy(target) as proxy:
            options: dict[str, Any] = {
                "broker_url": _through(broker_url, proxy),
                "result_backend": redis_url,
                "default_queue": queue,
                "key_prefix": f"{run_id}:heal:{own}:",
            }
            if broker == "redis":
                options["visibility_timeout"] = VISIBILITY_TIMEOUT
            rig = Rig(
                broker,
                proxy,
                options,
                redis_url,
                unique_name(f"{own}-runs"),
                store,
                tmp_path,
                spawn_worker,
                own_redis,
            )
            try:
                yield rig
            finally:
                for worker in rig.workers:  # before the queue goes: it would be declared again
                    worker.stop()
    finally:
        store.close()
        if own_redis is not None:
            own_redis.stop()
            shutil.rmtree(own_redis.workdir, ignore_errors=True)
        if broker == "amqp":
            from kombu import Connection

            with Connection(broker_url) as connection:
                channel = connection.channel()
                channel.queue_delete(queue)
                channel.exchange_delete(queue)


def _hold(seconds: float, api: Api, waves: list[tuple[float, range]]) -> list[Any]:
    """Hold the fault in place for `seconds`, sending each wave of requests at its offset."""
    started = time.monotonic()
    fired = []
    for offset, numbers in waves:
        time.sleep(max(0.0, started + offset - time.monotonic()))
        fired.append(api.fire(numbers))
    time.sleep(max(0.0, started + seconds - time.monotonic()))
    return fired


def _wait(
    worker: WorkerProcess, predicate: Callable[[], object], timeout: float, what: str
) -> None:
    """`wait_until`, failing with the worker's output."""
    try:
        wait_until(predicate, timeout, what)
    except pytest.fail.Exception as exc:
        pytest.fail(f"{exc}; the worker's output:\n{worker.output[-8000:]}")


def _redelivered(worker: WorkerProcess) -> int:
    """Messages the worker got again after their call had succeeded (and did not run)."""
    return len(re.findall(r"not run: it already succeeded", worker.output))


@pytest.mark.parametrize(
    ("fault", "seconds", "recovery_bound"),
    [
        # The worker tries again 0.1, 0.6, 1.5, 2.8, 4.5, ... s after the loss (pauses from
        # 0.1 s growing by 0.4 s up to 2 s): after a 2.5 s cut, within 2 s of the heal.
        ("cut", 2.5, 2.0 + RECONNECT_SLACK),
        # The connections stay open: held bytes flow on at the heal.
        ("freeze", 3.0, RECONNECT_SLACK),
    ],
)
def test_worker_and_api_heal_after_a_broker_fault(
    rig: Rig, fault: str, seconds: float, recovery_bound: float
) -> None:
    worker = rig.worker()
    before, during, after = range(0, 12), range(100, 112), range(200, 208)
    waves = [(0.2, during[0:4]), (0.9, during[4:8]), (seconds - 1.3, during[8:12])]
    with Api(build_api(rig.options)) as api:
        assert set(api.post(before).values()) == {200}
        wait_until(lambda: len(rig.ran("started")) >= THREADS, 15, f"{THREADS} calls to start")
        fault_at = time.time()
        getattr(rig.proxy, fault)()
        fired = _hold(seconds, api, waves)
        rig.proxy.heal()
        healed_at = time.time()
        after_statuses = api.post(after)
        for future in fired:
            future.result(30)
        accepted = api.accepted()
        _wait(worker, lambda: accepted <= rig.ran(), 30, "every accepted call to run")
        settled = rig.settle(delivered_by=fault_at)

    running = {run.n for run in rig.runs("started") if run.at < fault_at}
    refused = {n for n in during if api.responses[n].status == 503}
    ghosts = refused & rig.ran()
    recovery = rig.first_start_after(healed_at)
    duplicates = rig.duplicates()
    slowest = max(api.responses[n].seconds for n in during)
    print(
        f"\n[{rig.broker}] {fault} {seconds}s: {len(running)} running at the fault; "
        f"{len(refused)}/{len(during)} dispatches during it answered 503 (slowest "
        f"{slowest:.2f}s), {len(ghosts)} of those ran anyway {sorted(ghosts)}; "
        f"{sum(s == 200 for s in after_statuses.values())}/{len(after)} accepted after the heal; "
        f"first call started {recovery if recovery is None else round(recovery, 3)}s after the "
        f"heal; {len(accepted)} accepted, {len(rig.ran() & accepted)} ran; "
        f"{_redelivered(worker)} delivered again after succeeding (not run)"
        f"{'' if settled is None else f', the last ack {settled:.1f}s after the fault'}; "
        f"{len(duplicates)} ran twice {duplicates}"
    )
    assert len(running) == THREADS
    assert refused == set(during), "nothing can be accepted through a cut or frozen link"
    assert all(api.responses[n].retry_after == RETRY_AFTER for n in refused)
    assert slowest < DISPATCH_TIMEOUT + 0.5
    if fault == "cut":
        assert not ghosts, "a call answered 503 ran"
    else:  # only the first wave's batch left before the freeze held it
        assert ghosts <= set(waves[0][1]), f"calls answered 503 ran: {sorted(ghosts)}"
    assert set(after_statuses.values()) == {200}, "the API's publisher reconnects at once"
    assert set(before) | set(after) <= rig.ran()
    assert not duplicates, f"calls ran twice: {duplicates}"
    assert worker.process.poll() is None, worker.output
    assert recovery is not None and recovery <= recovery_bound, worker.output[-4000:]


@pytest.mark.parametrize("rig", ["redis"], indirect=True)
def test_worker_and_api_reconnect_to_a_redis_restarted_empty(rig: Rig) -> None:
    assert rig.own_redis is not None
    worker = rig.worker()
    before, down, after = range(0, 12), range(100, 104), range(200, 208)
    with Api(build_api(rig.options)) as api:
        assert set(api.post(before).values()) == {200}
        wait_until(lambda: len(rig.ran("started")) >= THREADS, 15, f"{THREADS} calls to start")
        killed_at = time.time()
        rig.own_redis.kill()  # no persistence: the queued calls are gone with it
        fired = _hold(DOWN_SECONDS, api, [(0.3, down)])
        rig.own_redis.start()  # same port, empty
        restarted_at = time.time()
        after_statuses = api.post(after)
        fired[0].result(30)
        down_statuses = api.statuses(down)
        _wait(
            worker, lambda: set(after) <= rig.ran(), 30, "the calls sent after the restart to run"
        )

    recovery = rig.first_start_after(restarted_at)
    lost = set(before) - rig.ran()
    running = {run.n for run in rig.runs("started") if run.at < killed_at}
    print(
        f"\n[redis] restart with data loss after {restarted_at - killed_at:.2f}s: "
        f"{len(running)} running at the kill (finished: {len(running & rig.ran())}), "
        f"{len(lost)} queued calls lost with the data; "
        f"{sum(s == 503 for s in down_statuses.values())}/{len(down)} answered 503 while down; "
        f"{sum(s == 200 for s in after_statuses.values())}/{len(after)} accepted after; "
        f"first call started {recovery if recovery is None else round(recovery, 3)}s after "
        f"the restart; {len(rig.duplicates())} ran twice"
    )
    assert set(down_statuses.values()) == {503}
    assert not set(down) & rig.ran()
    assert set(after_statuses.values()) == {200}, "the API's publisher reconnects at once"
    assert not rig.duplicates()
    assert worker.process.poll() is None, worker.output
    # kombu's attempts come 0, 2, 6, ... s after the loss: the one 2 s after it finds Redis.
    assert recovery is not None and recovery <= 2 - DOWN_SECONDS + RECONNECT_SLACK
