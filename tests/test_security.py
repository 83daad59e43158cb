"""Idempotency keys, argument size limits and message signing (core side)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from taskbridge import ConfigurationError, MessageError, TaskArgumentError, TaskBridge, Tasks
from taskbridge.backends import Signer


@pytest.mark.parametrize("backend", ["inprocess", "immediate", "rec"])
async def test_a_duplicate_key_within_its_ttl_is_a_no_op_returning_the_same_handle(
    backend: str,
) -> None:
    bridge = TaskBridge({"backends": {"rec": {"engine": "recording"}}})
    runs: list[int] = []

    @bridge.task(backend=backend)
    def charge(order: int) -> None:
        runs.append(order)

    first = await charge.using(key="order-42").enqueue(42)
    second = await charge.using(key="order-42").enqueue(42)
    other = await charge.using(key="order-43").enqueue(43)
    await bridge.close()
    assert first == second and first.id != other.id
    if backend == "rec":
        assert [c.args for c in bridge.backend("rec").calls] == [[42], [43]]  # type: ignore[attr-defined]
    else:
        assert sorted(runs) == [42, 43]


def test_keys_within_one_request_and_across_requests() -> None:
    bridge = TaskBridge({"backends": {"rec": {"engine": "recording"}}})

    @bridge.task(backend="rec")
    def notify(user: int) -> None: ...

    app = FastAPI(lifespan=bridge.lifespan)

    @app.post("/{user}")
    async def endpoint(user: int, tasks: Tasks) -> list[str]:
        keyed = notify.using(key=f"welcome-{user}")
        return [tasks.add_task(keyed, user).id, tasks.add_task(keyed, user).id]

    with TestClient(app) as client:
        a1, a2 = client.post("/1").json()
        b1, _ = client.post("/1").json()
        c1, _ = client.post("/2").json()
    assert a1 == a2 == b1 != c1
    assert [c.args for c in bridge.backend("rec").calls] == [[1], [2]]  # type: ignore[attr-defined]


def test_a_key_belongs_to_a_call_not_to_a_decorator_or_route() -> None:
    bridge = TaskBridge()
    with pytest.raises(TypeError, match="key"):
        bridge.task(key="same-for-all")(print)  # type: ignore[call-overload]
    routed = TaskBridge({"routes": {"*": {"key": "x"}}})
    with pytest.raises(ConfigurationError, match="key identifies one call"):
        routed.validate()


async def test_oversize_arguments_are_refused_at_dispatch_with_the_size() -> None:
    bridge = TaskBridge({"max_argument_bytes": 100, "backends": {"rec": {"engine": "recording"}}})

    @bridge.task(backend="rec")
    def upload(blob: str) -> None: ...

    await upload.enqueue("x" * 50)
    with pytest.raises(TaskArgumentError, match=r"take 1\d\d bytes.*limit of 100") as info:
        await upload.enqueue("x" * 150)
    assert info.value.task_name == upload.name
    assert len(bridge.backend("rec").calls) == 1  # type: ignore[attr-defined]


def test_signatures_detect_tampering_and_missing_signatures() -> None:
    signer = Signer("k" * 32)
    call: tuple[Any, ...] = ("id-1", "billing.charge", [42], {"cents": 1000})
    signature = signer.sign(*call)
    signer.verify(signature, *call)
    with pytest.raises(MessageError, match=r"'billing.charge' \[id-1\]: signature does not match"):
        signer.verify(signature, "id-1", "billing.charge", [42], {"cents": 1})
    with pytest.raises(MessageError, match="not signed"):
        signer.verify(None, *call)
    with pytest.raises(MessageError, match="signature does not match"):
        Signer("other-key-" * 4).verify(signature, *call)


def test_signing_key_is_a_secret_in_settings() -> None:
    bridge = TaskBridge({"signing_key": "s" * 32})
    assert "s" * 32 not in repr(bridge.settings)
    assert bridge.signer is not None
    with pytest.raises(ConfigurationError, match="TASKBRIDGE_SIGNING_KEY"):
        TaskBridge({"signing_key": "short"}).validate()
