"""The dispatch deadline: until when the request sending a batch waits for its broker.

A request that gives up (dispatch_timeout) is answered 503, meaning "not sent". A backend whose
bytes may reach the broker after that (a frozen link delivers them late) can pass the deadline
along, for the broker to refuse a batch that arrives too late (the ARQ backend does, in its
enqueue script, against the Redis server's clock).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["dispatch_deadline", "dispatch_deadline_scope"]

_deadline: ContextVar[float | None] = ContextVar("taskbridge_dispatch_deadline", default=None)


def dispatch_deadline() -> float | None:
    """When the current dispatch gives up (epoch seconds), or None outside a dispatch."""
    return _deadline.get()


@contextmanager
def dispatch_deadline_scope(timeout: float) -> Iterator[float]:
    """Set the deadline `timeout` seconds from now for the code inside."""
    deadline = time.time() + timeout
    token = _deadline.set(deadline)
    try:
        yield deadline
    finally:
        _deadline.reset(token)
