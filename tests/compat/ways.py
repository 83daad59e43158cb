"""The three ways an endpoint can get its background tasks, for the compatibility suite.

Every scenario of the suite is written once against a `Way` and runs as:

- `native`: FastAPI's own `BackgroundTasks`, exactly as upstream writes it;
- `plain`: taskbridge's `Tasks`, given the same plain callables;
- `registered`: `Tasks`, given the same functions registered on an in-process bridge.

Each way runs with a bare `TestClient(app)`, as upstream's tests use it (no lifespan, no
`init_app`), and with `FastAPI(lifespan=bridge.lifespan)` entered by `with TestClient(app)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient

from taskbridge import TaskBridge, TaskQueue, Tasks

WAYS = ["native", "plain", "registered"]


class Way:
    """One way of adding background tasks: what an endpoint declares and what it passes."""

    def __init__(self, name: str, lifespan: bool) -> None:
        self.name = name
        self.lifespan = lifespan
        self.bridge = TaskBridge({"default_backend": "inprocess"})
        self.Background: Any = BackgroundTasks if name == "native" else Tasks
        """The annotation of the endpoint parameter: `BackgroundTasks` or `Tasks`."""
        self.queue_type: type[Any] = BackgroundTasks if name == "native" else TaskQueue
        """What that parameter is at run time, for `Annotated[..., Depends(...)]`."""

    @property
    def runs_every_task(self) -> bool:
        """True when the tasks after a failing one still run (registered in-process tasks).

        The one documented difference from BackgroundTasks: taskbridge runs every in-process
        task of the request, then raises the first error (the others are logged).
        """
        return self.name == "registered"

    def task(self, func: Callable[..., Any]) -> Any:
        """What the scenario passes to `add_task` for `func` in this way."""
        return self.bridge.task(func) if self.name == "registered" else func

    def app(self, **kwargs: Any) -> FastAPI:
        """A FastAPI app as the scenario builds it, with the bridge's lifespan when asked."""
        if self.lifespan:
            kwargs["lifespan"] = self.bridge.lifespan
        return FastAPI(**kwargs)

    @contextlib.contextmanager
    def client(self, app: FastAPI, **kwargs: Any) -> Iterator[TestClient]:
        """FastAPI's TestClient for `app`: bare, or entered so the lifespan runs."""
        client = TestClient(app, **kwargs)
        if self.lifespan:
            with client:
                yield client
        else:
            yield client

    @contextlib.asynccontextmanager
    async def running(self, app: FastAPI) -> AsyncIterator[FastAPI]:
        """For raw ASGI calls: the app, inside its lifespan when asked."""
        if self.lifespan:
            async with app.router.lifespan_context(app):
                yield app
        else:
            yield app
