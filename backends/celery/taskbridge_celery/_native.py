"""Celery's own tools (Flower, `celery inspect`, `celery control`) pointed at a taskbridge alias.

A module of the application holds the alias's app, `app = celery_app("myapp.main:bridge")` (in
`myapp/celery_app.py`, say), and the tools are given it: `celery -A myapp.celery_app:app flower`,
`celery -A myapp.celery_app:app inspect active`, `... control revoke <task id>`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskbridge import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery  # type: ignore[import-untyped]

    from taskbridge import TaskBridge

__all__ = ["celery_app", "make_current"]


def make_current(app: Any) -> Any:
    """Make `app` Celery's current and default app (what tools that build `AsyncResult(id)`
    without an app, like Flower's result and abort endpoints, read results through)."""
    app.set_current()
    app.set_default()
    return app


def celery_app(target: str | TaskBridge, alias: str = "celery") -> Celery:
    """The Celery app of the Celery backend `alias` of the bridge at `target` (`module:attribute`
    of the TaskBridge or of the FastAPI app holding it, as `taskbridge worker` takes it, or the
    bridge itself), configured as `taskbridge worker` configures its own: the same broker
    (failover list included), queues, Celery settings, result backend (taskbridge's JSON Redis
    backend, so results read back as the worker stored them) and a task per bridge task, under
    its name.

    It becomes Celery's current and default app, so Flower's `/api/task/result/<id>` finds the
    result backend. Use it with Celery's tools; run workers with `taskbridge worker`, which also
    installs taskbridge's control command and timers.
    """
    if isinstance(target, str):
        from taskbridge.cli import load_bridge

        bridge = load_bridge(target)
    else:
        bridge = target
    bridge.validate()
    backend = bridge.backend(alias)
    from ._backend import CeleryBackend
    from ._worker import build_app, register_tasks

    if not isinstance(backend, CeleryBackend):
        raise ConfigurationError(
            f"backend {alias!r} is a {type(backend).__name__}, not a Celery backend; pass the "
            "alias of a Celery backend"
        )
    app = build_app(backend.options, worker=True)
    register_tasks(app, bridge, alias)
    return make_current(app)
