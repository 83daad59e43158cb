"""The shop example's own tests, written with taskbridge's pytest plugin (no broker needed)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from examples.shop import app as shop
from taskbridge import TaskBridge
from taskbridge.testing import TaskRecorder


@pytest.fixture
def task_bridge() -> TaskBridge:
    return shop.bridge


def test_signup_queues_the_email_and_the_crm_sync(recorded_tasks: TaskRecorder) -> None:
    with TestClient(shop.app) as client:
        ids = client.post("/signup", json={"email": "ada@example.com", "name": "Ada"}).json()
    email = recorded_tasks.assert_queued(shop.send_welcome_email, "ada@example.com")
    crm = recorded_tasks.assert_queued(
        shop.sync_crm, 1, {"name": "Ada", "email": "ada@example.com"}
    )
    assert (email.id, crm.id) == (ids["welcome_email"], ids["crm_sync"])
    recorded_tasks.assert_not_queued(shop.build_sales_report)


def test_a_bad_signup_queues_nothing(recorded_tasks: TaskRecorder) -> None:
    with TestClient(shop.app) as client:
        assert client.post("/signup", json={"email": "nope", "name": "x"}).status_code == 422
    assert recorded_tasks.calls == []


def test_report_runs_and_its_status_shows_the_result(immediate_tasks: TaskBridge) -> None:
    with TestClient(shop.app) as client:
        body = client.post("/reports/2026-11", params={"rounds": 1000}).json()
        status = client.get(body["status"]).json()
    assert status["state"] == "succeeded"
    assert status["progress"] == 1.0 and status["progress_message"] == "done"
    assert status["result"]["month"] == "2026-11" and len(status["result"]["checksum"]) == 16


def test_with_no_settings_everything_runs_in_process() -> None:
    with TestClient(shop.app) as client:
        ids = client.post("/signup", json={"email": "bob@example.com", "name": "Bob"}).json()
        email = client.get(f"/tasks/{ids['welcome_email']}").json()
        crm = client.get(f"/tasks/{ids['crm_sync']}").json()
    assert (email["backend"], email["state"], email["result"]) == (
        "inprocess",
        "succeeded",
        "sent to bob@example.com",
    )
    assert crm["state"] == "succeeded" and crm["result"] == {"user_id": 1, "updated": "email,name"}
