"""The Celery side: an app built from an alias's options, one Celery task per taskbridge task.

Each Celery task is a thin adapter: it applies the policy the message carries, runs the call
through taskbridge's runner (`run_blocking`) and maps the Outcome onto Celery: a value is the
result, "retry" is `Task.retry` with the runner's backoff (same task id), "failed" re-raises the
task's own exception for the result backend to store.

With a result backend, each attempt first claims the call (`TaskBridgeRedisBackend.claim`: stores
STARTED, or finds it revoked and does not run it) and runs with a reporter that stores the
progress the task reports. `async def` calls running on a threads-pool worker's loops can be
cancelled by the `taskbridge_cancel` remote-control command.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import keyword
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from taskbridge import current_task
from taskbridge.backends import (
    Outcome,
    Receiver,
    Task,
    TaskContext,
    WorkerBridge,
    close_thread_loop,
    encode_json,
    run_blocking,
)

from ._health import watch_connection
from ._inbound import guarded_strategy
from ._index import INDEX_SETTING, index_spec
from ._options import CeleryOptions, celery_config, redis_transport
from ._protocol import (
    HARD_LIMIT_GRACE,
    POLICY_HEADER,
    SIGNATURE_HEADER,
    TRACE_HEADER,
    engine_fields,
)
from ._results import TaskBridgeRedisBackend, backend_cls

if TYPE_CHECKING:
    from celery import Celery  # type: ignore[import-untyped]


__all__ = [
    "CANCEL_COMMAND",
    "add_worker_arguments",
    "build_app",
    "register_tasks",
    "restore_interval",
    "run_worker",
    "worker_queues",
]

logger = logging.getLogger("taskbridge.celery")

POOLS = ("prefork", "threads", "solo")

CANCEL_COMMAND = "taskbridge_cancel"
"""The remote-control command that cancels a running `async def` call (threads pool)."""

_pool: str | None = None
"""This worker's pool, set by `run_worker` (prefork children inherit it)."""

_running: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = {}
"""`async def` calls running in this process, by id: the loop and the asyncio task."""
_cancelling: set[str] = set()
"""Ids of running calls that `taskbridge_cancel` cancelled."""


def build_app(options: CeleryOptions, *, worker: bool = False) -> Celery:
    """A Celery app configured from `options` (no tasks): the API side's and the worker's.

    Only the worker's app becomes Celery's current app, which prefork children rely on.
    """
    from celery import Celery

    app = Celery("taskbridge", set_as_current=worker)
    app.conf.update(celery_config(options))
    if worker:  # a malformed message is dropped, never fatal (see _consumer, _transport)
        from ._consumer import worker_settings

        app.conf.update(worker_settings(options))
    if options.result_backend is not None:
        # conf.result_backend stays the configured URL (for Flower and the celery tools).
        app.backend_cls = backend_cls(options.result_backend)
    spec = index_spec(options)
    if spec is not None:  # where the worker's result writes move calls in the call index
        app.conf[INDEX_SETTING] = spec.setting()
    return app


def _check_result(name: str, value: Any) -> Any:
    try:
        encode_json(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"task {name!r} returned a {type(value).__module__}.{type(value).__qualname__}, "
            "which the JSON result backend cannot store; return JSON values (str, int, float, "
            "bool, None, list, dict) or nothing"
        ) from None
    return value


class _Reporter:
    """Stores the progress a call reports as its PROGRESS result (one Lua script per report)."""

    __slots__ = ("backend", "fields", "request")

    def __init__(
        self, backend: TaskBridgeRedisBackend, request: Any, fields: dict[str, Any]
    ) -> None:
        self.backend, self.request, self.fields = backend, request, fields

    def started(self, context: TaskContext) -> None:
        """Nothing to store: the claim stored STARTED."""

    def progress(self, context: TaskContext, fraction: float, message: str | None) -> None:
        self.fields["progress"] = fraction
        self.fields["progress_message"] = None if message is None else str(message)
        self.backend.report_progress(self.request, self.fields)

    def finished(self, context: TaskContext, outcome: Outcome) -> None:
        """Nothing to store: Celery stores the result, the error or the retry."""


def _trace(request: Any) -> dict[str, Any] | None:
    carried = getattr(request, TRACE_HEADER, None)
    return carried if isinstance(carried, dict) else None


NATIVE_DELAY_MIN = 1.5
"""Seconds at least between a failed attempt and its retry when Celery sends retries through
RabbitMQ's native delayed delivery (quorum queues): it counts whole seconds, and refuses a
countdown that truncates to 0 (`calculate_routing_key`'s ValueError, which made Celery drop the
call); the half second covers the time until Celery computes the countdown."""


