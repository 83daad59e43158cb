"""Optional HMAC signing of queued messages (`signing_key`): workers reject what was not
produced by someone holding the key, or was altered on the way."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from ._codec import encode_json
from ._exceptions import MessageError

__all__ = ["Signer"]


class Signer:
    """Signs and verifies (task id, task name, args, kwargs) with HMAC-SHA256."""

    def __init__(self, key: str | bytes) -> None:
        self._key = key.encode() if isinstance(key, str) else key

    def sign(
        self, task_id: str, task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> str:
        """The hex signature of one call."""
        payload = encode_json([task_id, task_name, list(args), dict(kwargs)])
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()

    def verify(
        self,
        signature: object,
        task_id: str,
        task_name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> None:
        """Raise MessageError, naming the task and id, unless `signature` is the call's own."""
        if not isinstance(signature, str) or not signature:
            raise MessageError(f"task {task_name!r} [{task_id}]: message is not signed; rejected")
        if not hmac.compare_digest(signature, self.sign(task_id, task_name, args, kwargs)):
            raise MessageError(
                f"task {task_name!r} [{task_id}]: signature does not match (altered, or signed "
                "with another key); rejected"
            )
