"""The handle a dispatch returns."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

__all__ = ["TaskHandle", "new_task_id"]


def new_task_id() -> str:
    """A fresh task id: a UUID4 string, the form Celery and ARQ tooling expect."""
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class TaskHandle:
    """Refers to one dispatched task call.

    `id` is generated at `add_task` time and is the id the engine uses (Celery task id, ARQ job
    id), so it can be logged, returned to a client and looked up later.
    """

    id: str
    """The call's id, also the engine's task/job id."""
    task_name: str
    """The registered name of the task (for a plain callable, its qualified name)."""
    backend: str
    """The alias of the backend that took the call."""
