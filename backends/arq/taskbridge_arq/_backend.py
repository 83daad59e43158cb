"""The ARQ backend: dispatch to Redis in ARQ's format (as JSON), and the worker command."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from arq.connections import ArqRedis
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import Job
from arq.utils import timestamp_ms, to_ms
from redis.asyncio.sentinel import Sentinel
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from taskbridge import BackendUnavailable, ConfigurationError
from taskbridge.backends import (
    Backend,
    CallIndex,
    CancelResult,
    ConnectionState,
    GroupCommit,
    KeptCall,
    Policy,
    RedisIndex,
    TaskCall,
    TaskStatus,
    WorkerBridge,
    composed_args,
    dispatch_deadline,
    redact_url,
)

from ._dispatch import (
    QUEUE_FIELD,
    SYNC_FIELD,
    WAKE_CHANNEL_PREFIX,
    Batch,
    Row,
    Skipped,
    batch_arguments,
    group_commit,
    index_rows,
)
from ._index import CANCEL_INDEXED, ENQUEUE_INDEXED, index_spec
from ._jobs import UNLIMITED_TRIES
from ._options import ArqOptions, sentinel_address
from ._progress import ProgressReporter
from ._serializer import deserialize, deserialize_for_worker, serialize
from ._status import Snapshot, cancelled_result, read_keys
from ._wakeups import WakeUps
from ._worker import LINK_ERRORS, TaskbridgeWorker, job_functions

__all__ = ["ArqBackend"]

logger = logging.getLogger("taskbridge.arq")


class ArqBackend(Backend):
    """Sends calls to ARQ workers through Redis, in ARQ's job format with JSON, never pickle.

    A request's calls are enqueued in one Redis round trip (a Lua script doing what ARQ's
    `enqueue_job` does for each, and adding them to the call index); the job id is the call's
    id. `status` reads ARQ's own keys in one round trip; `cancel` removes a queued job
    atomically, or aborts a running `async def` one. `index` lists the calls (see `_index`).
    `taskbridge worker ALIAS module:bridge` runs an ARQ worker for the bridge's tasks.
    """

    supports_delay: ClassVar[bool] = True
    supports_queues: ClassVar[bool] = True
    compact_ids: ClassVar[bool] = True
    """Job ids as ARQ makes them: 32 hex digits (shorter keys than a dashed UUID)."""
    supports_worker: ClassVar[bool] = True
    supports_status: ClassVar[bool] = True
    supports_cancel: ClassVar[bool] = True
    options_model: ClassVar[type[ArqOptions]] = ArqOptions
    options: ArqOptions

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self._redis: ArqRedis | None = None
        self._script: AsyncScript | None = None
        self._cancel_script: AsyncScript | None = None
        self._group: GroupCommit[Batch, Skipped] | None = None
        self._sentinels: list[Sentinel] = []
        self.index_spec = index_spec(self.options)
        """Where the alias keeps its call index, and its bounds; None when it keeps none."""
        self._index: RedisIndex | None = None

    @classmethod
    def dev_options(cls, redis_url: str) -> dict[str, Any]:
        """`taskbridge dev`'s throwaway Redis is all an ARQ alias needs."""
        return {"redis_url": redis_url}

    # -- policy ---------------------------------------------------------------------------

    def validate_policy(self, task_name: str, policy: Policy) -> None:
        """Also refuse a timeout above `job_timeout`, ARQ's hard limit on an attempt."""
        super().validate_policy(task_name, policy)
        if policy.timeout is not None and policy.timeout > self.options.job_timeout:
            raise ConfigurationError(
                f"task {task_name!r}: timeout {policy.timeout}s exceeds backend {self.alias!r}'s "
                f"job_timeout of {self.options.job_timeout}s, ARQ's limit on any attempt; raise "
                f"TASKBRIDGE_BACKENDS__{self.alias.upper()}__JOB_TIMEOUT or lower the timeout"
            )

    def queue_for(self, policy: Policy) -> str:
        """The ARQ queue (a sorted set) the call goes to: the policy's, else `queue_name`."""
        return policy.queue or self.options.queue_name

    # -- dispatch -------------------------------------------------------------------------

    def connect(self, **redis_options: Any) -> ArqRedis:
        """A new ArqRedis client for this alias: JSON serializer, default queue, expiry set.

        Use it for ARQ's own API (`Job`, `queued_jobs()`, `enqueue_job`), which then reads and
        writes JSON. No connection is made until the first command.
        """
        options = self.options
        address = sentinel_address(options.redis_url)
        redis: ArqRedis
        if address is None:
            redis = ArqRedis.from_url(
                options.redis_url, socket_connect_timeout=options.conn_timeout, **redis_options
            )
        else:
            # As ARQ's create_pool does for RedisSettings(sentinel=True): redis-py's Sentinel
            # client finds the master, and finds it again when a failover moves it.
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                address.sentinels,
                sentinel_kwargs={
                    "password": options.sentinel_password,
                    "socket_connect_timeout": options.conn_timeout,
                    "socket_timeout": options.socket_timeout,
                    "ssl": address.ssl,
                },
                ssl=address.ssl,
            )
            self._sentinels.append(sentinel)
            redis = sentinel.master_for(
                options.sentinel_master,
                redis_class=ArqRedis,
                db=address.db,
                username=address.username,
                password=address.password,
                socket_connect_timeout=options.conn_timeout,
                **redis_options,
            )
        redis.job_serializer = serialize
        redis.job_deserializer = deserialize
        redis.default_queue_name = self.options.queue_name
        redis.expires_extra_ms = self.options.expires_extra_ms
        return redis

    @property
    def redis(self) -> ArqRedis:
        """The API process's client, opened by `open()`."""
        if self._redis is None:
            raise RuntimeError(f"backend {self.alias!r} is not open; await bridge.open() first")
        return self._redis

    async def open(self) -> None:
        """Create the connection pool and load the enqueue script.

        An unreachable Redis does not stop the application from starting: it is logged, and
        each dispatch raises BackendUnavailable until Redis answers.
        """
        if self._redis is not None:
            return
        # No per-command socket timeout (redis-py makes a task and a timer per command for it):
        # dispatch is bounded by the dispatch timeout, every other call here by `_bounded`.
        self._redis = self.connect(max_connections=self.options.max_connections)
        self._script = self._redis.register_script(ENQUEUE_INDEXED)
        self._cancel_script = self._redis.register_script(CANCEL_INDEXED)
        self._group = group_commit(self._run_script)
        spec = self.index_spec
        if spec is not None:
            self._index = RedisIndex(
                self._redis, spec.prefix, ttl=spec.ttl_ms / 1000, max_entries=spec.max_entries
            )
        try:
            async with self._bounded():
                await self._redis.script_load(ENQUEUE_INDEXED)
        except (RedisError, OSError) as exc:
            logger.warning("%s", self._unavailable(exc, " at start-up"))

    async def close(self) -> None:
        """Close the call index's event subscription and the connection pool."""
        if self._group is not None:
            await self._group.wait_idle()
        index, self._index = self._index, None
        if index is not None:
            await index.close()
        redis, self._redis, self._script, self._group = self._redis, None, None, None
        self._cancel_script = None
        if redis is not None:
            await redis.aclose(close_connection_pool=True)
        sentinels, self._sentinels = self._sentinels, []
        for sentinel in sentinels:
            for client in sentinel.sentinels:
                await client.aclose()

    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        """Enqueue `calls` in one round trip (shared with concurrent dispatches, see
        group commit), signed when the bridge has a `signing_key`.

        A call with an idempotency key dispatched again within its key_ttl is skipped (the
        caller has the first call's handle); any other call whose job id exists already is
        skipped with a warning.
        """
        if not calls:
            return
        await self.open()
        assert self._group is not None
        deadline = dispatch_deadline()
        now_ms = timestamp_ms()
        keys, argv = batch_arguments(
            calls,
            default_queue=self.options.queue_name,
            now_ms=now_ms,
            expires_extra_ms=self.options.expires_extra_ms,
            signer=self.signer,
            deadline_ms=0 if deadline is None else int(deadline * 1000),
        )
        rows = index_rows(calls, now_ms) if self.index_spec is not None else []
        try:
            skipped = await self._group.submit((keys, argv, rows))
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc, f" for {len(calls)} call(s)") from exc
        if not skipped:
            return
        late = [call for call in calls if skipped.get(call.id) == "late"]
        if late:
            raise BackendUnavailable(
                f"backend {self.alias!r} (ARQ): Redis received {len(late)} call(s) after the "
                "dispatch deadline and refused them; none was enqueued",
                backend=self.alias,
            )
        for call in calls:
            if call.id not in skipped:
                continue
            if call.policy.key is not None:
                logger.debug(
                    "task %s [%s]: idempotency key %r already dispatched; not enqueued again",
                    call.name,
                    call.id,
                    call.policy.key,
                )
            else:
                logger.warning("ARQ job %s exists (queued or has a result); not enqueued", call.id)

    def _bounded(self) -> asyncio.Timeout:
        """A command's time limit (`socket_timeout`): a hung link fails it, as a socket timeout
        would, at the cost of one timer for the whole call."""
        return asyncio.timeout(self.options.socket_timeout)

    async def _run_script(self, keys: list[str], argv: list[Any], rows: list[Row]) -> list[bytes]:
        assert self._script is not None
        spec = self.index_spec
        args = composed_args(argv, spec.add(rows) if spec is not None and rows else None)
        skipped: list[bytes] = await self._script(keys=keys, args=args, client=self.redis)
        return skipped

    async def ping(self) -> str:
        """Redis's version, and the default queue's length and worker health check."""
        await self.open()
        health_key = self.options.health_check_key or self.options.queue_name + ":health-check"
        try:
            async with self._bounded(), self.redis.pipeline(transaction=False) as pipe:
                pipe.info("server")
                pipe.zcard(self.options.queue_name)
                pipe.get(health_key)
                server, queued, health = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc, "") from exc
        worker = health.decode(errors="replace") if health else "no worker health check"
        return (
            f"Redis {server.get('redis_version', '?')} at {redact_url(self.options.redis_url)}; "
            f"queue {self.options.queue_name!r}: {queued} job(s); {worker}"
        )

    # -- status and cancel ----------------------------------------------------------------

    async def status(self, task_id: str) -> TaskStatus | None:
        """The job's state from ARQ's keys and the progress key, read by one MGET.

        Queued or deferred: queued. Locked by a worker: running. Back in the queue after a try:
        retrying. With a result: succeeded, failed, or cancelled (an aborted job). None when
        Redis holds nothing of `task_id` (never queued here, or its result expired).
        """
        return (await self._snapshot(task_id)).status(self.alias)

    async def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        """`status` of each of `task_ids`, read by one MGET of all their keys."""
        return [snapshot.status(self.alias) for snapshot in await self._snapshots(task_ids)]

    async def kept_call(self, task_id: str) -> KeptCall | None:
        """The task and arguments of a failed or cancelled job, from its result (ARQ stores
        them there, whatever their size, for as long as the result); None in any other state,
        once the result expired, or for a job a worker refused as a message (a bad signature)."""
        return (await self._snapshot(task_id)).kept()

    @property
    def index(self) -> CallIndex | None:
        """The alias's call index in its Redis, once open (see `_index`); None before, and
        for an alias with `index_max_entries=0` or `keep_result=0`."""
        return self._index

    async def _snapshot(self, task_id: str) -> Snapshot:
        [snapshot] = await self._snapshots([task_id])
        return snapshot

    async def _snapshots(self, task_ids: Sequence[str]) -> list[Snapshot]:
        if not task_ids:
            return []
        await self.open()
        keys = [key for task_id in task_ids for key in read_keys(task_id)]
        try:
            async with self._bounded():
                values = await self.redis.mget(keys)
        except (RedisError, OSError) as exc:
            what = f" {task_ids[0]}" if len(task_ids) == 1 else f"s {', '.join(task_ids[:3])}, ..."
            raise self._unavailable(exc, f" reading job{what}") from exc
        width = len(keys) // len(task_ids)
        return [
            Snapshot.parse(task_id, values[i * width : (i + 1) * width])
            for i, task_id in enumerate(task_ids)
        ]

    async def cancel(self, task_id: str) -> CancelResult:
        """Cancel a job: a queued (or retrying) one never starts; a running `async def` one is
        aborted; a running `def` one cannot be interrupted, and the answer says so.

        A queued job is taken out of its queue and given a cancelled result in one Lua script,
        which a worker's claim of the job cannot interleave with. A running one is put in ARQ's
        abort set, its workers are woken, and the answer waits up to `cancel_wait` seconds for
        the worker to cancel the task and store the outcome.
        """
        snapshot = await self._snapshot(task_id)
        known = snapshot.status(self.alias)
        if known is None:
            return CancelResult(
                id=task_id,
                cancelled=False,
                state="unknown",
                detail=f"Redis holds no ARQ job {task_id} (never queued, or its result expired)",
            )
        if known.done:
            return CancelResult(
                id=task_id, cancelled=False, state=known.state, detail=f"already {known.state}"
            )
        carried = snapshot.carried
        queue = carried.get(QUEUE_FIELD)
        if not isinstance(queue, str):
            queue = self.options.queue_name
        in_thread = carried.get(SYNC_FIELD) is True
        now = timestamp_ms()
        options = self.options
        keep = -1 if options.keep_result_forever else to_ms(options.keep_result)
        job = snapshot.job or {}
        enqueued = job.get("et")
        spec = self.index_spec
        moved = None
        if spec is not None:  # moved to cancelled only if the script takes it out of its queue
            moved = spec.move(
                task_id,
                "cancelled",
                known.task_name,
                enqueued if type(enqueued) is int else None,
            )
        assert self._cancel_script is not None
        try:
            async with self._bounded():
                raw = await self._cancel_script(
                    keys=[
                        job_key_prefix + task_id,
                        in_progress_key_prefix + task_id,
                        result_key_prefix + task_id,
                        retry_key_prefix + task_id,
                        queue,
                        abort_jobs_ss,
                    ],
                    args=composed_args(
                        [
                            task_id,
                            now,
                            "0" if in_thread else "1",
                            cancelled_result(snapshot, queue, now),
                            keep,
                            WAKE_CHANNEL_PREFIX + queue,
                        ],
                        moved,
                    ),
                    client=self.redis,
                )
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc, f" cancelling job {task_id}") from exc
        answer = raw.decode() if isinstance(raw, bytes) else str(raw)
        name = known.task_name or "?"
        if answer == "cancelled":
            detail = (
                "cancelled before it started; it will not run"
                if snapshot.tries == 0
                else f"cancelled after {snapshot.tries} attempt(s), before the next one; it "
                "will not run again"
            )
            return CancelResult(id=task_id, cancelled=True, state="cancelled", detail=detail)
        if answer == "running":
            return CancelResult(
                id=task_id,
                cancelled=False,
                state="running",
                detail=f"task {name} is a def task running in a worker thread, which cannot be "
                "interrupted; it will run to completion",
            )
        if answer == "aborting":
            return await self._await_abort(task_id, name, dispatched=snapshot.dispatched)
        # It finished between the read and the script.
        now_known = await self.status(task_id)
        state = now_known.state if now_known is not None else "unknown"
        return CancelResult(id=task_id, cancelled=False, state=state, detail=f"already {state}")

    async def _await_abort(self, task_id: str, name: str, *, dispatched: bool) -> CancelResult:
        """Wait for a worker to act on an abort request, up to `cancel_wait` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.cancel_wait
        delay = 0.005
        while True:
            known = await self.status(task_id)
            if known is None:
                return CancelResult(
                    id=task_id,
                    cancelled=False,
                    state="unknown",
                    detail="the job ended while its abort was requested, and keeps no result",
                )
            if known.state == "cancelled":
                return CancelResult(
                    id=task_id,
                    cancelled=True,
                    state="cancelled",
                    detail="aborted while running: the task got CancelledError and was drained",
                )
            if known.done:
                return CancelResult(
                    id=task_id,
                    cancelled=False,
                    state=known.state,
                    detail=f"already {known.state}: it finished before the abort reached it",
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)
        waited = f"no worker acknowledged the abort within {self.options.cancel_wait}s"
        if dispatched:
            # An async def task: the request stays in ARQ's abort set until a worker acts on it,
            # including one that runs the job again after its worker died.
            return CancelResult(
                id=task_id,
                cancelled=True,
                state=known.state,
                detail=f"abort requested, but {waited}; the task is cancelled when its worker "
                "checks for aborts",
            )
        return CancelResult(
            id=task_id,
            cancelled=False,
            state=known.state,
            detail=f"abort requested, but {waited}; an async def task is cancelled when its "
            f"worker checks, a def task ({name} was not queued by taskbridge, so its kind is "
            "unknown here) cannot be",
        )

    def job(self, job_id: str, queue_name: str | None = None) -> Job:
        """ARQ's `Job` for a dispatched call (its handle's id), reading results as JSON.

        `await backend.job(handle.id).result(timeout=...)` returns the task's value or raises
        its exception (rebuilt, or a RemoteTaskError).
        """
        return Job(
            job_id,
            self.redis,
            _queue_name=queue_name or self.options.queue_name,
            _deserializer=deserialize,
        )

    def _unavailable(self, exc: BaseException, what: str) -> BackendUnavailable:
        return BackendUnavailable(
            f"backend {self.alias!r} (ARQ) cannot reach Redis at "
            f"{redact_url(self.options.redis_url)}{what}: {type(exc).__name__}: {exc}; check "
            f"that Redis is running and TASKBRIDGE_BACKENDS__{self.alias.upper()}__REDIS_URL",
            backend=self.alias,
        )

    # -- worker ---------------------------------------------------------------------------

    @classmethod
    def add_worker_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """`--queue`, `--max-jobs`, `--burst`."""
        fields = cls.options_model.model_fields
        parser.add_argument(
            "--queue",
            default=None,
            help="queue to serve (default: the alias's queue_name option, "
            f"{fields['queue_name'].default!r} if unset)",
        )
        parser.add_argument(
            "--max-jobs",
            type=int,
            default=None,
            help="jobs run at once (default: the alias's max_jobs option, "
            f"{fields['max_jobs'].default} if unset)",
        )
        parser.add_argument("--burst", action="store_true", help="exit once the queue is empty")

    def create_worker(
        self,
        bridge: WorkerBridge,
        redis: ArqRedis,
        *,
        queue: str | None = None,
        max_jobs: int | None = None,
        burst: bool = False,
        handle_signals: bool = True,
        connection: ConnectionState | None = None,
    ) -> TaskbridgeWorker:
        """An ARQ worker for `bridge`'s tasks on `queue`, configured from this alias's options.

        Build it with the event loop it will run on set as the current one. `redis` need not
        be connected yet: the worker connects, and reconnects after faults, by itself (a
        `--burst` one gives up at start-up after `conn_retries` retries). `connection` tracks
        whether it reaches Redis (with the `--health-file`).
        """
        if not bridge.tasks:
            raise ConfigurationError("the bridge has no tasks registered: nothing to work on")
        options = self.options
        wakeups = WakeUps()
        progress_ttl = None if options.keep_result_forever else options.job_timeout
        reporter = ProgressReporter(
            None if progress_ttl is None else to_ms(progress_ttl + options.keep_result),
            self.index_spec,
        )
        threads: set[str] = set()
        return TaskbridgeWorker(
            job_functions(bridge, self.alias, options, wakeups, reporter=reporter, threads=threads),
            wakeups=wakeups,
            reporter=reporter,
            threads=threads,
            connection=connection,
            start_retries=options.conn_retries if burst else None,
            start_retry_delay=options.conn_retry_delay,
            probe=lambda: self.connect(socket_timeout=options.socket_timeout),
            hang_timeout=options.socket_timeout,
            index=self.index_spec,
            poll_delay=options.poll_delay,
            queue_name=queue or options.queue_name,
            redis_pool=redis,
            burst=burst,
            handle_signals=handle_signals,
            job_completion_wait=options.job_completion_wait,
            max_jobs=max_jobs or options.max_jobs,
            job_timeout=options.job_timeout,
            keep_result=options.keep_result,
            keep_result_forever=options.keep_result_forever,
            queue_read_limit=options.queue_read_limit,
            max_tries=UNLIMITED_TRIES,
            health_check_interval=options.health_check_interval,
            health_check_key=options.health_check_key,
            allow_abort_jobs=True,
            job_serializer=serialize,
            job_deserializer=deserialize_for_worker,
            expires_extra_ms=options.expires_extra_ms,
        )

    def run_worker(self, bridge: WorkerBridge, arguments: argparse.Namespace) -> int:
        """Run an ARQ worker until SIGTERM/SIGINT (or, with `--burst`, an empty queue).

        Redis faults do not end it: it reconnects (see TaskbridgeWorker), including when Redis
        cannot be reached at start-up, where it keeps trying (a `--burst` worker gives up after
        `conn_retries` retries, exit code 1). With `--health-file PATH`, PATH exists exactly
        while the worker reaches Redis.
        """
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        queue = arguments.queue or self.options.queue_name
        state = ConnectionState(f"ARQ worker ({queue})", getattr(arguments, "health_file", None))
        try:
            worker = self.create_worker(
                bridge,
                self._worker_redis(),
                queue=arguments.queue,
                max_jobs=arguments.max_jobs,
                burst=arguments.burst,
                connection=state,
            )
            try:
                worker.run()
            except LINK_ERRORS as exc:  # a --burst worker that never reached Redis
                logger.error("%s", self._unavailable(exc, " at worker start-up"))
                return 1
            except RedisError as exc:
                logger.error("%s", self._unavailable(exc, " while working"))
                return 1
            return 0
        finally:
            state.close()
            loop.close()
            asyncio.set_event_loop(None)

    def _worker_redis(self) -> ArqRedis:
        """The worker's client (no connection made yet). Its commands have no timeout of their
        own: the worker's watchdog PINGs within `socket_timeout` on a connection of its own and
        drops the pool's connections when Redis stops answering (see TaskbridgeWorker)."""
        return self.connect()
