"""The shop's Celery alias for Celery's own tools (Flower, `celery inspect`, `celery control`).

    celery -A examples.shop.celery_app:app flower
    celery -A examples.shop.celery_app:app inspect active

Configured from the same TASKBRIDGE_* variables as the API and the workers: same broker, queues
and result backend (so Flower shows results), with the shop's tasks registered.
"""

from taskbridge_celery import celery_app

app = celery_app("examples.shop.app:bridge")
