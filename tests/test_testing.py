"""The pytest plugin's fixtures, used the way an application's own tests would use them."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from examples import quickstart
from taskbridge import TaskBridge
from taskbridge.testing import TaskRecorder
from tests.asgi import call


@pytest.fixture
def task_bridge() -> TaskBridge:
    return quickstart.bridge


def test_recorded_tasks_holds_the_calls_and_runs_nothing(
    recorded_tasks: TaskRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="examples.quickstart")
    with TestClient(quickstart.app) as client:
        body = client.post("/users", params={"email": "ada@example.com"}).json()
    call = recorded_tasks.assert_queued(quickstart.send_welcome, "ada@example.com")
    assert call.id == body["welcome_task"]
    recorded_tasks.assert_queued(quickstart.record_signup, "ada@example.com", plan="pro")
    with pytest.raises(AssertionError, match=r"no call of .*send_welcome"):
        recorded_tasks.assert_queued(quickstart.send_welcome, "bob@example.com")
    messages = [r.getMessage() for r in caplog.records if r.name == "examples.quickstart"]
    # only the plain callable ran; the decorated tasks were recorded
    assert messages == ["plain callables work too, for ada@example.com"]


async def test_recorded_calls_can_be_run_later(recorded_tasks: TaskRecorder) -> None:
    await quickstart.send_welcome.enqueue("x@example.com")
    assert len(recorded_tasks.calls) == 1
    await recorded_tasks.run_all()
    assert recorded_tasks.calls == []


async def test_immediate_tasks_run_before_the_response_is_sent(
    immediate_tasks: TaskBridge,
) -> None:
    events: list[object] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            events.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("examples.quickstart")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        async with quickstart.app.router.lifespan_context(quickstart.app):
            await call(quickstart.app, "POST", "/users?email=ada@example.com", events)
    finally:
        logger.removeHandler(handler)
    assert quickstart.send_welcome.policy.backend == "immediate"
    assert [str(e)[:40] for e in events] == [
        "welcome email sent to ada@example.com",
        "signup of ada@example.com on plan pro re",
        "('response-complete', 200)",
        "plain callables work too, for ada@exampl",
    ]


def test_the_bridge_is_restored_after_the_fixtures() -> None:
    assert quickstart.send_welcome.policy.backend == "inprocess"
