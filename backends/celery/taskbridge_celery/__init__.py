"""Celery backend for taskbridge: route FastAPI tasks to Celery workers.

Configure an alias (`TASKBRIDGE_BACKENDS__CELERY__BROKER_URL=redis://...`), route tasks to it,
and run `taskbridge worker celery myapp.tasks:bridge`. `celery_app("myapp.tasks:bridge")` is the
alias's Celery app for Celery's own tools (Flower, `celery inspect`, `celery control`).
"""

from ._backend import CeleryBackend
from ._native import celery_app
from ._options import CeleryOptions

__all__ = ["CeleryBackend", "CeleryOptions", "celery_app"]
