"""Checked by mypy --strict in test_typing.py; never imported by pytest itself."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, assert_type

from fastapi import FastAPI

from taskbridge import Task, TaskBridge, TaskHandle, Tasks

bridge = TaskBridge()


@bridge.task
def send_welcome(email: str, *, retry: bool = False) -> None: ...


@bridge.task(backend="celery", queue="reports", retries=3, timeout=300)
def build_report(user_id: int) -> str:
    return str(user_id)


@bridge.task(backend="arq")
async def sync_crm(user_id: int) -> bool:
    return True


# assert_type cannot spell parameter names, so the Task types are checked by assignment
welcome_type: Task[..., None] = send_welcome
report_type: Task[[int], str] = build_report
crm_type: Task[[int], Coroutine[Any, Any, bool]] = sync_crm
variant_type: Task[[int], str] = build_report.using(delay=30)
assert_type(build_report(1), str)
crm_call = assert_type(sync_crm(1), Coroutine[Any, Any, bool])
crm_call.close()
assert_type(build_report.using(delay=30)(2), str)
assert_type(build_report.name, str)

app = FastAPI(lifespan=bridge.lifespan)


@app.post("/users")
async def create_user(email: str, tasks: Tasks) -> dict[str, str]:
    assert_type(tasks.add_task(send_welcome, email, retry=True), TaskHandle)
    handle = tasks.add_task(build_report, 42)
    assert_type(handle.id, str)
    tasks.add_task(print, "plain callables work too")
    assert_type(await sync_crm.enqueue(1), TaskHandle)
    return {"report": handle.id}
