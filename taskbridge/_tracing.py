"""What travels with a call besides its arguments (`TaskCall.trace`, carried by every backend):
OpenTelemetry's trace context, when installed, so that the runner executes the call in a span
that joins the dispatching request's trace in whatever process runs it; and, for a scheduled
call, its schedule and slot (for `current_task()`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["SCHEDULE_KEY", "SLOT_KEY", "capture", "scheduled", "span"]

SCHEDULE_KEY = "taskbridge-schedule"
"""Key of a scheduled call's context: the schedule's name."""
SLOT_KEY = "taskbridge-scheduled-at"
"""Key of a scheduled call's context: the slot's time, ISO 8601 with its offset."""


def scheduled(carrier: Mapping[str, Any] | None) -> tuple[str | None, datetime | None]:
    """The (schedule name, slot time) a call carries, or (None, None)."""
    if not carrier or SCHEDULE_KEY not in carrier:
        return None, None
    try:
        slot = datetime.fromisoformat(str(carrier[SLOT_KEY]))
    except (KeyError, ValueError):
        return str(carrier[SCHEDULE_KEY]), None
    return str(carrier[SCHEDULE_KEY]), slot if slot.tzinfo else slot.replace(tzinfo=UTC)


try:
    from opentelemetry import propagate, trace
except ImportError:  # the optional dependency is absent: tracing costs nothing
    propagate = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]


def capture() -> dict[str, str] | None:
    """The current trace context as W3C headers (`traceparent`...), or None when not tracing."""
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


@contextlib.contextmanager
def span(
    task_name: str, call_id: str, attempt: int, carrier: Mapping[str, Any] | None
) -> Iterator[None]:
    """Run the block in a consumer span named after the task, child of `carrier`'s context."""
    if trace is None or not carrier:
        yield
        return
    parent = propagate.extract({str(k): str(v) for k, v in carrier.items()})
    tracer = trace.get_tracer("taskbridge")
    with tracer.start_as_current_span(
        f"taskbridge {task_name}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "taskbridge.task": task_name,
            "taskbridge.task_id": call_id,
            "taskbridge.attempt": attempt,
        },
    ):
        yield
