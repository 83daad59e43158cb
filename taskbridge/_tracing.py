"""OpenTelemetry, when installed: the dispatching request's trace context travels with each call,
and the runner executes the call in a span that joins that trace, in whatever process runs it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["capture", "span"]

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
