"""Optional HMAC signing of queued messages (`signing_key`): workers reject what was not
produced by someone holding the key, or was altered on the way."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ._exceptions import MessageError

__all__ = ["Signer"]


_canonical = json.JSONEncoder(separators=(",", ":"), sort_keys=True, allow_nan=False).encode


class Signer:
    """Signs and verifies a call with HMAC-SHA256: its id, task name, args and kwargs, the
    carried execution policy, and the engine's fields that change behaviour (time limits, due
    time, retry count), so that no part of a captured message can be altered and still run."""

    def __init__(self, key: str | bytes) -> None:
        self._key = key.encode() if isinstance(key, str) else key

    def sign(
        self,
        task_id: str,
        task_name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        *,
        policy: object = None,
        engine: Mapping[str, Any] | None = None,
    ) -> str:
        """The hex signature of one call (JSON values only; map keys are sorted first)."""
        payload = _canonical(
            [task_id, task_name, list(args), dict(kwargs), policy, dict(engine or {})]
        ).encode()
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()

    def verify(
        self,
        signature: object,
        task_id: str,
        task_name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        *,
        policy: object = None,
        engine: Mapping[str, Any] | None = None,
    ) -> None:
        """Raise MessageError, naming the task and id, unless `signature` is the call's own."""
        if not isinstance(signature, str) or not signature:
            raise MessageError(f"task {task_name!r} [{task_id}]: message is not signed; rejected")
        try:
            expected = self.sign(task_id, task_name, args, kwargs, policy=policy, engine=engine)
        except (TypeError, ValueError) as exc:  # not JSON values: it cannot have been signed
            raise MessageError(
                f"task {task_name!r} [{task_id}]: message holds values JSON cannot carry "
                f"({exc}); rejected"
            ) from None
        if not hmac.compare_digest(signature, expected):
            raise MessageError(
                f"task {task_name!r} [{task_id}]: signature does not match (altered, or signed "
                "with another key); rejected"
            )
