"""Schedules and on-startup calls of a bridge: declared in code or settings, validated at
start-up, and dispatched by a `Scheduler` (see `_schedule`) through each task's own backend."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ._codec import bind_arguments, normalize_arguments
from ._dispatch import Dispatcher
from ._exceptions import ConfigurationError
from ._registry import Registry
from ._schedule import (
    MissedPolicy,
    Schedule,
    Scheduler,
    claim_startup,
    parse_schedules_setting,
)
from ._task import Task, TaskCall
from ._tracing import SCHEDULE_KEY, SLOT_KEY

__all__ = ["Periodic", "StartupCall", "mark", "run_until"]

logger = logging.getLogger("taskbridge.scheduler")

INPROCESS = "inprocess:"
"""Added to the prefix of the API processes' own scheduler (in-process schedules), apart from
`taskbridge scheduler`'s."""


@dataclass(frozen=True)
class StartupCall:
    """A call dispatched once per deployment start (`on_startup`)."""

    name: str
    task: Task[..., Any]
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]


class Periodic:
    """The schedules and on-startup calls of one bridge."""

    def __init__(self, registry: Registry, dispatcher: Callable[[], Dispatcher]) -> None:
        self.registry = registry
        self._dispatcher = dispatcher
        self.declared: dict[str, Schedule] = {}
        self.startup: dict[str, StartupCall] = {}

    def sending_through(self, dispatcher: Dispatcher) -> Periodic:
        """The same schedules and on-startup calls, dispatched through `dispatcher` (backends of
        its own, e.g. a scheduler thread next to a worker)."""
        other = Periodic(self.registry, lambda: dispatcher)
        other.declared, other.startup = self.declared, self.startup
        return other

    # -- declaring ------------------------------------------------------------------------

    def add(
        self,
        task: Task[..., Any],
        when: str | float,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        name: str | None,
        timezone: str,
        missed: MissedPolicy,
    ) -> Schedule:
        """Declare a schedule of `task` (a cron expression, or a period in seconds)."""
        schedule_name = name or task.name
        if schedule_name in self.declared:
            raise ConfigurationError(
                f"schedule {schedule_name!r} is declared twice; give one a name="
            )
        timing: dict[str, Any] = {"cron": when} if isinstance(when, str) else {"every": float(when)}
        schedule = Schedule(
            name=schedule_name,
            task=task.name,
            args=tuple(args),
            kwargs=dict(kwargs),
            timezone=timezone,
            missed=missed,
            **timing,
        )
        self.declared[schedule_name] = schedule
        return schedule

    def add_startup(
        self, task: Task[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> None:
        """Declare a call of `task` dispatched once per deployment start."""
        name = task.name
        if name in self.startup:
            raise ConfigurationError(f"task {name!r} is already called on start-up")
        self.startup[name] = StartupCall(name, task, tuple(args), dict(kwargs))

    # -- what runs ------------------------------------------------------------------------

    def schedules(self) -> list[Schedule]:
        """Every schedule, the settings' changes applied (disabled ones included)."""
        return parse_schedules_setting(self.registry.settings.schedules, self.declared.values())

    def _settled(self) -> tuple[list[Schedule], list[ConfigurationError]]:
        """The schedules with every valid settings entry applied, and each invalid entry's
        error: start-up reports them all at once, not only the first."""
        schedules = list(self.declared.values())
        found: list[ConfigurationError] = []
        for name, entry in self.registry.settings.schedules.items():
            try:
                schedules = parse_schedules_setting({name: entry}, schedules)
            except ConfigurationError as exc:
                found.append(exc)
        return schedules, found

    def problems(self) -> list[ConfigurationError]:
        """What is wrong with the schedules and on-startup calls (for start-up validation)."""
        schedules, found = self._settled()
        tasks = self.registry.tasks
        for schedule in schedules:
            where = schedule.source or f"schedule {schedule.name!r}"
            task = tasks.get(schedule.task)
            if task is None:
                found.append(
                    ConfigurationError(
                        f"{where}: task {schedule.task!r} is not registered (registered: "
                        f"{', '.join(sorted(tasks)) or 'none'})"
                    )
                )
                continue
            problem = self._arguments_problem(task, schedule.args, schedule.kwargs)
            if problem is not None:
                found.append(ConfigurationError(f"{where}: {problem}"))
        for call in self.startup.values():
            problem = self._arguments_problem(call.task, call.args, call.kwargs)
            if problem is not None:
                found.append(ConfigurationError(f"on_startup of task {call.name!r}: {problem}"))
        return found

    def _arguments_problem(
        self, task: Task[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> str | None:
        """Why the arguments do not fit the task (bind to its signature, and for a queue be
        JSON), or None. Found at start-up rather than at every slot."""
        try:
            backend = self._dispatcher().backend(self.registry.resolve(task).policy.backend)
        except ConfigurationError:  # a broken backend, reported by the dispatcher's checks
            backend = None
        try:
            if backend is None or backend.runs_in_process:
                bind_arguments(task.signature, task.name, args, kwargs)
            else:
                normalize_arguments(task.signature, task.name, args, kwargs)
        except TypeError as exc:  # a TaskArgumentError naming the task
            return str(exc)
        return None

    def split(self) -> tuple[list[Schedule], list[Schedule]]:
        """Enabled schedules as (in-process, queued): the API processes run the first, the
        `taskbridge scheduler` command the second."""
        dispatcher = self._dispatcher()
        here: list[Schedule] = []
        queued: list[Schedule] = []
        for schedule in self.schedules():
            if not schedule.enabled:
                continue
            task = self.registry.get_task(schedule.task)
            backend = dispatcher.backend(dispatcher.resolve(task).policy.backend)
            (here if backend.runs_in_process else queued).append(schedule)
        return here, queued

    def scheduler(self, schedules: list[Schedule], *, in_process: bool = False) -> Scheduler:
        """A Scheduler of `schedules` that dispatches through the bridge."""
        settings = self.registry.settings
        return Scheduler(
            schedules,
            self.dispatch,
            settings.scheduler_url,
            lease_ttl=settings.scheduler_lease,
            prefix=settings.scheduler_prefix + (INPROCESS if in_process else ""),
        )

    async def dispatch(self, schedule: Schedule, slot: datetime) -> None:
        """Send the slot's call through the task's backend; raise if it was not accepted.

        The call's id derives from the schedule and the slot (an idempotency key), where the
        backend supports keys: a slot dispatched twice is one call.
        """
        dispatcher = self._dispatcher()
        task = self.registry.get_task(schedule.task)
        keyed = task.using(key=schedule.idempotency_key(slot))
        try:
            dispatcher.resolve(keyed)
        except ConfigurationError:  # this backend cannot hold keys: the slot claim suffices
            keyed = task
        backend, call = dispatcher.prepare(keyed, schedule.args, schedule.kwargs)
        mark(call, schedule.name, slot)
        await dispatcher.dispatch([(backend, call)])
        logger.info(
            "schedule %s: slot %s dispatched task %s [%s] to backend %r",
            schedule.name,
            slot.isoformat(),
            task.name,
            call.id,
            backend.alias,
        )

    async def run_startup(self) -> None:
        """Dispatch the on-startup calls this process wins for this deployment start."""
        if not self.startup:
            return
        settings = self.registry.settings
        dispatcher = self._dispatcher()
        for call in self.startup.values():
            won = await claim_startup(
                call.name,
                settings.scheduler_url,
                deployment_id=settings.deployment_id,
                window=settings.startup_window,
                prefix=settings.scheduler_prefix,
            )
            if not won:
                logger.info("on-startup call of %s: another process made it", call.name)
                continue
            backend, prepared = dispatcher.prepare(call.task, call.args, call.kwargs)
            await dispatcher.dispatch([(backend, prepared)])
            logger.info("on-startup call of %s dispatched [%s]", call.name, prepared.id)


def mark(call: TaskCall, schedule: str, slot: datetime) -> None:
    """Carry the schedule and slot with `call` (next to its trace headers) for
    `current_task()`."""
    call.trace = {**(call.trace or {}), SCHEDULE_KEY: schedule, SLOT_KEY: slot.isoformat()}


async def run_until(scheduler: Scheduler, stop: asyncio.Event) -> None:
    """Run `scheduler` until `stop`; its failures are logged, never raised into the app."""
    try:
        await scheduler.run(stop)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("the scheduler stopped")
