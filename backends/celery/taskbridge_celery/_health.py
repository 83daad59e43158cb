"""Whether a Celery worker is connected to its broker, for logs and `--health-file`.

A consumer bootstep drives the worker's `ConnectionState`. Celery's consumer starts its steps in
order once it has connected (Connection, ..., Tasks, then this step, then the event loop), so
this step's `start` means connected and consuming. When the connection is lost, Celery stops
every step (from inside its error handler, so the error is at hand) and starts them again once
it has reconnected; when the worker stops, the steps are stopped and shut down.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from taskbridge.backends import ConnectionState

if TYPE_CHECKING:
    import argparse

    from celery import Celery  # type: ignore[import-untyped]

__all__ = ["connection_step", "watch_connection"]


def connection_step(state: ConnectionState) -> type[Any]:
    """A consumer bootstep keeping `state` (connected while the consumer runs)."""
    from celery import bootsteps

    class BrokerConnection(bootsteps.StartStopStep):  # type: ignore[misc]
        """taskbridge's view of the broker connection (the `--health-file`)."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, parent: Any) -> None:
            state.up()

        def stop(self, parent: Any) -> None:
            if parent.blueprint.state in (bootsteps.CLOSE, bootsteps.TERMINATE):
                state.close()  # the worker is stopping
                return
            error = sys.exc_info()[1]  # Celery restarts the consumer from its error handler
            reason = (
                f"{type(error).__name__}: {error}"
                if error is not None
                else "the connection was closed"
            )
            state.down(reason)

        def shutdown(self, parent: Any) -> None:
            state.close()

    return BrokerConnection


def watch_connection(
    app: Celery, queues: list[str], arguments: argparse.Namespace
) -> ConnectionState:
    """The worker's ConnectionState (with the `--health-file`, if given), kept by a consumer
    bootstep added to `app`. Close it when the worker exits."""
    state = ConnectionState(
        f"Celery worker ({', '.join(queues)})", getattr(arguments, "health_file", None)
    )
    app.steps["consumer"].add(connection_step(state))
    return state
