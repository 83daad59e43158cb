"""Testing helpers, also a pytest plugin: test endpoints without brokers and without sleeps.

Tell the plugin where your bridge is, in pytest's ini options (`taskbridge_bridge =
"myapp.tasks:bridge"`) or by overriding the `task_bridge` fixture, then use:

- `recorded_tasks`: every task of the bridge is routed to a recording backend; nothing runs.
  `recorded_tasks.assert_queued(build_report, 42)` checks that a call with exactly these
  arguments was dispatched (compared after the same JSON normalisation a queue applies).
- `immediate_tasks`: every task runs at dispatch, before the response is sent, so a test can
  assert a task's effects as soon as the request returns.

Both restore the bridge's own settings afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ._bridge import TaskBridge
from ._codec import normalize_arguments
from ._runner import run_with_retries
from ._task import Task, TaskCall
from .backends._builtin import RecordingBackend

__all__ = ["TaskRecorder", "immediate_tasks", "recorded_tasks", "task_bridge"]

_ALIAS = "taskbridge-testing"


class TaskRecorder:
    """The calls a bridge dispatched while recording, in dispatch order."""

    def __init__(self, backend: RecordingBackend) -> None:
        self._backend = backend

    @property
    def calls(self) -> list[TaskCall]:
        """Every recorded call."""
        return list(self._backend.calls)

    def of(self, task: Task[..., Any] | str) -> list[TaskCall]:
        """The recorded calls of one task (a Task or its name)."""
        name = task if isinstance(task, str) else task.name
        return [call for call in self._backend.calls if call.name == name]

    def assert_queued(self, task: Task[..., Any], *args: Any, **kwargs: Any) -> TaskCall:
        """Assert a call of `task` with exactly these arguments was dispatched; return it."""
        expected = normalize_arguments(task.signature, task.name, args, kwargs)
        calls = self.of(task)
        for call in calls:
            if (list(call.args), call.kwargs) == (list(expected[0]), expected[1]):
                return call
        seen = "\n".join(f"  {c.args!r} {c.kwargs!r}" for c in calls) or "  (none)"
        raise AssertionError(
            f"no call of {task.name} with args={expected[0]!r} kwargs={expected[1]!r}; "
            f"recorded calls of it:\n{seen}"
        )

    def assert_not_queued(self, task: Task[..., Any] | str) -> None:
        """Assert that no call of `task` was dispatched."""
        calls = self.of(task)
        if calls:
            raise AssertionError(f"{len(calls)} call(s) of {calls[0].name} were dispatched")

    async def run_all(self) -> None:
        """Run the recorded calls here, in order (through the runner), and forget them."""
        calls, self._backend.calls = self._backend.calls, []
        for call in calls:
            await run_with_retries(
                call.task, call.args, call.kwargs, call_id=call.id, policy=call.policy
            )

    def clear(self) -> None:
        """Forget the recorded calls."""
        self._backend.clear()


def _bridge_from_ini(config: pytest.Config) -> TaskBridge:
    target = str(config.getini("taskbridge_bridge") or "")
    if not target:
        raise pytest.UsageError(
            'taskbridge: set `taskbridge_bridge = "module:bridge"` in your pytest ini options '
            "or override the `task_bridge` fixture"
        )
    from .cli import load_bridge

    return load_bridge(target)


@pytest.fixture
def task_bridge(pytestconfig: pytest.Config) -> TaskBridge:
    """The application's bridge (from the `taskbridge_bridge` ini option); override at will."""
    return _bridge_from_ini(pytestconfig)


@pytest.fixture
def recorded_tasks(task_bridge: TaskBridge) -> Iterator[TaskRecorder]:
    """Route every task of the bridge to a recording backend for this test."""
    with task_bridge.override(
        routes={"*": _ALIAS} if task_bridge.tasks else {},
        default_backend=_ALIAS,
        backends={**task_bridge.settings.backends, _ALIAS: {"engine": "recording"}},
    ):
        backend = task_bridge.backend(_ALIAS)
        assert isinstance(backend, RecordingBackend)
        yield TaskRecorder(backend)


@pytest.fixture
def immediate_tasks(task_bridge: TaskBridge) -> Iterator[TaskBridge]:
    """Run every task of the bridge at dispatch, before the response, for this test."""
    with task_bridge.override(
        routes={"*": "immediate"} if task_bridge.tasks else {}, default_backend="immediate"
    ):
        yield task_bridge


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("taskbridge_bridge", "module:attribute of the TaskBridge under test", default="")
