"""The ARQ backend: dispatch to Redis in ARQ's format (as JSON), and the worker command."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from arq.connections import ArqRedis
from arq.jobs import Job
from arq.utils import timestamp_ms
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from taskbridge import BackendUnavailable, ConfigurationError
from taskbridge.backends import Backend, Policy, TaskCall, redact_url

from ._dispatch import ENQUEUE_SCRIPT, GroupCommit, batch_arguments
from ._options import ArqOptions
from ._serializer import deserialize, serialize
from ._wakeups import WakeUps
from ._worker import TaskbridgeWorker, job_functions

if TYPE_CHECKING:
    from taskbridge import TaskBridge

__all__ = ["ArqBackend"]

logger = logging.getLogger("taskbridge.arq")

_UNLIMITED_TRIES = 2**31 - 1
"""Given to ARQ, whose per-function max_tries cannot follow each job's own retries; the
worker's job function applies max(retries + 1, max_tries) per job instead."""


class ArqBackend(Backend):
    """Sends calls to ARQ workers through Redis, in ARQ's job format with JSON, never pickle.

    A request's calls are enqueued in one Redis round trip (a Lua script doing what ARQ's
    `enqueue_job` does for each); the job id is the call's id. `taskbridge worker ALIAS
    module:bridge` runs an ARQ worker for the bridge's tasks.
    """

    supports_delay: ClassVar[bool] = True
    supports_queues: ClassVar[bool] = True
    supports_worker: ClassVar[bool] = True
    options_model: ClassVar[type[ArqOptions]] = ArqOptions
    options: ArqOptions

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self._redis: ArqRedis | None = None
        self._script: AsyncScript | None = None
        self._group: GroupCommit | None = None

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

    # -- dispatch -------------------------------------------------------------------------

    def connect(self, **redis_options: Any) -> ArqRedis:
        """A new ArqRedis client for this alias: JSON serializer, default queue, expiry set.

        Use it for ARQ's own API (`Job`, `queued_jobs()`, `enqueue_job`), which then reads and
        writes JSON. No connection is made until the first command.
        """
        redis: ArqRedis = ArqRedis.from_url(
            self.options.redis_url,
            socket_connect_timeout=self.options.conn_timeout,
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
        self._redis = self.connect(
            max_connections=self.options.max_connections,
            socket_timeout=self.options.socket_timeout,
        )
        self._script = self._redis.register_script(ENQUEUE_SCRIPT)
        self._group = GroupCommit(self._run_script)
        try:
            await self._redis.script_load(ENQUEUE_SCRIPT)
        except (RedisError, OSError) as exc:
            logger.warning("%s", self._unavailable(exc, " at start-up"))

    async def close(self) -> None:
        """Close the connection pool."""
        if self._group is not None:
            await self._group.wait_idle()
        redis, self._redis, self._script, self._group = self._redis, None, None, None
        if redis is not None:
            await redis.aclose(close_connection_pool=True)

    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        """Enqueue `calls` in one round trip (shared with concurrent dispatches, see
        GroupCommit); a call whose job id exists already is skipped with a warning."""
        if not calls:
            return
        await self.open()
        assert self._group is not None
        keys, argv = batch_arguments(
            calls,
            default_queue=self.options.queue_name,
            now_ms=timestamp_ms(),
            expires_extra_ms=self.options.expires_extra_ms,
        )
        try:
            skipped = await self._group.submit(keys, argv)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc, f" for {len(calls)} call(s)") from exc
        for call in calls:
            if call.id in skipped:
                logger.warning("ARQ job %s exists (queued or has a result); not enqueued", call.id)

    async def _run_script(self, keys: list[str], argv: list[Any]) -> list[bytes]:
        assert self._script is not None
        skipped: list[bytes] = await self._script(keys=keys, args=argv, client=self.redis)
        return skipped

    async def ping(self) -> str:
        """Redis's version, and the default queue's length and worker health check."""
        await self.open()
        health_key = self.options.health_check_key or self.options.queue_name + ":health-check"
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
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

    def add_worker_arguments(self, parser: argparse.ArgumentParser) -> None:
        """`--queue`, `--max-jobs`, `--burst`."""
        parser.add_argument(
            "--queue",
            default=None,
            help=f"queue to serve (default: the queue_name option, {self.options.queue_name!r})",
        )
        parser.add_argument(
            "--max-jobs",
            type=int,
            default=None,
            help=f"jobs run at once (default: the max_jobs option, {self.options.max_jobs})",
        )
        parser.add_argument("--burst", action="store_true", help="exit once the queue is empty")

    def create_worker(
        self,
        bridge: TaskBridge,
        redis: ArqRedis,
        *,
        queue: str | None = None,
        max_jobs: int | None = None,
        burst: bool = False,
        handle_signals: bool = True,
    ) -> TaskbridgeWorker:
        """An ARQ worker for `bridge`'s tasks on `queue`, configured from this alias's options.

        Build it with the event loop it will run on set as the current one.
        """
        if not bridge.tasks:
            raise ConfigurationError("the bridge has no tasks registered: nothing to work on")
        options = self.options
        wakeups = WakeUps()
        return TaskbridgeWorker(
            job_functions(bridge, self.alias, options, wakeups),
            wakeups=wakeups,
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
            max_tries=_UNLIMITED_TRIES,
            health_check_interval=options.health_check_interval,
            health_check_key=options.health_check_key,
            allow_abort_jobs=True,
            job_serializer=serialize,
            job_deserializer=deserialize,
            expires_extra_ms=options.expires_extra_ms,
        )

    def run_worker(self, bridge: TaskBridge, arguments: argparse.Namespace) -> int:
        """Run an ARQ worker until SIGTERM/SIGINT (or, with `--burst`, an empty queue)."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            try:
                redis = loop.run_until_complete(self._worker_redis())
            except BackendUnavailable as exc:
                logger.error("%s", exc)
                return 1
            worker = self.create_worker(
                bridge,
                redis,
                queue=arguments.queue,
                max_jobs=arguments.max_jobs,
                burst=arguments.burst,
            )
            try:
                worker.run()
            except (RedisError, OSError) as exc:
                logger.error("%s", self._unavailable(exc, " while working"))
                return 1
            return 0
        finally:
            loop.close()
            asyncio.set_event_loop(None)

    async def _worker_redis(self) -> ArqRedis:
        """A connected client, retrying `conn_retries` times as ARQ's `create_pool` does."""
        redis = self.connect()
        for attempt in range(self.options.conn_retries + 1):
            try:
                await redis.ping()
                return redis
            except (RedisError, OSError) as exc:
                if attempt == self.options.conn_retries:
                    await redis.aclose(close_connection_pool=True)
                    raise self._unavailable(exc, " at worker start-up") from exc
                logger.warning(
                    "cannot reach Redis at %s (%s); %d retries left",
                    redact_url(self.options.redis_url),
                    exc,
                    self.options.conn_retries - attempt,
                )
                await asyncio.sleep(self.options.conn_retry_delay)
        raise AssertionError("unreachable")
