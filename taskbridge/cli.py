"""The `taskbridge` command: thin parsing over library calls that return exit codes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from ._bridge import TaskBridge
from ._dispatch import Dispatcher
from ._exceptions import ConfigurationError, TaskBridgeError
from ._policy import POLICY_FIELDS, Policy

__all__ = ["check_bridge", "describe_tasks", "load_bridge", "main"]

_DEFAULTS = Policy()


def load_bridge(target: str) -> TaskBridge:
    """Import `module:attr` (attr defaults to `bridge`); accept a bridge or an app holding one."""
    module_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} from {target!r}: {exc}") from None
    obj: Any = module
    for part in (attr or "bridge").split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(
                f"{module_name!r} has no attribute {attr or 'bridge'!r}"
            ) from None
    if isinstance(obj, TaskBridge):
        return obj
    if hasattr(obj, "state"):
        # an app: attached already, or `FastAPI(lifespan=bridge.lifespan)`, or a module global
        attached = getattr(obj.state, "taskbridge", None)
        lifespan = getattr(getattr(obj, "router", None), "lifespan_context", None)
        for candidate in (attached, getattr(lifespan, "__self__", None), *vars(module).values()):
            if isinstance(candidate, TaskBridge):
                return candidate
        return TaskBridge.of(obj)  # raises BridgeNotFoundError, saying how to attach one
    raise ConfigurationError(f"{target!r} is a {type(obj).__name__}, not a TaskBridge or an app")


def describe_tasks(bridge: TaskBridge) -> str:
    """Each task with its effective backend, queue and non-default policy, and their origins.

    The queue is the one the backend's workers really use: the policy's, else the backend's
    default queue.
    """
    bridge.validate()
    lines: list[str] = []
    for name in sorted(bridge.tasks):
        resolved = bridge.resolve(bridge.tasks[name])
        backend = bridge.backend(resolved.policy.backend)
        lines.append(name)
        for field in POLICY_FIELDS:
            value = getattr(resolved.policy, field)
            source = resolved.sources[field]
            if field == "queue" and value is None:
                value = backend.queue_for(resolved.policy)
                if value is None:
                    continue  # a backend without queues: nothing to show
                source = f"default of backend {backend.alias!r}"
            if (
                field in ("backend", "queue")
                or source != "default"
                or value != getattr(_DEFAULTS, field)
            ):
                shown = ", ".join(t.__name__ for t in value) if field == "retry_on" else str(value)
                lines.append(f"  {field:<18} {shown:<24} ({source})")
    schedules = bridge.schedules
    if schedules:
        now = datetime.now(UTC)
        lines += ["", "schedules:"]
        for schedule in schedules:
            when = f"next {schedule.next_slot(now).isoformat()}" if schedule.enabled else "disabled"
            where = f" ({schedule.source})" if schedule.source else ""
            lines.append(f"  {schedule.name}: {schedule.describe()}; {when}{where}")
    startup = sorted(bridge.periodic.startup)
    if startup:
        lines += ["", f"on start-up: {', '.join(startup)}"]
    return "\n".join(lines) if lines else "no tasks registered"


def _tasks(arguments: argparse.Namespace) -> int:
    print(describe_tasks(load_bridge(arguments.bridge)))
    return 0


async def check_bridge(bridge: TaskBridge) -> tuple[bool, str]:
    """Validate settings, connect to every backend in use and ping it; (all ok, report)."""
    bridge.validate()
    lines = [describe_tasks(bridge), ""]
    healthy = True
    try:
        await bridge.open()
        for alias, backend in sorted(bridge.backends.items()):
            try:
                async with asyncio.timeout(bridge.settings.dispatch_timeout):
                    lines.append(f"backend {alias}: ok ({await backend.ping()})")
            except (TaskBridgeError, OSError, TimeoutError) as exc:
                healthy = False
                lines.append(f"backend {alias}: FAILED ({type(exc).__name__}: {exc})")
    finally:
        await bridge.close()
    return healthy, "\n".join(lines)


def _check(arguments: argparse.Namespace) -> int:
    healthy, report = asyncio.run(check_bridge(load_bridge(arguments.bridge)))
    print(report)
    return 0 if healthy else 1


def _worker(arguments: argparse.Namespace, rest: list[str]) -> int:
    from inspect import getattr_static

    from ._settings import load_settings
    from .backends import load_backend_class

    alias, target = arguments.backend, arguments.bridge
    wants_help = "-h" in rest or "--help" in rest
    if alias is None or (target is None and not wants_help):
        if wants_help:
            arguments.worker_parser.print_help()
            return 0
        missing = "ALIAS, APP" if alias is None else "APP"
        arguments.worker_parser.error(f"the following arguments are required: {missing}")
    parser = argparse.ArgumentParser(
        prog=f"taskbridge worker {alias} {target or 'APP'}",
        description=f"Run a worker for the tasks routed to backend {alias!r}. APP is the "
        "module:attribute of the TaskBridge (or the FastAPI app).",
    )
    parser.add_argument(
        "--health-file",
        default=None,
        help="a file that exists exactly while the worker is connected to its broker (for "
        "container health checks: test -f PATH)",
    )
    parser.add_argument(
        "--scheduler",
        action="store_true",
        help="also run a scheduler for the queued tasks' schedules in this process (any number "
        "may run with scheduler_url set: each slot is dispatched once)",
    )
    if not wants_help:
        bridge = load_bridge(target)
        bridge.validate()
        backend = bridge.backend(alias)
        backend.add_worker_arguments(parser)
        parsed = parser.parse_args(rest)
        if not parsed.scheduler:
            return backend.run_worker(bridge, parsed)
        with scheduler_thread(bridge):
            return backend.run_worker(bridge, parsed)
    # --help needs neither the app nor broker settings; both only help find the alias's engine
    options: dict[str, Any] = {}
    try:
        settings = load_bridge(target).settings if target else load_settings(None)
        options = settings.backends.get(alias, {})
    except ConfigurationError:
        pass
    try:
        cls = load_backend_class(options.get("engine") or alias)
    except ConfigurationError as exc:
        hint = "" if target else " (for an alias set up in the app's code, give APP too)"
        raise ConfigurationError(
            f"cannot list the worker options of {alias!r}{hint}: {exc}"
        ) from None
    if not cls.supports_worker:
        raise ConfigurationError(
            f"backend {alias!r} ({cls.__name__}) has no worker: its calls run where they are "
            "dispatched"
        )
    if isinstance(getattr_static(cls, "add_worker_arguments"), classmethod):
        cls.add_worker_arguments(parser)
    else:  # written as an instance method (older plugins): it needs the alias's options
        try:
            cls(alias, options).add_worker_arguments(parser)
        except ConfigurationError:
            parser.epilog = f"{cls.__name__} lists its own options once {alias!r} has settings."
    parser.parse_args(rest)  # prints the help and exits 0
    return 0


async def run_scheduler(bridge: TaskBridge, stop: asyncio.Event) -> None:
    """Run the schedules of the bridge's queued tasks until `stop` is set.

    It sends through backends of its own (a dispatcher on the bridge's registry), so that it
    can run on a thread next to a worker that uses the bridge's.
    """
    from ._settings import env_name

    dispatcher = Dispatcher(bridge.registry)
    periodic = bridge.periodic.sending_through(dispatcher)
    await dispatcher.open()
    try:
        _, queued = periodic.split()
        log = logging.getLogger("taskbridge.scheduler")
        if not queued:
            log.warning(
                "no enabled schedule of a queued task: nothing to do (in-process tasks' "
                "schedules run in the API processes)"
            )
        elif bridge.settings.scheduler_url is None:
            log.warning(
                "%s is not set: this scheduler assumes it runs alone, and another one would "
                "dispatch the same slots again; set it to a Redis URL to run more than one",
                env_name("scheduler_url"),
            )
        await periodic.scheduler(queued).run(stop)
    finally:
        await dispatcher.close()


def _scheduler(arguments: argparse.Namespace) -> int:
    bridge = load_bridge(arguments.bridge)
    bridge.validate()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_scheduler(bridge, stop)

    asyncio.run(main())
    return 0


@contextlib.contextmanager
def scheduler_thread(bridge: TaskBridge) -> Iterator[None]:
    """Run the bridge's scheduler in a thread of its own (its own event loop) inside the block:
    next to a worker, whose engine owns the main thread."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(run_scheduler(bridge, stop))
        except Exception:
            logging.getLogger("taskbridge.scheduler").exception("the scheduler stopped")
        finally:
            loop.close()

    thread = threading.Thread(target=main, name="taskbridge-scheduler", daemon=True)
    thread.start()
    try:
        yield
    finally:
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop just closed
                loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `taskbridge` command."""
    parser = argparse.ArgumentParser(prog="taskbridge", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    tasks = commands.add_parser("tasks", help="list tasks with their effective routing")
    tasks.add_argument("bridge", help="module:attribute of the TaskBridge (or the FastAPI app)")
    check = commands.add_parser(
        "check",
        help="validate settings, connect to every broker, show routing; exit 1 if one is down",
    )
    check.add_argument("bridge", help="module:attribute of the TaskBridge (or the FastAPI app)")
    scheduler = commands.add_parser(
        "scheduler",
        help="run the schedules of the queued tasks (any number of schedulers may run: with "
        "scheduler_url set, one leads and each slot is dispatched once)",
    )
    scheduler.add_argument("bridge", help="module:attribute of the TaskBridge (or the FastAPI app)")
    dev = commands.add_parser(
        "dev",
        help="run the API (uvicorn --reload), a worker per queue backend and, for queued tasks' "
        "schedules, a scheduler; Ctrl-C stops all",
    )
    dev.add_argument("app", help="module:attribute of the FastAPI app")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--no-reload", action="store_true", help="do not restart on code changes")
    worker = commands.add_parser(
        "worker",
        help="run a worker for a backend's tasks",
        usage="taskbridge worker [-h] ALIAS APP [worker options]",
        description="Run a worker for the tasks routed to backend ALIAS; options after APP are "
        "the backend's own: `taskbridge worker ALIAS --help` lists them.",
        add_help=False,  # `worker ALIAS --help` shows the backend's options instead
    )
    worker.add_argument("backend", nargs="?", metavar="ALIAS", help="backend alias: celery, arq")
    worker.add_argument(
        "bridge", nargs="?", metavar="APP", help="module:attribute of the TaskBridge or app"
    )
    worker.set_defaults(worker_parser=worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `taskbridge` command; returns the exit code."""
    parser = build_parser()
    arguments, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=arguments.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if arguments.command == "worker":
            return _worker(arguments, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if arguments.command == "check":
            return _check(arguments)
        if arguments.command == "scheduler":
            return _scheduler(arguments)
        if arguments.command == "dev":
            from ._dev import run_dev

            bridge = load_bridge(arguments.app)
            return run_dev(
                arguments.app,
                bridge,
                host=arguments.host,
                port=arguments.port,
                reload=not arguments.no_reload,
            )
        return _tasks(arguments)
    except ConfigurationError as exc:
        print(f"taskbridge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
