"""The API side's view of calls: Celery's result meta (and taskbridge's markers) read from Redis
with redis.asyncio, mapped onto TaskStatus; and the few writes the API side makes (revoking a
call that has not started, taking idempotency keys for an AMQP broker).

Nothing here goes through Celery: a status is one MGET (two GETs when the broker is another
Redis than the results), never a thread or a blocking client. A `sentinel://` result backend
(or broker) is reached through redis.asyncio's Sentinel client, with the transport options
Celery and kombu read (`master_name`, `sentinel_kwargs`), so it follows a failover (`_sentinel`).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis.asyncio
from redis.exceptions import RedisError

from taskbridge.backends import TaskErrorInfo, TaskStatus, timestamp

from ._keys import (
    REVOKE_SCRIPT,
    RUNNING_ONLY,
    TB_FIELD,
    date_done_ms,
    decode_json,
    dedup_key,
    marker_value,
    own_prefix,
    queued_key,
    result_expires,
    result_key,
    result_key_prefix,
    tb_fields,
    tb_value,
)
from ._options import CeleryOptions, celery_config, redis_transport
from ._protocol import TaskMessage
from ._sentinel import async_redis, close_async_redis, is_sentinel

__all__ = ["STATES", "Snapshot", "StatusStore", "error_info"]

STATES: dict[str, str] = {
    "RECEIVED": "running",
    "STARTED": "running",
    "PROGRESS": "running",
    "RETRY": "retrying",
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "REJECTED": "failed",
    "REVOKED": "cancelled",
}
"""Celery states (and taskbridge's PROGRESS) as taskbridge states; PENDING is "no result yet"
and any other custom state a task sets with `update_state` counts as running."""

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


def error_info(result: Any) -> TaskErrorInfo | None:
    """The error of a FAILURE or RETRY meta: Celery stores `{"exc_type", "exc_message" (the
    exception's args), "exc_module"}`; the message is what `str(exc)` gave (built-in exceptions
    are rebuilt for that, as `str(KeyError("k"))` is `'k'`; nothing else is imported)."""
    if not isinstance(result, Mapping) or "exc_type" not in result:
        return None
    module = result.get("exc_module")
    kind = str(result.get("exc_type"))
    args = result.get("exc_message")
    if isinstance(args, list | tuple):
        message = "" if not args else str(args[0]) if len(args) == 1 else str(tuple(args))
        builtin = getattr(builtins, kind, None) if module == "builtins" else None
        if isinstance(builtin, type) and issubclass(builtin, BaseException):
            with contextlib.suppress(Exception):
                message = str(builtin(*args))
    else:
        message = "" if args is None else str(args)
    return TaskErrorInfo(type=f"{module}.{kind}" if module else kind, message=message)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _finished(meta: Mapping[str, Any], tb: Mapping[str, Any]) -> datetime | None:
    seconds = _number(tb.get("finished_at"))
    if seconds is not None:
        return timestamp(seconds)
    done = meta.get("date_done")
    if not isinstance(done, str):
        return None
    try:
        parsed = datetime.fromisoformat(done)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What Redis holds of one call: its result meta and its queued (or dedup) marker."""

    id: str
    meta: dict[str, Any] | None = None
    """Celery's result meta; None when there is none (Celery's PENDING)."""
    marker: dict[str, Any] | None = None
    """`{"task", "enqueued_at"}` written at dispatch; None when there is none."""

    @property
    def celery_state(self) -> str:
        return str(self.meta.get("status")) if self.meta else "PENDING"

    @property
    def tb(self) -> dict[str, Any]:
        return tb_fields(self.meta)

    def status(self, alias: str) -> TaskStatus | None:
        """The call's TaskStatus; None when Redis knows nothing of it."""
        marker = self.marker or {}
        meta = self.meta
        if meta is None or self.celery_state == "PENDING":
            if not self.marker:
                return None
            name = marker.get("task")
            return TaskStatus(
                id=self.id,
                task_name=name if isinstance(name, str) else None,
                backend=alias,
                state="queued",
                enqueued_at=timestamp(_number(marker.get("enqueued_at"))),
            )
        tb = self.tb
        state = STATES.get(self.celery_state, "running")
        name = tb.get("task", meta.get("name", marker.get("task")))
        attempt = tb.get("attempt")
        progress = _number(tb.get("progress"))
        message = tb.get("progress_message")
        enqueued = _number(tb.get("enqueued_at", marker.get("enqueued_at")))
        return TaskStatus(
            id=self.id,
            task_name=name if isinstance(name, str) else None,
            backend=alias,
            state=state,  # type: ignore[arg-type]  # a TaskState by construction of STATES
            attempts=attempt if isinstance(attempt, int) and attempt >= 0 else 0,
            progress=None if progress is None else min(1.0, max(0.0, progress)),
            progress_message=message if isinstance(message, str) else None,
            enqueued_at=timestamp(enqueued),
            started_at=timestamp(_number(tb.get("started_at"))),
            finished_at=_finished(meta, tb) if state in TERMINAL else None,
            result=meta.get("result") if state == "succeeded" else None,
            error=error_info(meta.get("result")) if state in ("failed", "retrying") else None,
        )


def revoked_meta(snapshot: Snapshot, reason: str) -> bytes:
    """The REVOKED meta the API side stores for a call that has not started: Celery's own shape
    (so `AsyncResult` raises TaskRevokedError), written as the worker writes a final state
    (compact, no traceback of None), with what is known of the call carried over."""
    now = datetime.now(UTC)
    fields = snapshot.tb
    for name in ("task", "enqueued_at"):
        if snapshot.marker and name not in fields and name in snapshot.marker:
            fields[name] = snapshot.marker[name]
    for name in RUNNING_ONLY:
        fields.pop(name, None)
    meta: dict[str, Any] = {
        "status": "REVOKED",
        "result": {
            "exc_type": "TaskRevokedError",
            "exc_message": [reason],
            "exc_module": "celery.exceptions",
        },
        "children": [],
        "date_done": now.isoformat(),
        "task_id": snapshot.id,
    }
    meta[TB_FIELD] = tb_value(fields, date_done_ms(meta))
    return json.dumps(meta, separators=(",", ":")).encode()


@dataclass
class _Clients:
    loop: asyncio.AbstractEventLoop
    results: redis.asyncio.Redis
    markers: redis.asyncio.Redis | None
    """The broker's Redis when markers live there and it is another server or database."""
    revoke: Any = field(default=None)


class StatusStore:
    """Reads and writes call status in the Redis of the result backend (and the broker's)."""

    errors: tuple[type[BaseException], ...] = (RedisError, OSError)

    def __init__(self, options: CeleryOptions, timeout: float) -> None:
        results = options.result_backend
        assert results is not None
        config = celery_config(options)
        self._results = (results, config["result_backend_transport_options"])
        self.tracks_queued = redis_transport(options) and options.track_queued
        """Whether dispatch writes a `queued` marker (Redis broker), so that a call with no
        result and no marker is unknown rather than possibly queued."""
        self._markers = (
            (options.broker_url, config["broker_transport_options"])
            if redis_transport(options)
            else self._results
        )
        self._result_prefix = result_key_prefix(options)
        self._prefix = own_prefix(options)
        self.expires = result_expires(options)
        self._timeout = timeout
        self._clients: _Clients | None = None

    def _redis(self, target: tuple[str, Mapping[str, Any]]) -> redis.asyncio.Redis:
        url, transport_options = target
        return async_redis(url, transport_options, self._timeout)

    def _shared(self) -> bool:
        """Whether the markers live in the results' Redis: same URL (and, for Sentinel, the
        same master)."""
        (markers, marker_options), (results, result_options) = self._markers, self._results
        if markers != results:
            return False
        return not is_sentinel(results) or (
            marker_options.get("master_name") == result_options.get("master_name")
        )

    def _for_loop(self) -> _Clients:
        # redis.asyncio connections belong to the loop that opened them (see RedisPublisher).
        loop = asyncio.get_running_loop()
        if self._clients is None or self._clients.loop is not loop:
            results = self._redis(self._results)
            markers = None if self._shared() else self._redis(self._markers)
            self._clients = _Clients(loop, results, markers)
        return self._clients

    async def read(self, task_id: str) -> Snapshot:
        """The call's result meta and marker, in one round trip when they share a Redis."""
        clients = self._for_loop()
        meta_key = result_key(self._result_prefix, task_id)
        marker_keys = [queued_key(self._prefix, task_id), dedup_key(self._prefix, task_id)]
        if clients.markers is None:
            raw_meta, *raw_markers = await clients.results.mget([meta_key, *marker_keys])
        else:
            raw_meta = await clients.results.get(meta_key)
            raw_markers = []
            meta = decode_json(raw_meta)
            if meta is None or meta.get("status") == "PENDING":
                raw_markers = await clients.markers.mget(marker_keys)
        marker = next((m for m in map(decode_json, raw_markers) if m is not None), None)
        return Snapshot(task_id, decode_json(raw_meta), marker)

    async def revoke(self, snapshot: Snapshot, reason: str) -> Snapshot | None:
        """Store REVOKED for a call no worker claimed (None); if one did meanwhile, or the call
        ended, store nothing and return what the result now says."""
        clients = self._for_loop()
        if clients.revoke is None:
            clients.revoke = clients.results.register_script(REVOKE_SCRIPT)
        current = await clients.revoke(
            keys=[result_key(self._result_prefix, snapshot.id)],
            args=[revoked_meta(snapshot, reason), self.expires],
        )
        if not current:
            return None
        return Snapshot(snapshot.id, decode_json(current), snapshot.marker)

    async def take_keys(self, messages: Sequence[TaskMessage]) -> list[bool]:
        """For an AMQP broker: SET NX PX the dedup key of each keyed message, in one pipeline;
        True where this dispatch took the key (and must publish)."""
        pipe = self._for_loop().results.pipeline(transaction=False)
        for m in messages:
            assert m.key_ttl is not None
            pipe.set(
                dedup_key(self._prefix, m.id),
                marker_value(m.task, m.enqueued_at),
                nx=True,
                px=max(1, round(m.key_ttl * 1000)),
            )
        return [bool(taken) for taken in await pipe.execute()]

    async def release_keys(self, task_ids: Sequence[str]) -> None:
        """Give back dedup keys taken for calls that could not be published."""
        if task_ids:
            await self._for_loop().results.delete(*(dedup_key(self._prefix, i) for i in task_ids))

    async def close(self) -> None:
        clients, self._clients = self._clients, None
        if clients is None or clients.loop is not asyncio.get_running_loop():
            return
        await close_async_redis(clients.results)
        if clients.markers is not None:
            await close_async_redis(clients.markers)
