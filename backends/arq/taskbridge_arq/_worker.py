"""The ARQ worker for a bridge (its job functions are in `_jobs`).

Compared with ARQ's Worker, a taskbridge worker also: polls as soon as work is announced
(`_wakeups`); claims the due jobs of a poll in one Lua script, which records each attempt's start
time as the value of ARQ's in-progress key; verifies signatures (with a `signing_key`); stores
progress the tasks report (`_progress`); moves each job through the call index (`_index`) in
the same script or transaction as the write that changes its state; never aborts a running `def`
task, whose thread could not be stopped (the job would read "cancelled" while the task runs on);
and heals after Redis faults instead of exiting (see `TaskbridgeWorker`: "Redis faults").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import uuid
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from arq.connections import ArqRedis
from arq.constants import (
    abort_job_max_age,
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    retry_key_prefix,
)
from arq.constants import result_key_prefix as result_prefix
from arq.utils import timestamp_ms, to_ms
from arq.worker import Function, Worker
from redis.asyncio.client import PubSub
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskbridge.backends import MOVE_SCRIPT, ConnectionState, composed_args, run_with_index

from ._dispatch import WAKE_CHANNEL_PREFIX
from ._index import CLAIM_THEN, IndexSpec, compose
from ._jobs import job_functions
from ._progress import ProgressReporter
from ._status import result_state
from ._wakeups import WakeUps

__all__ = [
    "ABORT_MESSAGE",
    "CLAIM_INDEXED",
    "CLAIM_SCRIPT",
    "LINK_ERRORS",
    "RECEIPT_KEY_PREFIX",
    "TaskbridgeWorker",
    "job_functions",
]

logger = logging.getLogger("taskbridge.arq")

_ABORT_CHECK_INTERVAL = 0.1
"""Seconds between checks for aborted jobs (ARQ checks on each poll, every poll_delay)."""
_REFILL_DELAY = 0.0
"""Seconds a full worker waits, after a job ended, before polling to fill the free slots: none
beyond the current turn of the event loop, whose other finished jobs share the one poll (a
2 ms pause held a backlog of short jobs to 0.77x ARQ polling every 10 ms; without it, 1.31x)."""

LINK_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # refused, reset, closed; also Redis loading its data after a restart
    RedisTimeoutError,  # no answer within socket_timeout: a hung link
    ReadOnlyError,  # a replica now: a failover demoted this server; new connections may not be
    OSError,  # what the socket layer raises directly (asyncio's TimeoutError included)
)
"""Errors that mean "Redis cannot be reached right now": the worker reconnects and retries."""

RECONNECT_FIRST = 0.1
"""Seconds before the second attempt to reach Redis again (the first is at once)."""
RECONNECT_MAX = 2.0
"""Longest pause between two attempts; the pauses double from RECONNECT_FIRST, with jitter."""
_STABLE_AFTER = 5.0
"""Seconds a link must have stayed up for a new failure to start the backoff afresh (a link
that fails as soon as it is back is not retried at once again)."""
_REMIND_EVERY = 60.0
"""Seconds between the reminders logged while Redis stays unreachable."""
_LISTEN_IDLE = 5.0
"""Seconds of silence on the wake channel after which the listener PINGs it, and then waits
as long for any answer before taking the connection for dead."""
_SUBSCRIBE_WAIT = 5.0
"""Seconds to wait for the confirmation of a subscription."""
SHUTDOWN_WRITE_WAIT = 5.0
"""Seconds a stopping worker waits for Redis to store the outcomes of jobs that finished while
it was unreachable, before giving up on them."""

RECEIPT_KEY_PREFIX = "taskbridge:claim:"
"""`<prefix><worker token>`: what the worker's last claim took, kept as long as the locks."""

ABORT_MESSAGE = "abort"
"""Published on a queue's wake channel by `ArqBackend.cancel` after it asked for an abort."""

