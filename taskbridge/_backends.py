"""The backend contract and loader, for built-in backends and plugins alike (re-exported with
the rest of the plugin SDK by `taskbridge.backends`).

A backend is built as `Backend(alias, options)` from the `backends` setting. Plugins register
their class in the entry-point group `taskbridge.backends`; a class can also be named by import
string (`package.module:Class`) in the alias's `engine` option.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit, urlunsplit

from fastapi import BackgroundTasks
from pydantic import BaseModel, ConfigDict, ValidationError

from ._exceptions import ConfigurationError, UnknownBackendError
from ._ledger import CallIndex
from ._policy import Policy, ResolvedPolicy
from ._settings import TaskBridgeSettings, env_name
from ._signing import Signer
from ._status import CancelResult, KeptCall, TaskStatus
from ._task import Hooks, Task, TaskCall

__all__ = [
    "Backend",
    "BackendOptions",
    "WorkerBridge",
    "installed_backends",
    "load_backend_class",
    "redact_url",
]


class WorkerBridge(Protocol):
    """What a backend's worker may use of the bridge it serves (`run_worker`'s argument)."""

    hooks: Hooks

    @property
    def settings(self) -> TaskBridgeSettings:
        """The validated settings."""
        ...

    @property
    def signer(self) -> Signer | None:
        """Verifies signed messages when `signing_key` is set."""
        ...

    @property
    def tasks(self) -> Mapping[str, Task[..., Any]]:
        """The registered tasks by name."""
        ...

    def get_task(self, name: str) -> Task[..., Any]:
        """The task registered as `name` (UnknownTaskError otherwise)."""
        ...

    def resolve(self, task: Task[..., Any], *, check: bool = True) -> ResolvedPolicy:
        """The task's effective policy."""
        ...

    def backend(self, alias: str) -> Backend:
        """The backend built for `alias`."""
        ...

    def validate(self) -> None:
        """Check settings, backends and every task (ConfigurationError)."""
        ...


ENTRY_POINT_GROUP = "taskbridge.backends"

_BUILTIN = {
    "inprocess": "taskbridge.backends._builtin:InProcessBackend",
    "immediate": "taskbridge.backends._builtin:ImmediateBackend",
    "recording": "taskbridge.backends._builtin:RecordingBackend",
}
_PLUGINS = {"celery": "fastapi-taskbridge-celery", "arq": "fastapi-taskbridge-arq"}


