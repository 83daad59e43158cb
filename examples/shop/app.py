"""A small shop API whose background work moves from in-process to queues by settings alone.

- sign-up sends a welcome email: small, stays in-process (BackgroundTasks semantics);
- a sales report is CPU-heavy: it belongs on Celery workers (processes, hard time limits);
- a CRM sync is I/O-bound: it belongs on ARQ workers (async, many at once);
- `/tasks/{id}` shows any task's state, progress and result.

The code names no backend. With no settings everything runs in-process; `queues.env` routes the
report to Celery and the CRM sync to ARQ. See README.md beside this file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from fastapi import FastAPI
from pydantic import BaseModel, Field

from taskbridge import TaskBridge, Tasks, current_task, report_progress

logger = logging.getLogger("examples.shop")
bridge = TaskBridge()


@bridge.task
def send_welcome_email(email: str) -> str:
    """Pretend to send an email; small enough for the API process."""
    logger.info("welcome email sent to %s", email)
    return f"sent to {email}"


@bridge.task(retries=2, timeout=120)
def build_sales_report(month: str, rounds: int = 200_000) -> dict[str, str | int]:
    """CPU-heavy: hash chains standing in for real number crunching, with progress."""
    digest = month.encode()
    for step in range(rounds):
        digest = hashlib.sha256(digest).digest()
        if step % (rounds // 10 or 1) == 0:
            report_progress(step / rounds, f"crunching {month}")
    report_progress(1.0, "done")
    return {"month": month, "rounds": rounds, "checksum": digest.hex()[:16]}


@bridge.task(retries=5, retry_backoff=0.5, timeout=30, retry_on=(ConnectionError,))
async def sync_crm(user_id: int, fields: dict[str, str]) -> dict[str, int | str]:
    """I/O-bound: an async call to a CRM (simulated), retried on connection errors."""
    context = current_task()
    await asyncio.sleep(0.01)
    logger.info("CRM updated for user %s (attempt %s)", user_id, context and context.attempt)
    return {"user_id": user_id, "updated": ",".join(sorted(fields))}


class SignUp(BaseModel):
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    name: str


app = FastAPI(title="taskbridge shop example", lifespan=bridge.lifespan)
app.include_router(bridge.router())


@app.post("/signup")
async def signup(user: SignUp, tasks: Tasks) -> dict[str, str]:
    email = tasks.add_task(send_welcome_email, user.email)
    crm = tasks.add_task(sync_crm, 1, {"name": user.name, "email": user.email})
    return {"welcome_email": email.id, "crm_sync": crm.id}


@app.post("/reports/{month}")
async def request_report(month: str, tasks: Tasks, rounds: int = 200_000) -> dict[str, str]:
    handle = tasks.add_task(build_sales_report, month, rounds=rounds)
    return {"report": handle.id, "status": f"/tasks/{handle.id}"}