@functools.cache
def _delays_natively(app: Any) -> bool:
    """Whether Celery's `send_task` may use RabbitMQ's native delayed delivery for this app
    (its own test: a quorum queue among the app's queues, on an AMQP broker)."""
    from celery.utils.quorum_queues import detect_quorum_queues  # type: ignore[import-untyped]

    with app.connection_for_write() as connection:  # (not connected: only its transport)
        return bool(detect_quorum_queues(app, connection.transport.driver_type)[0])


def _retry(celery_task: Any, receiver: Receiver, outcome: Outcome) -> Any:
    """Celery's `retry` for the runner's decision: same id, due after the runner's backoff
    (at least `NATIVE_DELAY_MIN` on quorum queues).

    With a `signing_key`, the new message is signed again: its retry count and due time
    changed, and the signature covers them.
    """
    request = celery_task.request
    delay = outcome.retry_in or 0.0
    if 0 < delay < NATIVE_DELAY_MIN and _delays_natively(celery_task.app):
        delay = NATIVE_DELAY_MIN
    eta = datetime.now(UTC) + timedelta(seconds=delay)
    if receiver.signer is None:
        return celery_task.retry(eta=eta, exc=outcome.error)
    engine = engine_fields(request.timelimit, eta, _expires(request.expires), request.retries + 1)
    signature = receiver.signer.sign(
        request.id,
        celery_task.name,
        list(request.args),
        dict(request.kwargs),
        policy=getattr(request, POLICY_HEADER, None),
        engine=engine,
    )
    headers = {**(request.headers or {}), SIGNATURE_HEADER: signature}
    return celery_task.retry(eta=eta, exc=outcome.error, headers=headers)


