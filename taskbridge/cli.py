"""The `taskbridge` command: thin parsing over library calls that return exit codes."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._bridge import TaskBridge
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
    """Each task with its effective backend, queue and non-default policy, and their origins."""
    bridge.validate()
    lines: list[str] = []
    for name in sorted(bridge.tasks):
        resolved = bridge.resolve(bridge.tasks[name])
        lines.append(name)
        for field in POLICY_FIELDS:
            value = getattr(resolved.policy, field)
            source = resolved.sources[field]
            if (
                field in ("backend", "queue")
                or source != "default"
                or value != getattr(_DEFAULTS, field)
            ):
                shown = ", ".join(t.__name__ for t in value) if field == "retry_on" else str(value)
                lines.append(f"  {field:<18} {shown:<24} ({source})")
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
    bridge = load_bridge(arguments.bridge)
    bridge.validate()
    backend = bridge.backend(arguments.backend)
    parser = argparse.ArgumentParser(
        prog=f"taskbridge worker {arguments.backend} {arguments.bridge}",
        description=f"Options of the {type(backend).__name__} worker.",
    )
    parser.add_argument(
        "--health-file",
        default=None,
        help="a file that exists exactly while the worker is connected to its broker (for "
        "container health checks: test -f PATH)",
    )
    backend.add_worker_arguments(parser)
    return backend.run_worker(bridge, parser.parse_args(rest))


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
    dev = commands.add_parser(
        "dev",
        help="run the API (uvicorn --reload) and a worker per queue backend; Ctrl-C stops all",
    )
    dev.add_argument("app", help="module:attribute of the FastAPI app")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--no-reload", action="store_true", help="do not restart on code changes")
    worker = commands.add_parser(
        "worker",
        help="run a worker for a backend's tasks",
        description="Run a worker; options after the bridge are the backend's own (see -h).",
        add_help=False,
    )
    worker.add_argument("backend", help="backend alias, e.g. celery or arq")
    worker.add_argument("bridge", help="module:attribute of the TaskBridge (or the FastAPI app)")
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
