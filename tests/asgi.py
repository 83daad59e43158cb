"""A raw ASGI client that records what the app sent and when, next to what tasks did."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from starlette.types import ASGIApp


async def call(app: ASGIApp, method: str, path: str, events: list[Any]) -> int:
    """Send one request; append ("response-complete", status) to `events` when the last body
    chunk is sent, so tasks that record into `events` show whether they ran before or after."""
    status = 0
    sent_request = False

    async def receive() -> MutableMapping[str, Any]:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            events.append(("response-complete", status))

    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "scheme": "http",
        "root_path": "",
        "state": {},
    }
    await app(scope, receive, send)
    return status
