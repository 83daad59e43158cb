"""A Celery app for Celery's own tools, configured like the workers from TASKBRIDGE_* settings.

    celery -A taskbridge_celery.app inspect ping
    celery -A taskbridge_celery.app purge -Q myqueue
    celery -A taskbridge_celery.app flower            # with Flower installed

It uses the options of the alias named by TASKBRIDGE_CELERY_ALIAS (default `celery`), so the
tools see the same broker, result backend, queues and Redis key prefix as the workers. It has
no tasks registered: inspect the workers for those, or point the tools at
`taskbridge_celery.celery_app("myapp:bridge")`, which has them. Settings are read on first use,
not at import.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["app"]  # noqa: F822 - provided lazily by __getattr__

_app: Any = None


def __getattr__(name: str) -> Any:
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        from taskbridge import ConfigurationError, TaskBridge

        from ._backend import CeleryBackend

        alias = os.environ.get("TASKBRIDGE_CELERY_ALIAS", "celery")
        backend = TaskBridge().backend(alias)
        if not isinstance(backend, CeleryBackend):
            raise ConfigurationError(
                f"backend {alias!r} is a {type(backend).__name__}, not a Celery backend; set "
                "TASKBRIDGE_CELERY_ALIAS to the alias of a Celery backend"
            )
        from ._native import make_current

        _app = make_current(backend.app)  # Flower's result endpoint reads the current app
    return _app
