"""taskbridge quick start: BackgroundTasks' add_task, with a policy per task.

Run it:    uv run python examples/quickstart.py
Then:      curl -X POST 'http://127.0.0.1:8000/users?email=ada@example.com'

Every task here runs in-process, after the response, exactly like FastAPI's BackgroundTasks.
Move one to a queue without touching this file, for example:
    TASKBRIDGE_ROUTES='{"examples.quickstart.record_signup": "immediate"}'
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from taskbridge import TaskBridge, Tasks, current_task

logger = logging.getLogger("examples.quickstart")
bridge = TaskBridge()


@bridge.task
def send_welcome(email: str) -> None:
    """A small sync job: runs in the threadpool after the response."""
    logger.info("welcome email sent to %s", email)


@bridge.task(retries=2, retry_backoff=0.1)
async def record_signup(email: str, plan: str = "free") -> None:
    """An async job with retries: runs on the event loop after the response."""
    context = current_task()
    logger.info("signup of %s on plan %s recorded (task %s)", email, plan, context and context.id)


app = FastAPI(title="taskbridge quick start", lifespan=bridge.lifespan)


@app.post("/users")
async def create_user(email: str, tasks: Tasks) -> dict[str, str]:
    welcome = tasks.add_task(send_welcome, email)
    signup = tasks.add_task(record_signup, email, plan="pro")
    tasks.add_task(logger.info, "plain callables work too, for %s", email)
    return {"email": email, "welcome_task": welcome.id, "signup_task": signup.id}


if __name__ == "__main__":
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host="127.0.0.1", port=8000)
