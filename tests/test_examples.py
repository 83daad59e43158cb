"""The quick start example works as its docstring says."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from examples.quickstart import app, record_signup, send_welcome


def test_quickstart_runs_its_tasks_after_the_response(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="examples.quickstart")
    with TestClient(app) as client:
        response = client.post("/users", params={"email": "ada@example.com"})
    assert response.status_code == 200
    body = response.json()
    messages = [r.getMessage() for r in caplog.records if r.name == "examples.quickstart"]
    assert messages == [
        "welcome email sent to ada@example.com",
        f"signup of ada@example.com on plan pro recorded (task {body['signup_task']})",
        "plain callables work too, for ada@example.com",
    ]
    assert send_welcome.policy.backend == record_signup.policy.backend == "inprocess"