class BackendOptions(BaseModel):
    """Options of a backend alias (subclass it to add an engine's own options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str | None = None
    """Implementation name or import string; defaults to the alias itself."""


class Backend(ABC):
    """Moves task calls from the API to where they run.

    Subclasses implement `enqueue`; queue engines also `open`/`close` and the worker hooks.
    Capability flags say what the backend can honour; `validate_policy` turns a policy it cannot
    honour into a start-up error.
    """

    runs_in_process: ClassVar[bool] = False
    """Calls run in the API process, so arguments stay Python objects (JSON is not enforced)."""
    supports_delay: ClassVar[bool] = False
    """Honours `delay` (deferred start)."""
    supports_queues: ClassVar[bool] = False
    """Honours `queue` (named queues on the engine)."""
    supports_worker: ClassVar[bool] = False
    """Has a worker started by `taskbridge worker ALIAS`."""
    supports_status: ClassVar[bool] = False
    """Answers `status(id)` (state, result, progress, timestamps)."""
    supports_cancel: ClassVar[bool] = False
    """Can cancel calls that have not started; see `cancel` for running ones."""
    options_model: ClassVar[type[BackendOptions]] = BackendOptions
    """The pydantic model the alias's options are validated with."""

    signer: Signer | None = None
    """Signs queued messages when the bridge has a `signing_key` (set before `open`)."""
    compact_ids: ClassVar[bool] = False
    """Call ids as 32 hex digits (ARQ's own form) rather than dashed UUID strings (Celery's)."""

    def __init__(self, alias: str, options: Mapping[str, Any]) -> None:
        self.alias = alias
        try:
            self.options = self.options_model.model_validate(dict(options))
        except ValidationError as exc:
            problems = "; ".join(
                f"{env_name('backends', alias, *err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigurationError(
                f"invalid options for backend {alias!r} ({type(self).__name__}): {problems}"
            ) from None

    def validate_policy(self, task_name: str, policy: Policy) -> None:
        """Raise ConfigurationError, naming the task, for a policy this backend cannot honour.

        Called at start-up for each task routed here, and for each `.using()` variant.
        """
        if policy.delay is not None and not self.supports_delay:
            raise ConfigurationError(
                f"task {task_name!r}: backend {self.alias!r} cannot delay calls (delay="
                f"{policy.delay}); route it to a backend that can or drop the delay"
            )
        if policy.queue is not None and not self.supports_queues:
            raise ConfigurationError(
                f"task {task_name!r}: backend {self.alias!r} has no queues (queue="
                f"{policy.queue!r}); route it to a queue backend or drop the queue"
            )

    def queue_for(self, policy: Policy) -> str | None:
        """The queue this backend's workers take calls with `policy` from (the policy's own,
        else the backend's default); None for backends without queues."""
        return policy.queue

    async def open(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Connect to the engine (called once, at application start-up)."""

    async def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release connections; finish or hand back what is still pending."""

    async def ping(self) -> str:
        """Check the engine answers (after `open`); return a one-line description of it.

        Raise BackendUnavailable when it does not. Never include passwords: see `redact_url`.
        """
        return "no broker"

    def defer_in_request(
        self,
        call: TaskCall,
        background: BackgroundTasks,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> bool:
        """Take a call inside a request at `add_task` time; return False to have it buffered.

        Buffered calls reach `enqueue` in one batch after the handler returned and before the
        response is sent. In-process backends override this to use the request's tasks, and
        call `on_failure` with the error of a call that failed for good (the request raises
        the first one once its background tasks have run, as BackgroundTasks would).
        """
        return False

    @abstractmethod
    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        """Hand over a batch of calls; when this returns, the engine has durably accepted them.

        Raise BackendUnavailable when the engine cannot be reached.
        """

    async def status(self, task_id: str) -> TaskStatus | None:
        """What the engine knows of `task_id`, or None when it knows nothing of it."""
        return None

    async def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus | None]:
        """`status` of each of `task_ids`, in order (backends override it to read them in one
        round trip: a page of `GET /tasks` reads 50)."""
        return list(await asyncio.gather(*(self.status(task_id) for task_id in task_ids)))

    @property
    def index(self) -> CallIndex | None:
        """Lists this backend's calls and watches them change (`GET /tasks`, `/tasks/stats`,
        `/tasks/{id}/events`), once open; None for a backend that keeps no index."""
        return None

    async def kept_call(self, task_id: str) -> KeptCall | None:
        """The task and arguments of a failed or cancelled call, when the backend kept them
        (so `POST /tasks/{id}/retry` can run it again); None otherwise."""
        return None

    async def cancel(self, task_id: str) -> CancelResult:
        """Cancel `task_id`: queued calls must never start; running ones stop where the engine
        allows. The answer says which happened, or why nothing could be done."""
        return CancelResult(
            id=task_id,
            cancelled=False,
            state="unknown",
            detail=f"backend {self.alias!r} ({type(self).__name__}) cannot cancel calls",
        )

    @classmethod
    def dev_options(cls, redis_url: str) -> dict[str, Any]:
        """Options that point this engine at a throwaway Redis, for `taskbridge dev`.

        Each key is an option of `options_model`; empty when the engine needs no broker.
        """
        return {}

    @classmethod  # noqa: B027 - optional hook, empty by default
    def add_worker_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the engine's own options to `taskbridge worker ALIAS`.

        A classmethod, so that `taskbridge worker ALIAS --help` lists them without an app or
        settings: defaults that depend on the alias's options are resolved in `run_worker`.
        (An override written as an instance method still works for running a worker; its
        options are then listed only once the alias's options validate.)

        Every worker also gets `--health-file PATH` (`arguments.health_file`, None without it):
        a worker keeps a `ConnectionState` with that file, so that the file exists exactly
        while it is connected to its broker.
        """

    def run_worker(self, bridge: WorkerBridge, arguments: argparse.Namespace) -> int:
        """Run a worker for `bridge`'s tasks until it is stopped; return the exit code."""
        raise ConfigurationError(
            f"backend {self.alias!r} ({type(self).__name__}) has no worker: "
            "its calls run where they are dispatched"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.alias!r}>"


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***`, for logs, errors and CLI output; each URL of
    a `;`-separated failover or Sentinel list (`amqp://a;amqp://b`) is redacted."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not parseable as a URL: show nothing that could be a secret
        return "<unparseable URL>"
    if password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def load_backend_class(engine: str) -> type[Backend]:
    """Resolve an engine name: built-in, then entry point, then import string."""
    target = _BUILTIN.get(engine)
    if target is None:
        found = entry_points(group=ENTRY_POINT_GROUP, name=engine)
        if found:
            cls = next(iter(found)).load()
            return _checked(engine, cls)
        if ":" not in engine and "." not in engine:
            installed = installed_backends()
            if engine in _PLUGINS:
                hint = f"; install it with `pip install {_PLUGINS[engine]}`"
            else:
                close = difflib.get_close_matches(engine, installed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownBackendError(
                f"no backend named {engine!r} is installed{hint}; installed backends: "
                f"{', '.join(installed)} (or give an import string, package.module:Class, as "
                "the alias's engine option)"
            )
        target = engine
    module_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownBackendError(f"cannot import backend {engine!r}: {exc}") from None
    return _checked(engine, cls)


def installed_backends() -> list[str]:
    """Names of the built-in backends and of the installed plugins' backends, sorted."""
    found = {entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(found | set(_BUILTIN))


def _checked(engine: str, cls: object) -> type[Backend]:
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise UnknownBackendError(f"backend {engine!r} resolves to {cls!r}, not a Backend class")
    return cls
