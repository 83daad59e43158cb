"""CeleryBackend: taskbridge calls as Celery protocol-v2 messages, run by a Celery worker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from taskbridge import BackendUnavailable, ConfigurationError
from taskbridge.backends import (
    Backend,
    CallIndex,
    CancelResult,
    KeptCall,
    Policy,
    TaskCall,
    TaskStatus,
    WorkerBridge,
)

from ._amqp import AmqpPublisher
from ._index import index_spec, index_with_broker
from ._keys import marker_life
from ._options import CeleryOptions, celery_config, redis_transport
from ._protocol import MessageBuilder, TaskMessage
from ._sentinel import redact as redact_url  # every password of a `;`-separated Sentinel list
from ._status import Snapshot, StatusStore
from ._worker import (
    CANCEL_COMMAND,
    add_worker_arguments,
    build_app,
    register_tasks,
    run_worker,
    worker_queues,
)

if TYPE_CHECKING:
    from celery import Celery  # type: ignore[import-untyped]


__all__ = ["CeleryBackend"]

logger = logging.getLogger("taskbridge.celery")


class _Publisher(Protocol):
    @property
    def errors(self) -> tuple[type[BaseException], ...]: ...

    async def ping(self) -> None: ...

    async def publish(self, messages: Sequence[TaskMessage]) -> list[str]: ...

    async def close(self) -> None: ...


_PING_ID = "taskbridge-ping"
"""A task id no call has: `ping` reads its status to check the result backend answers."""


class CeleryBackend(Backend):
    """Sends calls to Celery workers as native Celery messages (protocol v2, JSON only).

    Dispatch does not go through `apply_async`: a request's calls are built as Celery messages
    and published together, with one Redis round trip (LPUSH, or one Lua script that also takes
    idempotency keys and writes `queued` markers) or one RabbitMQ write and publisher-confirm
    wait (batches of concurrent requests group-committed). Workers are plain Celery workers
    started by `taskbridge worker <alias> module:bridge`, so Flower and `celery inspect` work.

    With a (Redis) `result_backend`, `status` reads Celery's result meta directly with
    redis.asyncio and `cancel` revokes: see `status` and `cancel`; `index` lists the alias's
    calls, written with the publish and the worker's result writes (see `_index`).
    """

    supports_delay: ClassVar[bool] = True
    supports_queues: ClassVar[bool] = True
    supports_worker: ClassVar[bool] = True
    supports_status: ClassVar[bool] = True
    """True with a `result_backend` (set per alias: False without one)."""
    supports_cancel: ClassVar[bool] = True
    options_model: ClassVar[type[CeleryOptions]] = CeleryOptions

    options: CeleryOptions

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self._app: Celery | None = None
        self._builder: MessageBuilder | None = None
        self._publisher: _Publisher | None = None
        self._warmup: asyncio.Task[None] | None = None
        self._store: StatusStore | None = None
        self._releasing: set[asyncio.Task[None]] = set()
        self._index_spec = index_spec(self.options)
        if self.options.result_backend is None:
            # The core's capability flags are class variables; this one depends on the alias.
            self.__dict__["supports_status"] = False

    def validate_policy(self, task_name: str, policy: Policy) -> None:
        """Refuse idempotency keys when no Redis can hold them (an AMQP broker and no result
        backend): running a keyed call twice would be worse than an error."""
        super().validate_policy(task_name, policy)
        if policy.key is not None and not self._keys_in_redis:
            raise ConfigurationError(
                f"task {task_name!r}: backend {self.alias!r} (Celery on "
                f"{redact_url(self.options.broker_url)}) cannot deduplicate calls by idempotency "
                f"key (key={policy.key!r}): the key is taken atomically in Redis, and this alias "
                "has neither a Redis broker nor a Redis result_backend; set its result_backend "
                "to a redis:// URL, drop the key, or route the task to a backend that supports "
                "keys"
            )

    def queue_for(self, policy: Policy) -> str:
        """The Celery queue the call goes to: the policy's, else `default_queue`."""
        return policy.queue or self.options.default_queue

    @property
    def _keys_in_redis(self) -> bool:
        return redis_transport(self.options) or self.options.result_backend is not None

    @property
    def store(self) -> StatusStore | None:
        """Where status is read (None without a result backend)."""
        if self._store is None and self.options.result_backend is not None:
            self._store = StatusStore(self.options, self._timeout)
        return self._store

    @property
    def app(self) -> Celery:
        """A Celery app configured like the workers (no tasks): for `AsyncResult`, `control`."""
        if self._app is None:
            self._app = build_app(self.options)
        return self._app

    @property
    def _timeout(self) -> float:
        return float(self.options.celery.get("broker_connection_timeout", 4.0))

    def _make_publisher(self) -> _Publisher:
        if redis_transport(self.options):
            from ._redis import RedisPublisher

            # No Celery app needed: the queue key follows from the transport options alone.
            config = celery_config(self.options)
            transport = config["broker_transport_options"]
            # With a result backend, each message's `queued` marker goes in the same round trip
            # (so status tells a queued call from an unknown one); the worker's claim deletes it.
            marker_ttl = 0.0
            if self.options.result_backend is not None and self.options.track_queued:
                marker_ttl = marker_life(self.options)
            return RedisPublisher(
                self.options.broker_url,
                transport,
                self._timeout,
                key_prefix=self.options.key_prefix or "",
                marker_ttl=marker_ttl,
                index=self._index_spec if index_with_broker(self.options) else None,
            )
        app = self.app
        timeout = self._timeout

        def connect() -> Any:
            return app.connection_for_write(
                transport_options={"read_timeout": timeout, "write_timeout": timeout}
            )

        def declare(channel: Any, queue: str) -> None:
            app.amqp.queues[queue](channel).declare()

        def declare_delayed(connection: Any, queue: str) -> None:
            from ._delayed import declare_delayed_delivery

            queue_type = app.conf.broker_native_delayed_delivery_queue_type
            declare_delayed_delivery(connection, app.amqp.queues[queue], queue_type)

        # kombu's own switch; on by default here, so that a 2xx means RabbitMQ has the calls
        confirm = bool(app.conf.broker_transport_options.get("confirm_publish", True))
        return AmqpPublisher(
            connect, declare, timeout, self.alias, confirm=confirm, declare_delayed=declare_delayed
        )

    @property
    def publisher(self) -> _Publisher:
        if self._publisher is None:
            self._publisher = self._make_publisher()
        return self._publisher

    async def open(self) -> None:
        """Start connecting in the background; a broker that is down does not stop start-up."""
        self._warmup = asyncio.get_running_loop().create_task(self._warm())

    async def _warm(self) -> None:
        try:
            await self.publisher.ping()
        except Exception as exc:
            logger.warning(
                "backend %r: the Celery broker at %s is not reachable yet (%s: %s); calls will "
                "fail with BackendUnavailable until it is",
                self.alias,
                redact_url(self.options.broker_url),
                type(exc).__name__,
                exc,
            )

    async def close(self) -> None:
        """Wait for the warm-up, then close the broker and result backend connections."""
        if self._warmup is not None:
            warmup, self._warmup = self._warmup, None
            if not warmup.done():
                warmup.cancel()
            await asyncio.gather(warmup, return_exceptions=True)
        if self._publisher is not None:
            publisher, self._publisher = self._publisher, None
            await publisher.close()
        if self._store is not None:
            await self._store.close()
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)

    async def ping(self) -> str:
        """One round trip to the broker; BackendUnavailable if it does not answer."""
        publisher = self.publisher
        try:
            await publisher.ping()
        except publisher.errors as exc:
            raise self._unavailable(f"does not answer ({type(exc).__name__}: {exc})") from exc
        store = self.store
        if store is not None:  # status reads go there: it must answer too
            try:
                await store.read(_PING_ID)
            except store.errors as exc:
                raise self._results_unavailable(exc) from exc
        results = self.options.result_backend
        return f"Celery broker {redact_url(self.options.broker_url)}" + (
            f", results in {redact_url(results)}" if results else ", no result backend"
        )

    def _unavailable(self, problem: str) -> BackendUnavailable:
        return BackendUnavailable(
            f"backend {self.alias!r}: the Celery broker at "
            f"{redact_url(self.options.broker_url)} {problem}; check that it is running and "
            "reachable",
            backend=self.alias,
        )

    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        """Publish `calls` as one batch; BackendUnavailable if the broker does not take them.

        A call with an idempotency key whose key is held (dispatched within its key_ttl) is not
        published: the caller already has its handle, whose id is the same. On Redis the key is
        taken in the publishing script; on RabbitMQ, in the result backend's Redis first.
        """
        builder = self._builder
        if builder is None:
            builder = self._builder = MessageBuilder(self.app, self.options.default_queue)
        messages = [builder.build(call, self.signer) for call in calls]
        taken: list[str] = []
        skipped: list[str] = []
        if not redis_transport(self.options) and any(m.key_ttl is not None for m in messages):
            messages, taken, skipped = await self._take_keys(messages)
        publisher = self.publisher
        try:
            if messages:
                skipped += await self._publish(publisher, messages, taken)
        except publisher.errors as exc:
            # Refused (not merely slow): give the keys back, so that dispatching again can work.
            self._release_later(taken)
            names = ", ".join(sorted({call.name for call in calls}))
            raise self._unavailable(
                f"did not accept {len(calls)} call(s) of {names} ({type(exc).__name__}: {exc})"
            ) from exc
        for task_id in skipped:
            logger.info(
                "task call [%s] not published: its idempotency key was dispatched within its "
                "key_ttl",
                task_id,
            )

    async def _publish(
        self, publisher: _Publisher, messages: list[TaskMessage], taken: list[str]
    ) -> list[str]:
        """Publish `messages`; once the broker took them, start writing what the publish
        cannot carry to the result backend's Redis (`StatusStore.beside`): their `queued`
        markers with RabbitMQ, their index rows when the broker is not that Redis (else the
        publisher indexes them in its own round trip)."""
        store = self.store
        if store is not None and not store.writes_beside:
            store = None  # the publish carries all there is to write, or nothing is written
        if store is not None:
            await store.room()
        if taken and isinstance(publisher, AmqpPublisher):
            # Given up on (dispatch timeout) before it was written, the batch is withdrawn:
            # never sent, so its keys go back, as when the broker refuses it.
            skipped = await publisher.publish(
                messages, on_withdrawn=lambda: self._release_later(taken)
            )
        else:
            skipped = await publisher.publish(messages)
        if store is not None:
            # Not awaited by the request (a read here waits for it instead), and only for the
            # calls the broker took: a refused publish leaves no marker or index row behind.
            if skipped:
                dropped = set(skipped)
                messages = [m for m in messages if m.id not in dropped]
            store.beside(messages)
        return skipped

    async def _take_keys(
        self, messages: list[TaskMessage]
    ) -> tuple[list[TaskMessage], list[str], list[str]]:
        """AMQP broker: take the dedup keys of the keyed messages in the result backend's Redis
        (one round trip); return the messages to publish, the keys taken, the ids skipped."""
        store = self.store
        assert store is not None  # validate_policy refuses keys otherwise
        keyed = [m for m in messages if m.key_ttl is not None]
        try:
            flags = await store.take_keys(keyed)
        except store.errors as exc:
            raise self._results_unavailable(exc) from exc
        lost = {id(m) for m, flag in zip(keyed, flags, strict=True) if not flag}
        taken = [m.id for m, flag in zip(keyed, flags, strict=True) if flag]
        return (
            [m for m in messages if id(m) not in lost],
            taken,
            [m.id for m in keyed if id(m) in lost],
        )

    def _release_later(self, task_ids: list[str]) -> None:
        # Not awaited: the dispatch is failing already, and a Redis that does not answer should
        # not make it fail later. (On a dispatch timeout only a withdrawn batch's keys are
        # released: a batch already written may still arrive.)
        store = self.store
        if not task_ids or store is None:
            return

        async def release() -> None:
            with contextlib.suppress(*store.errors):
                await store.release_keys(task_ids)

        task = asyncio.get_running_loop().create_task(release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    def _results_unavailable(self, exc: BaseException) -> BackendUnavailable:
        results = self.options.result_backend or "?"
        return BackendUnavailable(
            f"backend {self.alias!r}: the Celery result backend at {redact_url(results)} does "
            f"not answer ({type(exc).__name__}: {exc}); check that it is running and reachable",
            backend=self.alias,
        )

    # -- status and cancel ----------------------------------------------------------------

    async def status(self, task_id: str) -> TaskStatus | None:
        """The call's state from Celery's result meta, read with one MGET (redis.asyncio).

        PENDING (no result): queued when dispatch left a `queued` marker (`track_queued`) or the
        call's idempotency key names it, else None (unknown: Celery cannot tell a queued call
        from one it never saw). STARTED/PROGRESS: running, with the attempt, start time and the
        progress the task reported. RETRY: retrying, with the error. SUCCESS: succeeded, with the
        result. FAILURE: failed, with the error's type, message and traceback. REVOKED:
        cancelled. Arguments where the meta (or the marker) keeps them. None without a result
        backend.
        """
        store = self.store
        if store is None:
            return None
        snapshot = await self._read(store, task_id)
        return snapshot.status(self.alias)

    async def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        """`status` of each of `task_ids`, read in one round trip (one MGET; one to each Redis
        at once when the broker is another Redis than the results)."""
        store = self.store
        if store is None:
            return [None] * len(task_ids)
        try:
            snapshots = await store.read_many(task_ids)
        except store.errors as exc:
            raise self._results_unavailable(exc) from exc
        return [snapshot.status(self.alias) for snapshot in snapshots]

    @property
    def index(self) -> CallIndex | None:
        """The alias's call index, in the result backend's Redis (`RedisIndex` under
        `<key_prefix>taskbridge:index`): None without a result backend or with
        `index_max_entries=0`. Dispatch adds calls to it in the round trip of their publish,
        the worker moves them from state to state in the scripts of its result writes."""
        store = self.store
        return None if store is None else store.index()

    async def kept_call(self, task_id: str) -> KeptCall | None:
        """The task and arguments of a failed or cancelled call, from its result meta: kept by
        taskbridge's worker (up to 64 KiB of JSON) or by Celery's `result_extended`."""
        store = self.store
        if store is None:
            return None
        return (await self._read(store, task_id)).kept_call()

    async def _read(self, store: StatusStore, task_id: str) -> Snapshot:
        try:
            return await store.read(task_id)
        except store.errors as exc:
            raise self._results_unavailable(exc) from exc

    async def cancel(self, task_id: str) -> CancelResult:
        """Cancel a call: a queued (or retrying) one never starts; a running one is stopped
        where the worker's pool allows, and the answer says when it cannot be.

        Queued: REVOKED is stored by a Lua script that a worker's claim of the call cannot
        interleave with; the claim then refuses to run it, on any worker, started before or
        after. Running on prefork: `revoke(terminate=True)` to its worker (the child process is
        stopped with SIGTERM). Running `async def` on threads: the `taskbridge_cancel` command
        cancels its asyncio task. A running `def` call on threads or solo, and any call on solo,
        cannot be interrupted: cancelled=False, saying so. Running calls are awaited up to
        `cancel_wait` seconds to be reported cancelled.
        """
        store = self.store
        if store is None:
            await self._control("revoke", task_id)
            return CancelResult(
                id=task_id,
                cancelled=False,
                state="unknown",
                detail="this alias has no result backend, so whether the call is queued, "
                "running or finished is not known; a revoke was broadcast, so live workers "
                "will not start it (workers started later do not know of it); set "
                "result_backend for status and reliable cancellation",
            )
        snapshot = await self._read(store, task_id)
        known = snapshot.status(self.alias)
        if known is None and store.tracks_queued:
            return CancelResult(
                id=task_id,
                cancelled=False,
                state="unknown",
                detail=f"Redis holds no result and no queued marker of call {task_id} (never "
                "dispatched through this alias, or expired)",
            )
        if known is not None and known.done:
            return _already(task_id, known.state)
        if known is None or known.state in ("queued", "retrying"):
            retrying = known is not None and known.state == "retrying"
            try:
                after = await store.revoke(snapshot, "cancelled before it started")
            except store.errors as exc:
                raise self._results_unavailable(exc) from exc
            if after is None:
                if retrying:
                    assert known is not None
                    detail = (
                        f"cancelled after {known.attempts} attempt(s), before the next one; it "
                        "will not run again"
                    )
                elif known is None:
                    detail = (
                        "cancelled: it had not started (no queued marker says whether it is "
                        "queued); it will not run"
                    )
                else:
                    detail = "cancelled before it started; it will not run"
                return CancelResult(id=task_id, cancelled=True, state="cancelled", detail=detail)
            snapshot, known = after, after.status(self.alias)
            if known is None or known.done:
                return _already(task_id, known.state if known else "unknown")
        return await self._cancel_running(snapshot, known)

    async def _cancel_running(self, snapshot: Snapshot, known: TaskStatus) -> CancelResult:
        tb = snapshot.tb
        task_id, name = snapshot.id, known.task_name or "?"
        pool, hostname, is_async = tb.get("pool"), tb.get("hostname"), tb.get("async") is True
        where = f"worker {hostname}" if hostname else "its worker"
        if pool == "prefork" and isinstance(hostname, str):
            await self._control("revoke", task_id, destination=[hostname], terminate=True)
            return await self._await_cancelled(
                task_id,
                f"terminated while running: the prefork child of {where} running it was "
                "stopped with SIGTERM",
            )
        if pool == "threads" and is_async and isinstance(hostname, str):
            replies = await self._control(
                CANCEL_COMMAND,
                task_id,
                destination=[hostname],
                reply=True,
                timeout=max(0.5, min(2.0, self.options.cancel_wait)),
            )
            answer: Any = next((r[hostname] for r in replies or () if hostname in r), None)
            if isinstance(answer, Mapping) and "ok" in answer:
                return await self._await_cancelled(
                    task_id, f"cancelled while running: its asyncio task on {where} was cancelled"
                )
            now = await self.status(task_id)
            if now is not None and now.done:
                return _already(task_id, now.state)
            problem = answer.get("error") if isinstance(answer, Mapping) else "no answer"
            return CancelResult(
                id=task_id,
                cancelled=False,
                state=known.state,
                detail=f"task {name} could not be cancelled on {where} ({problem})",
            )
        if pool == "threads":
            detail = (
                f"task {name} is a def task running in a thread of {where}'s threads pool, "
                "which cannot be interrupted; it will run to completion (the prefork pool can "
                "stop running def tasks)"
            )
        elif pool == "solo":
            detail = (
                f"task {name} runs in the main thread of {where}'s solo pool, which cannot take "
                "a cancellation before the call ends; it will run to completion (use the "
                "prefork pool, or threads for async def tasks)"
            )
        else:  # started by a worker that did not say its pool: ask every worker, as Celery does
            await self._control("revoke", task_id, terminate=True)
            return await self._await_cancelled(task_id, "terminated while running")
        return CancelResult(id=task_id, cancelled=False, state=known.state, detail=detail)

    async def _await_cancelled(self, task_id: str, detail: str) -> CancelResult:
        """Wait up to `cancel_wait` seconds for the worker to store REVOKED."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.cancel_wait
        delay = 0.01
        while True:
            now = await self.status(task_id)
            state = now.state if now is not None else "unknown"
            if state == "cancelled":
                return CancelResult(id=task_id, cancelled=True, state="cancelled", detail=detail)
            if now is not None and now.done:
                return _already(task_id, state)
            if loop.time() >= deadline:
                return CancelResult(
                    id=task_id,
                    cancelled=False,
                    state=state,
                    detail=f"asked its worker to stop it, and it had not stopped within "
                    f"{self.options.cancel_wait}s (cancel_wait)",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _control(self, command: str, task_id: str, **options: Any) -> Any:
        """A Celery remote-control command, from a thread (kombu blocks)."""
        control = self.app.control
        try:
            if command == "revoke":
                return await asyncio.to_thread(control.revoke, task_id, **options)
            return await asyncio.to_thread(
                control.broadcast, command, arguments={"task_id": task_id}, **options
            )
        except Exception as exc:
            raise self._unavailable(
                f"did not take the {command} command ({type(exc).__name__}: {exc})"
            ) from exc

    @classmethod
    def dev_options(cls, redis_url: str) -> dict[str, Any]:
        """Broker and results in the throwaway Redis of `taskbridge dev`."""
        return {"broker_url": redis_url, "result_backend": redis_url}

    @classmethod
    def add_worker_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """`--queues`, `--concurrency`, `--pool`, `--loglevel` and more, as `celery worker`."""
        add_worker_arguments(parser)

    def run_worker(self, bridge: WorkerBridge, arguments: argparse.Namespace) -> int:
        """Build a Celery app with a task per bridge task and run a Celery worker with it."""
        app = build_app(self.options, worker=True)
        register_tasks(app, bridge, self.alias)
        if arguments.queues:
            queues = [q.strip() for q in arguments.queues.split(",") if q.strip()]
        else:
            queues = worker_queues(bridge, self.alias, self.options.default_queue)
        return run_worker(app, queues, arguments, self.options)


def _already(task_id: str, state: Any) -> CancelResult:
    return CancelResult(id=task_id, cancelled=False, state=state, detail=f"already {state}")
