"""Celery backend for taskbridge: route FastAPI tasks to Celery workers.

Configure an alias (`TASKBRIDGE_BACKENDS__CELERY__BROKER_URL=redis://...`), route tasks to it,
and run `taskbridge worker celery myapp.tasks:bridge`.
"""

from ._backend import CeleryBackend
from ._options import CeleryOptions

__all__ = ["CeleryBackend", "CeleryOptions"]