# KEYS[1]: the queue; KEYS[2]: the worker's claim receipt; then per candidate, its in-progress
# key and result key. ARGV: now (ms), the lock's lifetime (ms), how many jobs to claim at most,
# the claim's number, then the candidates' ids. Claims, in order, each candidate that is due,
# not locked and has no result: its in-progress key is set to now, the attempt's start time. A
# candidate that has a result (cancelled while queued) leaves the queue. When it claimed any,
# the receipt holds [claim number, id, score, ...], so that a worker whose link failed before
# the reply arrived can find out what it took. Returns how many candidates it examined, then,
# flat, (id, score) of each claimed.
CLAIM_SCRIPT = """
local now, most = tonumber(ARGV[1]), tonumber(ARGV[3])
local claimed = {0}
local count = 0
for i = 1, #ARGV - 4 do
  if count >= most then
    break
  end
  claimed[1] = i
  local id = ARGV[i + 4]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) <= now and redis.call('EXISTS', KEYS[2 * i + 1]) == 0 then
    if redis.call('EXISTS', KEYS[2 * i + 2]) == 1 then
      redis.call('ZREM', KEYS[1], id)
    else
      redis.call('PSETEX', KEYS[2 * i + 1], ARGV[2], ARGV[1])
      claimed[#claimed + 1] = id
      claimed[#claimed + 1] = score
      count = count + 1
    end
  end
end
if count > 0 then
  local examined = claimed[1]
  claimed[1] = ARGV[4]
  redis.call('SET', KEYS[2], cjson.encode(claimed), 'PX', ARGV[2])
  claimed[1] = examined
end
return claimed
"""

CLAIM_INDEXED = compose(CLAIM_SCRIPT, MOVE_SCRIPT, CLAIM_THEN)
"""CLAIM_SCRIPT, then the call index's move of each job it claimed to running (ARGV: see
`composed_args`, with the index's bounds)."""

# KEYS[1]: a job's in-progress key. ARGV: the lock's value when this worker took it, a new
# lifetime (ms). 1 (and the lifetime renewed) when the lock is still this worker's, else 0.
RELOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