def _expires(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


@functools.cache
def _stores_results(app: Any) -> bool:
    """Whether `app` has a result backend (read once: Celery's settings lookup costs more than
    a no-op task's run)."""
    return bool(app.conf.result_backend)


def _ignore() -> Exception:
    """Celery's Ignore (the task is not run, or not recorded, and no state is stored)."""
    from celery.exceptions import Ignore  # type: ignore[import-untyped]

    error: Exception = Ignore()
    return error


def _execute(
    celery_task: Any,
    task: Task[..., Any],
    runner_task: Task[..., Any],
    receiver: Receiver,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    request = celery_task.request
    # Checked by the strategy (guarded_strategy) before Celery accepted the message; cached.
    policy = receiver.policy(task, getattr(request, POLICY_HEADER, None), request.id)
    backend = celery_task.backend
    reporter = None
    if isinstance(backend, TaskBridgeRedisBackend):
        current, fields = backend.claim(request, _pool, task.is_async)
        if current is not None:
            revoked = current.get("status") == "REVOKED"
            why = (
                "it was cancelled before it started"
                if revoked
                else "it already succeeded (its message was delivered again)"
            )
            if revoked:
                backend.keep_arguments(request, current)
            logger.warning("task %s [%s] not run: %s", task.name, request.id, why)
            raise _ignore()
        reporter = _Reporter(backend, request, fields)
    try:
        outcome = run_blocking(
            runner_task,
            args,
            kwargs,
            call_id=request.id,
            policy=policy,
            attempt=request.retries + 1,
            reporter=reporter,
            trace=_trace(request),
        )
    except asyncio.CancelledError:
        if request.id not in _cancelling:
            raise
        logger.warning("task %s [%s] cancelled while running", task.name, request.id)
        backend.mark_as_revoked(request.id, "cancelled while running", request=request)
        raise _ignore() from None
    finally:
        # (a task that swallowed its cancellation ends as it returns)
        _cancelling.discard(request.id)
    if outcome.state == "succeeded":
        if _stores_results(celery_task.app):
            return _check_result(task.name, outcome.value)
        return outcome.value
    if outcome.state == "retry":
        raise _retry(celery_task, receiver, outcome)
    assert outcome.error is not None
    raise outcome.error


def _cancellable(task: Task[..., Any]) -> Task[..., Any]:
    """`task` with its `async def` function wrapped to register the asyncio task running each
    call in `_running`, where `taskbridge_cancel` finds it."""
    func = task.func

    @functools.wraps(func)
    async def tracked(*args: Any, **kwargs: Any) -> Any:
        context, running = current_task(), asyncio.current_task()
        if context is None or running is None:
            return await func(*args, **kwargs)
        _running[context.id] = (asyncio.get_running_loop(), running)
        try:
            return await func(*args, **kwargs)
        finally:
            _running.pop(context.id, None)

    return Task(
        task.bridge, tracked, task.name, task.decorator_policy, task.using_policy, task.hooks
    )


def cancel_command(state: Any, task_id: str, **_: Any) -> dict[str, str]:
    """`taskbridge_cancel <task_id>`: cancel the `async def` call running here on a loop of this
    process (threads and solo pools run calls in the worker process; prefork children are
    stopped with `revoke(terminate=True)` instead)."""
    found = _running.get(task_id)
    if found is None:
        return {"error": f"task {task_id} is not an async call running in this process"}
    loop, running = found
    _cancelling.add(task_id)
    try:
        loop.call_soon_threadsafe(running.cancel)
    except RuntimeError:  # its loop closed: the call ended meanwhile
        _cancelling.discard(task_id)
        return {"error": f"task {task_id} ended"}
    return {"ok": f"cancelling {task_id}"}


def _adapter(task: Task[..., Any], receiver: Receiver) -> Any:
    runner_task = _cancellable(task) if task.is_async else task

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _execute(self, task, runner_task, receiver, args, kwargs)

    run.__name__ = run.__qualname__ = _identifier(task.name)
    run.__doc__ = f"Runs the taskbridge task {task.name!r} through taskbridge's runner."
    return run


def _identifier(task_name: str) -> str:
    """A Python identifier for the Celery task function of `task_name`: Celery compiles a
    function of that name (`head_from_fun`), which a name such as `reports-build` or
    `<lambda>` would break at worker start with a bare SyntaxError."""
    last = task_name.rpartition(".")[2] or task_name
    name = re.sub(r"\W", "_", last)
    return name if name.isidentifier() and not keyword.iskeyword(name) else f"task_{name}"


def register_tasks(app: Celery, bridge: WorkerBridge, alias: str = "celery") -> None:
    """Register one Celery task per bridge task, under the same name, for backend `alias`.

    Every task is registered, whatever its route: a `.using(backend=...)` call can send any
    task here. Time limits come from the task's policy; a message's own `timelimit` header
    (set from the dispatcher's policy) overrides them.
    """
    receiver = Receiver(bridge, alias)
    for name, task in bridge.tasks.items():
        timeout = bridge.resolve(task).policy.timeout
        app.task(
            _adapter(task, receiver),
            name=name,
            bind=True,
            shared=False,
            lazy=False,
            typing=False,
            max_retries=None,  # the runner decides; Celery's default would stop at 3
            time_limit=None if timeout is None else timeout + HARD_LIMIT_GRACE,
            soft_time_limit=None if timeout is None or task.is_async else timeout,
            track_started=False,  # the claim stores STARTED (with more), see _execute
            Strategy=staticmethod(guarded_strategy),
            taskbridge_task=task,
            taskbridge_receiver=receiver,
        )


def worker_queues(bridge: WorkerBridge, alias: str, default_queue: str) -> list[str]:
    """The queues a worker consumes by default: the alias's default queue and every queue
    named by a task routed to this alias."""
    queues = [default_queue]
    for task in bridge.tasks.values():
        policy = bridge.resolve(task).policy
        if policy.backend == alias and policy.queue:
            queues.append(policy.queue)
    return list(dict.fromkeys(queues))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The Celery worker's options (named like `celery worker`'s)."""
    parser.add_argument(
        "-Q",
        "--queues",
        help="comma-separated queues to consume (default: the alias's default queue and the "
        "queues of the tasks routed to it)",
    )
    parser.add_argument(
        "-c", "--concurrency", type=_positive, help="pool size (default: number of CPUs)"
    )
    parser.add_argument(
        "-P", "--pool", choices=POOLS, default="prefork", help="execution pool (default prefork)"
    )
    parser.add_argument("-l", "--loglevel", default="INFO", help="log level (default INFO)")
    parser.add_argument(
        "-n", "--hostname", help="node name; %%h expands to the host (default celery@%%h)"
    )
    parser.add_argument("-E", "--events", action="store_true", help="send task events (for Flower)")
    parser.add_argument("--without-mingle", action="store_true", help="skip start-up sync")
    parser.add_argument("--without-gossip", action="store_true", help="ignore other workers")
    parser.add_argument("--without-heartbeat", action="store_true", help="send no heartbeats")


def _close_loop(**_: Any) -> None:
    close_thread_loop()


THREADS_WAKE_UP = 0.05
"""Seconds between wake-ups of a threads-pool worker's event loop (see `_wake_up_often`)."""


def _wake_up_often(consumer: Any, hub: Any) -> None:
    """Work around celery/celery#6941 for the threads pool.

    A thread finishing a task schedules its ack on the consumer's event loop without waking
    it, so with acks_late and a prefetch of one per thread the next message waits until the
    loop wakes by itself (up to seconds). A cheap periodic timer bounds that wait.
    """
    hub.timer.call_repeatedly(THREADS_WAKE_UP, _nothing)


def _nothing() -> None:
    """The periodic timer's work: none; waking the loop is the point."""


DEFAULT_VISIBILITY_TIMEOUT = 3600.0
"""kombu's Redis `visibility_timeout`."""


def restore_interval(options: CeleryOptions) -> float:
    """Seconds between a Redis-broker worker's checks for messages to deliver again.

    kombu restores unacknowledged messages older than `visibility_timeout` when a worker starts
    and then only every tenth run of a 10 s timer (so up to 100 s late); the worker checks every
    half visibility timeout instead, between 0.5 and 10 s.
    """
    transport = celery_config(options)["broker_transport_options"]
    visibility = float(transport.get("visibility_timeout") or DEFAULT_VISIBILITY_TIMEOUT)
    return max(0.5, min(10.0, visibility / 2))


def _restore_often(interval: float) -> Any:
    """A timer starter (see `_loop_timers`): the periodic restore of unacknowledged messages."""

    def restore(consumer: Any) -> None:
        task_consumer = getattr(consumer, "task_consumer", None)
        channel = getattr(task_consumer, "channel", None)
        restore_visible = getattr(getattr(channel, "qos", None), "restore_visible", None)
        if restore_visible is None:  # reconnecting
            return
        try:
            restore_visible(num=getattr(channel, "unacked_restore_limit", None), interval=1)
        except Exception as exc:  # the consumer reconnects by itself; try again next time
            logger.debug("could not restore unacknowledged messages: %s", exc)

    def start(consumer: Any, hub: Any) -> None:
        hub.timer.call_repeatedly(interval, restore, (consumer,))

    return start


def _loop_timers(starters: list[Any]) -> type[Any]:
    """A consumer bootstep that sets taskbridge's periodic timers on the worker's event loop
    each time the loop starts: `starter(consumer, hub)` for each of `starters`.

    Not once at `worker_ready`: when the broker connection is lost, Celery clears the loop's
    timers (`celery.worker.loops.asynloop`) and sets its own again on reconnection, through
    `register_with_event_loop`; timers set once were gone after the first reconnection.
    """
    from celery import bootsteps

    class LoopTimers(bootsteps.StartStopStep):  # type: ignore[misc]
        """taskbridge's periodic timers (threads-pool wake-up, Redis restore)."""

        def register_with_event_loop(self, consumer: Any, hub: Any) -> None:
            for starter in starters:
                starter(consumer, hub)

    return LoopTimers


def run_worker(
    app: Celery,
    queues: list[str],
    arguments: argparse.Namespace,
    options: CeleryOptions | None = None,
) -> int:
    """Run a Celery worker until it is stopped; return its exit code."""
    global _pool
    _pool = arguments.pool
    logger.info(
        "taskbridge: Celery worker for %d task(s) on queue(s) %s",
        len(app.tasks) - len([n for n in app.tasks if n.startswith("celery.")]),
        ", ".join(queues),
    )
    from celery import signals

    # Close the runner's per-thread loop (async tasks) where Celery runs tasks: in a prefork
    # child when it exits, in the main process for the solo pool.
    signals.worker_process_shutdown.connect(_close_loop, weak=False)
    signals.worker_shutdown.connect(_close_loop, weak=False)
    timers: list[Any] = []
    if arguments.pool == "threads":
        timers.append(_wake_up_often)
        if "worker_enable_prefetch_count_reduction" not in (options.celery if options else {}):
            # After a reconnection Celery lowers the prefetch count and raises it again from
            # each finishing task's ack callback, which the threads pool runs in the task's
            # thread: a basic.qos on the consumer's py-amqp connection from a second thread,
            # racing the event loop's reads, which can hang that thread with the QoS lock held
            # and leave the worker consuming nothing (seen with RabbitMQ behind a cut link).
            app.conf.worker_enable_prefetch_count_reduction = False
    if options is not None and redis_transport(options):
        timers.append(_restore_often(restore_interval(options)))
    if timers:
        app.steps["consumer"].add(_loop_timers(timers))
    health = watch_connection(app, queues, arguments)  # --health-file
    from celery.worker.control import control_command  # type: ignore[import-untyped]

    control_command(name=CANCEL_COMMAND, args=[("task_id", str)], signature="<task_id>")(
        cancel_command
    )
    from celery.utils.nodenames import (  # type: ignore[import-untyped]
        default_nodename,
        host_format,
    )

    worker = app.Worker(
        hostname=host_format(default_nodename(arguments.hostname)),  # as `celery worker -n`
        pool_cls=arguments.pool,
        concurrency=arguments.concurrency,
        loglevel=arguments.loglevel,
        queues=queues,
        task_events=arguments.events,
        without_mingle=arguments.without_mingle,
        without_gossip=arguments.without_gossip,
        without_heartbeat=arguments.without_heartbeat,
    )
    try:
        worker.start()
    finally:
        health.close()
    return int(worker.exitcode or 0)
