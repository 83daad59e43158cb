"""CeleryBackend: taskbridge calls as Celery protocol-v2 messages, run by a Celery worker."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from taskbridge import BackendUnavailable, ConfigurationError
from taskbridge.backends import Backend, Policy, TaskCall, redact_url

from ._options import CeleryOptions, celery_config, redis_transport
from ._protocol import TaskMessage, build_message
from ._worker import add_worker_arguments, build_app, register_tasks, run_worker, worker_queues

if TYPE_CHECKING:
    from celery import Celery  # type: ignore[import-untyped]

    from taskbridge import TaskBridge

__all__ = ["CeleryBackend"]

logger = logging.getLogger("taskbridge.celery")


class _Publisher(Protocol):
    @property
    def errors(self) -> tuple[type[BaseException], ...]: ...

    async def ping(self) -> None: ...

    async def publish(self, messages: Sequence[TaskMessage]) -> None: ...

    async def close(self) -> None: ...


class CeleryBackend(Backend):
    """Sends calls to Celery workers as native Celery messages (protocol v2, JSON only).

    Dispatch does not go through `apply_async`: a request's calls are built as Celery messages
    and published together, with one Redis LPUSH or one RabbitMQ write and publisher-confirm
    wait (batches of concurrent requests group-committed). Workers are plain Celery workers
    started by `taskbridge worker <alias> module:bridge`, so Flower and `celery inspect` work.
    Results, when `result_backend` is set, are read with `backend.app.AsyncResult(handle.id)`.
    """

    supports_delay: ClassVar[bool] = True
    supports_queues: ClassVar[bool] = True
    supports_worker: ClassVar[bool] = True
    options_model: ClassVar[type[CeleryOptions]] = CeleryOptions

    options: CeleryOptions

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        super().__init__(alias, options)
        self._app: Celery | None = None
        self._publisher: _Publisher | None = None
        self._warmup: asyncio.Task[None] | None = None

    def validate_policy(self, task_name: str, policy: Policy) -> None:
        """Refuse idempotency keys: this backend cannot deduplicate calls yet, and running a
        keyed call twice would be worse than an error."""
        super().validate_policy(task_name, policy)
        if policy.key is not None:
            raise ConfigurationError(
                f"task {task_name!r}: backend {self.alias!r} (Celery) cannot deduplicate calls by "
                f"idempotency key (key={policy.key!r}); drop the key or route the task to a "
                "backend that supports it"
            )

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
            transport = celery_config(self.options)["broker_transport_options"]
            return RedisPublisher(self.options.broker_url, transport, self._timeout)
        from ._amqp import AmqpPublisher

        app = self.app
        timeout = self._timeout

        def connect() -> Any:
            return app.connection_for_write(
                transport_options={"read_timeout": timeout, "write_timeout": timeout}
            )

        def declare(channel: Any, queue: str) -> None:
            app.amqp.queues[queue](channel).declare()

        # kombu's own switch; on by default here, so that a 2xx means RabbitMQ has the calls
        confirm = bool(app.conf.broker_transport_options.get("confirm_publish", True))
        return AmqpPublisher(connect, declare, timeout, self.alias, confirm=confirm)

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
        """Wait for the warm-up, then close the broker connection."""
        if self._warmup is not None:
            warmup, self._warmup = self._warmup, None
            if not warmup.done():
                warmup.cancel()
            await asyncio.gather(warmup, return_exceptions=True)
        if self._publisher is not None:
            publisher, self._publisher = self._publisher, None
            await publisher.close()

    async def ping(self) -> str:
        """One round trip to the broker; BackendUnavailable if it does not answer."""
        publisher = self.publisher
        try:
            await publisher.ping()
        except publisher.errors as exc:
            raise self._unavailable(f"does not answer ({type(exc).__name__}: {exc})") from exc
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
        """Publish `calls` as one batch; BackendUnavailable if the broker does not take them."""
        default_queue = self.options.default_queue
        messages = [build_message(call, default_queue) for call in calls]
        publisher = self.publisher
        try:
            await publisher.publish(messages)
        except publisher.errors as exc:
            names = ", ".join(sorted({call.name for call in calls}))
            raise self._unavailable(
                f"did not accept {len(calls)} call(s) of {names} ({type(exc).__name__}: {exc})"
            ) from exc

    @classmethod
    def dev_options(cls, redis_url: str) -> dict[str, Any]:
        """Broker and results in the throwaway Redis of `taskbridge dev`."""
        return {"broker_url": redis_url, "result_backend": redis_url}

    def add_worker_arguments(self, parser: argparse.ArgumentParser) -> None:
        """`--queues`, `--concurrency`, `--pool`, `--loglevel` and more, as `celery worker`."""
        add_worker_arguments(parser)

    def run_worker(self, bridge: TaskBridge, arguments: argparse.Namespace) -> int:
        """Build a Celery app with a task per bridge task and run a Celery worker with it."""
        app = build_app(self.options, worker=True)
        register_tasks(app, bridge)
        if arguments.queues:
            queues = [q.strip() for q in arguments.queues.split(",") if q.strip()]
        else:
            queues = worker_queues(bridge, self.alias, self.options.default_queue)
        return run_worker(app, queues, arguments)
