"""Calls mypy must reject: the decorated task keeps its signature for add_task and enqueue."""

from __future__ import annotations

from taskbridge import TaskBridge, Tasks

bridge = TaskBridge()


@bridge.task
def build_report(user_id: int) -> str:
    return str(user_id)


async def endpoint(tasks: Tasks) -> None:
    tasks.add_task(build_report, "not an int")
    tasks.add_task(build_report, 1, 2)
    await build_report.enqueue(user="x")
    build_report.using(queue="q")("1")


wrong: TaskBridge = build_report
