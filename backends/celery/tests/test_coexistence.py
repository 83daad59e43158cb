"""Both plugins install together and share one redis-py: what a resolver picks with arq's own
pin (redis < 6: Celery 5.5/5.6), or with the pin overridden (Celery 5.7 needs redis-py >= 6.4)."""

from __future__ import annotations

import uuid
from importlib.metadata import version

import pytest


def test_both_plugins_import_and_kombus_redis_transport_publishes(
    redis_url: str, run_id: str
) -> None:
    taskbridge_arq = pytest.importorskip("taskbridge_arq")
    if not hasattr(taskbridge_arq, "ArqBackend"):
        pytest.skip("taskbridge_arq has no ArqBackend yet")
    import arq  # noqa: F401 - declares redis < 6
    from kombu import Connection
    from taskbridge_celery import CeleryBackend

    from taskbridge.backends import load_backend_class

    assert load_backend_class("celery") is CeleryBackend
    assert load_backend_class("arq") is taskbridge_arq.ArqBackend
    redis_py = tuple(int(part) for part in version("redis").split(".")[:2])
    if version("kombu").startswith(("5.5.", "5.6.")):
        assert redis_py >= (5, 0)
    else:  # kombu 5.7's Redis transport refuses redis-py < 6.1 and its extra asks for 6.4
        assert redis_py >= (6, 4)

    queue = f"{run_id}-coexist-{uuid.uuid4().hex[:6]}"
    options = {"global_keyprefix": f"{run_id}:coexist:"}
    with Connection(redis_url, transport_options=options) as connection:
        simple = connection.SimpleQueue(queue)
        try:
            simple.put({"hello": "world"}, serializer="json")
            message = simple.get(timeout=5)
            assert message.payload == {"hello": "world"}
            message.ack()
        finally:
            simple.clear()
            simple.close()