@dataclass(slots=True)
class _Claim:
    """A job this worker locked: its queue score, and the lock's value (the claim's time)."""

    score: int
    lock: int
    started: bool = False
    """Whether its function was called (ARQ's on_job_start ran)."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class TaskbridgeWorker(Worker):
    """ARQ's Worker, polling again as soon as work is announced instead of sleeping, and
    reconnecting after Redis faults instead of exiting.

    Everything else is ARQ's: job locking, retries with `Retry`, aborts, results, health
    checks, signal handling. The pause between polls is taken out of ARQ's loop (which is given
    `poll_delay=0`) and done in `_poll_iteration` by `WakeUps.wait`, ended early by messages on
    the queue's wake channel, which a reader task listens to.

    Redis faults (a cut or hung link, a restart, a failover). Any of `LINK_ERRORS` from a
    Redis command marks the link down (`connection`, a ConnectionState, removes its health
    file and logs once) and starts one reconnecting task, which PINGs Redis at once, then after
    pauses doubling from RECONNECT_FIRST to RECONNECT_MAX, until it answers (forever; with the
    client's socket_timeout a hung link fails a command instead of holding it). Meanwhile:
    - the poll loop waits, and polls at once when the link is back;
    - a job that is running goes on; if it finishes while the link is down, its outcome is
      kept, and ARQ's writes (`finish_job`, `finish_failed_job`) are retried until Redis takes
      them (a Retry's new score is then written as an absolute ZADD, so that a write that did
      reach Redis before its reply was lost is not applied twice);
    - a job claimed but not started (ARQ's first read of it failed) starts once the link is
      back, if its lock is still this worker's;
    - a claim whose reply was lost is looked up in the worker's claim receipt, and the jobs it
      took are started;
    - the wake channel's listener subscribes again on a new connection, then asks for a poll.
    ARQ's health-check key is written again at the first poll after a reconnection (a restarted
    Redis has lost it). Delivery stays at least once: a job whose lock expires while this
    worker cannot reach Redis (job_timeout + 11 s after it started) may be run by another
    worker too.
    """

    def __init__(
        self,
        functions: Sequence[Function],
        *,
        wakeups: WakeUps,
        poll_delay: float,
        reporter: ProgressReporter | None = None,
        threads: set[str] | None = None,
        connection: ConnectionState | None = None,
        start_retries: int | None = None,
        start_retry_delay: float = 1.0,
        probe: Callable[[], ArqRedis] | None = None,
        hang_timeout: float | None = None,
        index: IndexSpec | None = None,
        **kwargs: Any,
    ) -> None:
        self._on_job_start = kwargs.pop("on_job_start", None)
        super().__init__(functions, poll_delay=0, on_job_start=self._job_starting, **kwargs)
        self.wakeups = wakeups
        self.reporter = reporter
        self.threads = threads if threads is not None else set()
        """Ids of the jobs running a `def` task here (shared with the job functions)."""
        self.wake_channel = WAKE_CHANNEL_PREFIX + self.queue_name
        self.connection = connection or ConnectionState(f"ARQ worker ({self.queue_name})")
        """Whether the worker reaches Redis (and its health file, if it has one)."""
        self._start_retries = start_retries
        """Attempts after the first to reach Redis at start-up before giving up (None: forever)."""
        self._start_retry_delay = start_retry_delay
        self._poll_delay = poll_delay
        self._polled = False
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._aborts_checked = float("-inf")
        self._refill: asyncio.TimerHandle | None = None
        self._claim: AsyncScript | None = None
        self._relock: AsyncScript | None = None
        self._claimed: dict[str, _Claim] = {}
        self._claims = 0
        self._lost_claim: tuple[str, int] | None = None
        self._receipt_key = RECEIPT_KEY_PREFIX + uuid.uuid4().hex
        self._link_ok = asyncio.Event()
        self._epoch = 0
        """How many times the link came up: an error from an operation begun in an earlier
        epoch says nothing about the link now."""
        self._up_at = float("-inf")
        self._backoff = RECONNECT_FIRST
        self._reconnector: asyncio.Task[None] | None = None
        self._writes: dict[asyncio.Task[Any], str] = {}
        """Outcome writes under way (their job ids), which a stopping worker waits for."""
        self._probe_factory = probe
        self._hang_timeout = hang_timeout
        self._watchdog: asyncio.Task[None] | None = None
        self.index = index
        """The alias's call index, which the worker moves each job through (None: none)."""
        self._move: AsyncScript | None = None

    # -- the link to Redis ----------------------------------------------------------------

    async def main(self) -> None:
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, self.max_jobs)
        if self.reporter is not None:
            self.reporter.bind(self.pool, asyncio.get_running_loop())
        await self._reconnect(starting=True)
        self._listener = asyncio.create_task(self._listen(), name="taskbridge:wakeups")
        if self._probe_factory is not None and self._hang_timeout is not None:
            self._watchdog = asyncio.create_task(self._watch_link(), name="taskbridge:watchdog")
        try:
            # Subscribed before the first poll: from then on no announcement is missed.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SUBSCRIBE_WAIT):
                    await self._subscribed.wait()
            logger.info(
                "taskbridge ARQ worker ready: queue %r, %d task(s), wake-ups on %r",
                self.queue_name,
                len(self.functions),
                self.wake_channel,
            )
            while True:
                epoch = self._epoch
                try:
                    await super().main()
                    return
                except LINK_ERRORS as exc:
                    # outside a poll (ARQ's start-up INFO, a burst's queue length): start over
                    self._link_lost(exc, epoch)
                await self._link_ok.wait()
        finally:
            if self._listener is not None:
                self._listener.cancel()
                await asyncio.gather(self._listener, return_exceptions=True)
            if self._watchdog is not None:
                self._watchdog.cancel()
                await asyncio.gather(self._watchdog, return_exceptions=True)

    async def _watch_link(self) -> None:
        """Find a hung link (a Redis or a network path that stopped answering without closing
        the connection): PING on a connection of its own, about every second, each within
        `hang_timeout`. When one goes unanswered, every connection of the pool is closed, so
        that the commands waiting on them fail now, and the worker reconnects.

        One timed PING a second instead of a socket timeout on every command: redis-py makes a
        task and a timer per command for that, which cost a no-op job a third of its CPU.
        """
        assert self._probe_factory is not None and self._hang_timeout is not None
        timeout = self._hang_timeout
        interval = min(1.0, timeout / 3)
        probe = self._probe_factory()
        try:
            while True:
                await asyncio.sleep(interval)
                if not self._link_ok.is_set():
                    continue  # reconnecting: its own PINGs watch the link
                epoch = self._epoch
                try:
                    async with asyncio.timeout(timeout):
                        await probe.ping()
                except LINK_ERRORS as exc:
                    if epoch != self._epoch or not self._link_ok.is_set():
                        continue
                    logger.warning(
                        "%s: Redis did not answer a PING within %.1fs (%s): dropping the "
                        "connections",
                        self.connection.name,
                        timeout,
                        _describe(exc) if str(exc) else "hung link",
                    )
                    self._link_lost(exc, epoch)
                    with contextlib.suppress(*LINK_ERRORS):
                        async with asyncio.timeout(timeout):
                            await self.pool.connection_pool.disconnect(inuse_connections=True)
                    with contextlib.suppress(*LINK_ERRORS):
                        async with asyncio.timeout(timeout):
                            await probe.connection_pool.disconnect(inuse_connections=True)
        finally:
            with contextlib.suppress(Exception):
                await probe.aclose()

    def _link_lost(self, exc: BaseException, epoch: int) -> None:
        """An operation begun in `epoch` failed with `exc`, one of LINK_ERRORS."""
        if epoch != self._epoch or not self._link_ok.is_set():
            return  # reconnected since it began (its retry will tell), or reconnecting now
        self._link_ok.clear()
        self.connection.down(_describe(exc))
        self._reconnector = asyncio.get_running_loop().create_task(
            self._reconnect(), name="taskbridge:reconnect"
        )

    async def _reconnect(self, *, starting: bool = False) -> None:
        """PING Redis until it answers, then mark the link up and poll.

        Each attempt drops the pool's idle connections first (after a restart or a failover
        they lead nowhere or to the wrong server). At start-up with `start_retries` (a --burst
        worker), gives up after that many retries, `start_retry_delay` apart, as ARQ's
        create_pool does, raising the last error.
        """
        loop = asyncio.get_running_loop()
        began = reminded = loop.time()
        bounded = starting and self._start_retries is not None
        if loop.time() - self._up_at >= _STABLE_AFTER:
            self._backoff = RECONNECT_FIRST
            pause = 0.0  # at once: most faults are brief
        else:
            # It failed again soon after it was back (e.g. a replica answering PING but
            # refusing writes): go on backing off rather than hammering it.
            pause, self._backoff = self._backoff, min(self._backoff * 2, RECONNECT_MAX)
        attempts = 0
        while True:
            if pause:
                await asyncio.sleep(random.uniform(pause / 2, pause))
            try:
                await self.pool.connection_pool.disconnect(inuse_connections=False)
                if self._hang_timeout is None:
                    await self._ping()
                else:  # the pool's commands have no timeout of their own (see _watch_link)
                    async with asyncio.timeout(self._hang_timeout):
                        await self._ping()
                break
            except LINK_ERRORS as exc:
                attempts += 1
                self.connection.down(_describe(exc))
                if bounded and attempts > (self._start_retries or 0):
                    raise
                now = loop.time()
                if now - reminded >= _REMIND_EVERY:
                    reminded = now
                    logger.warning(
                        "%s: still no answer from Redis after %.0fs (%s); retrying",
                        self.connection.name,
                        now - began,
                        _describe(exc),
                    )
                if bounded:
                    pause = self._start_retry_delay
                else:
                    pause, self._backoff = self._backoff, min(self._backoff * 2, RECONNECT_MAX)
        self._epoch += 1
        self._up_at = loop.time()
        self._last_health_check = 0  # ARQ writes its health-check key at the next poll
        self._link_ok.set()
        self.connection.up()
        self.wakeups.work()  # jobs may have been queued meanwhile, unannounced to this worker

    async def _ping(self) -> None:
        await self.pool.ping()
        if self.index is not None:
            # A restarted or failed-over Redis knows no script: load the index's, which the
            # outcome and progress writes run by EVALSHA in their pipelines.
            await self.pool.script_load(MOVE_SCRIPT)

    # -- the wake channel -----------------------------------------------------------------

    async def _listen(self) -> None:
        """Subscribe to the wake channel and act on its messages; on any failure, subscribe
        again on a new connection (once the link is up), pausing with backoff."""
        delay = RECONNECT_FIRST
        failing = False
        while True:
            await self._link_ok.wait()
            pubsub = self.pool.pubsub()
            try:
                await self._subscribe(pubsub)
                if failing:
                    logger.info("wake-up channel %r: subscribed again", self.wake_channel)
                    # Its connection broke: Redis may have restarted or failed over while the
                    # pool's connections were replaced unnoticed. Write ARQ's health-check key.
                    self._last_health_check = 0
                failing, delay = False, RECONNECT_FIRST
                self._subscribed.set()
                self.wakeups.work()  # announcements made while unsubscribed were missed
                await self._read(pubsub)
            except Exception as exc:
                if not failing:
                    logger.warning(
                        "wake-up channel %r: %s; polling every %ss until subscribed again",
                        self.wake_channel,
                        _describe(exc),
                        self._poll_delay,
                    )
                failing = True
                # Check now whether Redis itself is reachable: the abort check runs even when
                # the worker is full (a poll for work would not), and talks to Redis.
                self.wakeups.abort()
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, RECONNECT_MAX)

    async def _subscribe(self, pubsub: PubSub) -> None:
        """Subscribe, and wait for the confirmation: from then on no announcement is missed."""
        await pubsub.subscribe(self.wake_channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _SUBSCRIBE_WAIT
        while loop.time() < deadline:
            message = await pubsub.get_message(timeout=max(0.0, deadline - loop.time()))
            if message is not None and message["type"] == "subscribe":
                return
        raise TimeoutError(f"no confirmation of the subscription within {_SUBSCRIBE_WAIT}s")

    async def _read(self, pubsub: PubSub) -> None:
        """Act on the channel's messages until the connection fails (or answers no PING)."""
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged = False
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_LISTEN_IDLE)
            now = loop.time()
            if message is None:
                if now - heard < _LISTEN_IDLE:
                    continue
                if pinged:
                    raise TimeoutError(f"no answer to PING within {_LISTEN_IDLE}s")
                await pubsub.ping()
                heard, pinged = now, True
                continue
            heard, pinged = now, False
            if message["type"] == "pong":
                continue
            if message["data"] == ABORT_MESSAGE.encode():
                self.wakeups.abort()
                continue
            try:
                self.wakeups.due_at(int(message["data"]))
            except (TypeError, ValueError):
                self.wakeups.work()

    # -- polling and starting jobs --------------------------------------------------------

    def _can_start(self) -> bool:
        return self.allow_pick_jobs and self.job_counter < self.max_jobs

    async def _poll_iteration(self) -> None:
        if self._polled:
            await self.wakeups.wait(self._poll_delay, self._can_start)
        self._polled = True
        await self._link_ok.wait()
        epoch = self._epoch
        try:
            if self._lost_claim is not None and self.allow_pick_jobs:
                await self._recover_claim()
            await super()._poll_iteration()
        except LINK_ERRORS as exc:
            self._link_lost(exc, epoch)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Start the due jobs among `job_ids` while there are free slots.

        ARQ locks each job in four round trips (WATCH, EXISTS, ZSCORE, MULTI/PSETEX/EXEC); here
        one CLAIM_SCRIPT call locks as many as there are free slots, with the same checks,
        atomically. Slots freed meanwhile (short jobs end within a round trip or two) are filled
        from the same ids at once, as ARQ's loop over them does, rather than at the next poll.
        The lock's value is the start time, which `ArqBackend.status` reports as `started_at`.
        """
        if len(job_ids) >= self.queue_read_limit:
            self.wakeups.work()  # the read was capped: more jobs may be due
        running = self.tasks
        candidates = [
            job_id
            for job_id in (raw.decode() for raw in job_ids)
            if (t := running.get(job_id)) is None or t.done()  # running here: locked
        ]
        if self._claim is None:
            self._claim = self.pool.register_script(CLAIM_INDEXED)
        lock_ms = int(self.in_progress_timeout_s * 1000)
        while candidates and self.allow_pick_jobs:  # a shutdown signal stops picking
            free = self.max_jobs - self.job_counter
            if free <= 0:
                return
            window = candidates[: 2 * free]  # most are claimable; the rest wait for a loop
            keys = [self.queue_name, self._receipt_key]
            for job_id in window:
                keys += [in_progress_key_prefix + job_id, result_prefix + job_id]
            self._claims += 1
            number, now = str(self._claims), timestamp_ms()
            try:
                args = composed_args(
                    [now, lock_ms, free, number, *window],
                    None if self.index is None else self.index.bounds(),
                )
                reply: list[Any] = await self._claim(keys=keys, args=args, client=self.pool)
            except LINK_ERRORS:
                self._lost_claim = (number, now)  # it may have run: see _recover_claim
                raise
            del candidates[: int(reply[0])]
            await self._start_claimed(reply[1:], now)

    async def _start_claimed(self, claimed: Sequence[Any], lock: int) -> None:
        """Start the jobs of a claim: `claimed` is flat (id, score) pairs; `lock` its time."""
        for i in range(0, len(claimed), 2):
            raw_id = claimed[i]
            job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            score = int(float(claimed[i + 1]))
            await self.sem.acquire()  # never waits: a slot is free (the claim took no more)
            self.job_counter += 1
            self._claimed[job_id] = _Claim(score, lock)
            task = self.loop.create_task(self.run_job(job_id, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def _recover_claim(self) -> None:
        """The link failed before a claim's reply came: start what it took, if it ran."""
        assert self._lost_claim is not None
        number, lock = self._lost_claim
        raw = await self.pool.get(self._receipt_key)
        self._lost_claim = None
        if raw is None:
            return
        receipt = json.loads(raw)
        if not isinstance(receipt, list) or not receipt or receipt[0] != number:
            return  # that claim never reached Redis (or Redis lost it)
        logger.info(
            "%d job(s) claimed just as the link to Redis failed: starting them",
            (len(receipt) - 1) // 2,
        )
        await self._start_claimed(receipt[1:], lock)

    async def _job_starting(self, ctx: dict[str, Any]) -> None:
        """ARQ's on_job_start: the job's function is about to be called."""
        claim = self._claimed.get(ctx["job_id"])
        if claim is not None:
            claim.started = True
        if self._on_job_start is not None:
            await self._on_job_start(ctx)

    async def run_job(self, job_id: str, score: int) -> None:
        """ARQ's run_job; started again once the link is back if it failed before the job's
        function was called (ARQ's first read of the job, or its try count update)."""
        try:
            while True:
                epoch = self._epoch
                try:
                    await super().run_job(job_id, score)
                    return
                except LINK_ERRORS as exc:
                    claim = self._claimed.get(job_id)
                    if claim is None or claim.started:
                        # not expected: outcome writes retry until they succeed
                        logger.error("job %s: its outcome could not be stored: %s", job_id, exc)
                        return
                    self._link_lost(exc, epoch)
                if not await self._lock_still_held(job_id):
                    return
        finally:
            claim = self._claimed.get(job_id)
            if claim is not None and not claim.started:
                del self._claimed[job_id]  # else finish_job's, which needs it

    async def _lock_still_held(self, job_id: str) -> bool:
        """Once the link is back: whether this worker still holds `job_id`'s lock (renewed)."""
        claim = self._claimed[job_id]
        if self._relock is None:
            self._relock = self.pool.register_script(RELOCK_SCRIPT)
        lock_ms = int(self.in_progress_timeout_s * 1000)
        while True:
            await self._link_ok.wait()
            epoch = self._epoch
            try:
                held = await self._relock(
                    keys=[in_progress_key_prefix + job_id],
                    args=[claim.lock, lock_ms],
                    client=self.pool,
                )
                break
            except LINK_ERRORS as exc:
                self._link_lost(exc, epoch)
        if not held:
            logger.warning(
                "job %s: its lock expired or was lost while Redis was unreachable; not started "
                "here (it runs where it is claimed next)",
                job_id,
            )
        return bool(held)

    # -- storing outcomes -----------------------------------------------------------------

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """ARQ's finish_job, with the job's move in the call index, retried until Redis takes
        it."""
        claim = self._claimed.pop(job_id, None)
        move = self._moved(job_id, finish, result_data)
        write = functools.partial(
            self._finish,
            job_id,
            finish,
            result_data,
            result_timeout_s,
            keep_result_forever,
            incr_score,
            keep_in_progress,
            move,
        )
        again: Callable[[], Awaitable[None]] = write
        if not finish and incr_score and claim is not None and keep_in_progress is None:
            # ARQ's ZINCRBY would defer the job twice if the first write did reach Redis.
            again = functools.partial(self._requeue, job_id, claim.score + incr_score, move)
        await self._store(job_id, write, again)

    async def _finish(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
        move: list[Any] | None,
    ) -> None:
        if move is None:
            await super().finish_job(
                job_id,
                finish,
                result_data,
                result_timeout_s,
                keep_result_forever,
                incr_score,
                keep_in_progress,
            )
            return
        # ARQ's finish_job's transaction, command for command (a test compares what the two
        # leave in Redis), and the index's move in it.
        async with self.pool.pipeline(transaction=True) as tr:
            delete_keys = []
            in_progress_key = in_progress_key_prefix + job_id
            if keep_in_progress is None:
                delete_keys.append(in_progress_key)
            else:
                tr.pexpire(in_progress_key, to_ms(keep_in_progress))
            if finish:
                if result_data:
                    expire = None if keep_result_forever else result_timeout_s
                    tr.set(result_prefix + job_id, result_data, px=to_ms(expire))
                delete_keys += [retry_key_prefix + job_id, job_key_prefix + job_id]
                tr.zrem(abort_jobs_ss, job_id)
                tr.zrem(self.queue_name, job_id)
            elif incr_score:
                tr.zincrby(self.queue_name, incr_score, job_id)
            if delete_keys:
                tr.delete(*delete_keys)
            await run_with_index(tr, self._move_script(), [move])

    async def _requeue(self, job_id: str, score: int, move: list[Any] | None) -> None:
        async with self.pool.pipeline(transaction=True) as pipe:
            pipe.zadd(self.queue_name, {job_id: score}, xx=True)
            pipe.delete(in_progress_key_prefix + job_id)
            if move is None:
                await pipe.execute()
            else:
                await run_with_index(pipe, self._move_script(), [move])

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        """ARQ's finish_failed_job (a job that failed or was aborted before its function ran),
        with the job's move in the call index, retried until Redis takes it."""
        self._claimed.pop(job_id, None)
        move = self._moved(job_id, True, result_data)
        write = functools.partial(self._finish_failed, job_id, result_data, move)
        await self._store(job_id, write, write)

    async def _finish_failed(
        self, job_id: str, result_data: bytes | None, move: list[Any] | None
    ) -> None:
        if move is None:
            await super().finish_failed_job(job_id, result_data)
            return
        # ARQ's finish_failed_job's transaction, command for command, and the index's move.
        async with self.pool.pipeline(transaction=True) as tr:
            tr.delete(
                retry_key_prefix + job_id,
                in_progress_key_prefix + job_id,
                job_key_prefix + job_id,
            )
            tr.zrem(abort_jobs_ss, job_id)
            tr.zrem(self.queue_name, job_id)
            keep_result = self.keep_result_forever or self.keep_result_s > 0
            if result_data is not None and keep_result:
                expire = 0 if self.keep_result_forever else self.keep_result_s
                tr.set(result_prefix + job_id, result_data, px=to_ms(expire))
            await run_with_index(tr, self._move_script(), [move])

    def _moved(self, job_id: str, finish: bool, result_data: bytes | None) -> list[Any] | None:
        """The index MOVE's ARGV for a job's outcome write (None without an index): back in
        its queue (retrying), or the state its result records, with its task and enqueue time
        (to index it again if the index lost it)."""
        if self.index is None:
            return None
        if not finish:
            return self.index.move(job_id, "retrying")
        if result_data is None:  # not kept (or not serializable at all)
            return self.index.move(job_id, "failed")
        return self.index.move(job_id, *result_state(result_data))

    def _move_script(self) -> AsyncScript:
        if self._move is None:
            self._move = self.pool.register_script(MOVE_SCRIPT)
        return self._move

    async def _store(
        self,
        job_id: str,
        write: Callable[[], Awaitable[None]],
        again: Callable[[], Awaitable[None]],
    ) -> None:
        """Run `write`; while Redis cannot be reached, wait for the link and run `again`."""
        task = asyncio.current_task()
        if task is not None:
            self._writes[task] = job_id
        try:
            attempt, waited = write, False
            while True:
                if not self._link_ok.is_set():
                    if not waited:
                        logger.warning(
                            "job %s: Redis is unreachable; its outcome is kept and stored once "
                            "it is back",
                            job_id,
                        )
                    waited = True
                    await self._link_ok.wait()
                epoch = self._epoch
                try:
                    await attempt()
                except LINK_ERRORS as exc:
                    if not waited:
                        logger.warning(
                            "job %s: Redis did not take its outcome (%s); kept, and stored once "
                            "it is reachable",
                            job_id,
                            _describe(exc),
                        )
                    attempt, waited = again, True
                    self._link_lost(exc, epoch)
                    continue
                if waited:
                    logger.info("job %s: outcome stored after the link came back", job_id)
                return
        finally:
            if task is not None:
                self._writes.pop(task, None)

    # -- aborts ---------------------------------------------------------------------------

    async def _cancel_aborted_jobs(self) -> None:
        """Cancel the running jobs in ARQ's abort set, except `def` tasks, which are left to
        finish (their abort request is dropped, with a warning)."""
        # Polls come much more often than ARQ's every poll_delay; aborts need not be seen faster
        # unless one was announced.
        now = asyncio.get_running_loop().time()
        if not self.wakeups.take_abort() and now - self._aborts_checked < _ABORT_CHECK_INTERVAL:
            return
        self._aborts_checked = now
        async with self.pool.pipeline(transaction=True) as pipe:
            pipe.zrange(abort_jobs_ss, start=0, end=-1)
            # ARQ's own clean-up of the set, kept as it is
            pipe.zremrangebyscore(
                abort_jobs_ss, min=timestamp_ms() + abort_job_max_age, max=float("inf")
            )
            requested, _ = await pipe.execute()
        handled: list[str] = []
        for job_id in (raw.decode() for raw in requested):
            task = self.job_tasks.get(job_id)
            if task is None:
                continue  # not running here (yet): ARQ's run_job sees it before starting
            handled.append(job_id)
            if job_id in self.threads:
                logger.warning(
                    "job %s runs a def task in a thread, which cannot be interrupted; "
                    "abort ignored, it will finish",
                    job_id,
                )
                continue
            self.aborting_tasks.add(job_id)
            task.cancel()
        if handled:
            await self.pool.zrem(abort_jobs_ss, *handled)

    def _release_sem_dec_counter_on_complete(self) -> None:
        was_full = self.job_counter >= self.max_jobs
        super()._release_sem_dec_counter_on_complete()
        if was_full and self._refill is None:
            # Due jobs may have waited for this slot. Poll at the next turn of the loop, so that
            # the slots freed in this one are filled by one poll rather than one poll each.
            self._refill = self.loop.call_later(_REFILL_DELAY, self._refill_slots)

    def _refill_slots(self) -> None:
        self._refill = None
        self.wakeups.work()

    async def close(self) -> None:
        # ARQ's close() gathers the job tasks and re-raises the first error: a job cancelled by
        # SIGTERM while ARQ recorded its outcome would end the worker with a traceback and a
        # non-zero exit code. Wait for them here, and hand ARQ none.
        try:
            outcomes = await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            for job_id, outcome in zip(list(self.tasks), outcomes, strict=True):
                if isinstance(outcome, Exception):
                    logger.error("job %s ended with an error", job_id, exc_info=outcome)
            self.tasks.clear()
            await self._settle_writes()
            if self.reporter is not None:
                await self.reporter.drain()
            if self._reconnector is not None:
                self._reconnector.cancel()
                await asyncio.gather(self._reconnector, return_exceptions=True)
            if self._pool is None:
                return
            if not self._link_ok.is_set():
                # ARQ's close() would first delete the health-check key; it expires by itself.
                await self._pool.aclose(close_connection_pool=True)
                self._pool = None
                return
            # ARQ closes its pool with redis-py's deprecated close(); the warning is ARQ's to fix.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                try:
                    await super().close()
                except LINK_ERRORS as exc:
                    logger.warning("health-check key not deleted: %s", _describe(exc))
                    if self._pool is not None:
                        await self._pool.aclose(close_connection_pool=True)
                        self._pool = None
        finally:
            self.connection.close()

    async def _settle_writes(self) -> None:
        """Give the outcome writes waiting for Redis SHUTDOWN_WRITE_WAIT s, then drop them."""
        if not self._writes:
            return
        logger.warning(
            "waiting up to %ss for Redis to store the outcome of %d job(s)",
            SHUTDOWN_WRITE_WAIT,
            len(self._writes),
        )
        _, pending = await asyncio.wait(list(self._writes), timeout=SHUTDOWN_WRITE_WAIT)
        for task in pending:
            logger.error(
                "job %s: its outcome could not be stored (Redis unreachable); the job runs again "
                "once its lock expires",
                self._writes.get(task, "?"),
            )
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
