"""The API side's view of calls: Celery's result meta (and taskbridge's markers) read from Redis
with redis.asyncio, mapped onto TaskStatus; and the few writes the API side makes (revoking a
call that has not started, taking idempotency keys for an AMQP broker).

Nothing here goes through Celery: a status is one MGET (two GETs when the broker is another
Redis than the results), never a thread or a blocking client. A `sentinel://` result backend
(or broker) is reached through redis.asyncio's Sentinel client, with the transport options
Celery and kombu read (`master_name`, `sentinel_kwargs`), so it follows a failover (`_sentinel`).

The alias's call index (`RedisIndex`, see `_index`) is read and watched over the same client of
the results' Redis, one per event loop.
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

from taskbridge.backends import (
    Counts,
    Cursor,
    IndexPage,
    KeptCall,
    RedisIndex,
    TaskErrorInfo,
    TaskStatus,
    composed_args,
    timestamp,
)

from ._index import (
    REVOKE_INDEXED,
    BesideWriter,
    IndexSpec,
    Mark,
    index_spec,
    index_with_broker,
    row,
)
from ._keys import (
    REVOKE_SCRIPT,
    RUNNING_ONLY,
    STATES,
    TB_FIELD,
    date_done_ms,
    decode_json,
    dedup_key,
    marker_life,
    marker_value,
    own_prefix,
    queued_key,
    result_expires,
    result_key,
    result_key_prefix,
    tb_fields,
    tb_value,
    with_call,
)
from ._options import CeleryOptions, celery_config, redis_transport
from ._protocol import TaskMessage
from ._sentinel import async_redis, close_async_redis, is_sentinel

__all__ = ["STATES", "Snapshot", "StatusStore", "error_info"]

KEPT_FIELDS = ("name", "args", "kwargs")
"""The fields of a meta that keep a call's task and arguments (Celery's `result_extended`)."""

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
            kept = self.marker_call() or {}
            return TaskStatus(
                id=self.id,
                task_name=name if isinstance(name, str) else None,
                backend=alias,
                state="queued",
                enqueued_at=timestamp(_number(marker.get("enqueued_at"))),
                args=kept.get("args"),
                kwargs=kept.get("kwargs"),
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
            error=self._error() if state in ("failed", "retrying") else None,
            args=self.args,
            kwargs=self.kwargs,
        )

    def _error(self) -> TaskErrorInfo | None:
        assert self.meta is not None
        error = error_info(self.meta.get("result"))
        trace = self.meta.get("traceback")
        if error is not None and isinstance(trace, str) and trace:
            error.traceback = trace
        return error

    @property
    def args(self) -> list[Any] | None:
        """The call's positional arguments, where the meta keeps them (`result_extended`, or
        taskbridge's worker for a call that failed, is retrying or was cancelled)."""
        found = _kept(self.meta, "args")
        return list(found) if isinstance(found, list | tuple) else None

    @property
    def kwargs(self) -> dict[str, Any] | None:
        """The call's keyword arguments, where the meta keeps them."""
        found = _kept(self.meta, "kwargs")
        return dict(found) if isinstance(found, Mapping) else None

    def marker_call(self) -> dict[str, Any] | None:
        """`{"args", "kwargs"}` of the call's message body its `queued` marker holds."""
        call = (self.marker or {}).get("call")
        if isinstance(call, list) and len(call) >= 2:
            args, kwargs = call[0], call[1]
            if isinstance(args, list) and isinstance(kwargs, dict):
                return {"args": args, "kwargs": kwargs}
        return None

    def kept_call(self) -> KeptCall | None:
        """The task and arguments of a call that failed or was cancelled, when its meta keeps
        them (Celery's `result_extended` fields, which taskbridge's worker writes too)."""
        if self.meta is None or STATES.get(self.celery_state) not in ("failed", "cancelled"):
            return None
        name = self.tb.get("task", self.meta.get("name"))
        args, kwargs = self.args, self.kwargs
        if not isinstance(name, str) or not name or args is None:
            return None
        if kwargs is None and self.meta.get("kwargs") is not None:
            return None  # kept, but not as a mapping
        return KeptCall(task_name=name, args=tuple(args), kwargs=kwargs or {})


def _kept(meta: Mapping[str, Any] | None, name: str) -> Any:
    """A kept-argument field of `meta` (JSON text, as Celery's database backends store it, is
    read too)."""
    if meta is None:
        return None
    found = meta.get(name)
    if isinstance(found, str):
        with contextlib.suppress(ValueError):
            return json.loads(found)
        return None
    return found


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
    # Its arguments are kept for a retry: from the meta (between attempts) or the marker.
    kept = snapshot.meta or {}
    for name in KEPT_FIELDS:
        if name in kept:
            meta[name] = kept[name]
    if "args" not in meta:
        meta.update(snapshot.marker_call() or {})
    meta[TB_FIELD] = tb_value(fields, date_done_ms(meta))
    return json.dumps(meta, separators=(",", ":")).encode()


class _SettledIndex(RedisIndex):
    """The call index, read once the loop's unfinished beside writes are done: a call this
    process dispatched is listed and counted as soon as its dispatch returned."""

    def __init__(self, clients: _Clients, spec: IndexSpec) -> None:
        super().__init__(
            clients.results, spec.prefix, ttl=spec.ttl_ms / 1000, max_entries=spec.max_entries
        )
        self._clients = clients

    async def _settled(self) -> None:
        writer = self._clients.writer
        if writer is not None and writer.pending:
            await writer.all_settled()

    async def page(
        self, *, state: str | None, task: str | None, after: Cursor | None, limit: int
    ) -> IndexPage:
        await self._settled()
        return await super().page(state=state, task=task, after=after, limit=limit)

    async def counts(self) -> Counts:
        await self._settled()
        return await super().counts()


@dataclass
class _Clients:
    loop: asyncio.AbstractEventLoop
    results: redis.asyncio.Redis
    markers: redis.asyncio.Redis | None
    """The broker's Redis when markers live there and it is another server or database."""
    revoke: Any = field(default=None)
    index: _SettledIndex | None = None
    writer: BesideWriter | None = None


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
        self.index_spec = index_spec(options)
        """Where the alias's call index is (None: it keeps none)."""
        self.index_apart = self.index_spec is not None and not index_with_broker(options)
        """Whether dispatch indexes calls from here (`beside`): the broker is not this Redis."""
        self.marks_queued = not redis_transport(options) and options.track_queued
        """Whether dispatch writes `queued` markers from here (`beside`): a RabbitMQ broker."""
        self._marker_ms = round(marker_life(options) * 1000)
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

    def index(self) -> RedisIndex | None:
        """The call index, over the running loop's client of the results' Redis (None: no
        index). Asked for on the event loop (RuntimeError outside one)."""
        spec = self.index_spec
        if spec is None:
            return None
        clients = self._for_loop()
        if clients.index is None:
            clients.index = _SettledIndex(clients, spec)
        return clients.index

    @property
    def writes_beside(self) -> bool:
        """Whether dispatch writes markers or index rows here (`room`, `beside`)."""
        return self.marks_queued or self.index_apart

    async def room(self) -> None:
        """Before a publish: wait while too many beside writes are unfinished (`BesideWriter`),
        so that a results' Redis that is slow or down slows dispatch down rather than growing
        memory (a dispatch given up on meanwhile has sent nothing)."""
        clients = self._clients
        if clients is not None and clients.writer is not None:
            if clients.loop is asyncio.get_running_loop():
                await clients.writer.room()

    def beside(self, messages: Sequence[TaskMessage]) -> None:
        """Once the broker took `messages`, start writing what their publish cannot carry to the
        results' Redis: their `queued` markers (RabbitMQ broker) and their index rows (a broker
        other than this Redis). Not awaited: reads here wait for it. A failure is logged."""
        marks: list[Mark] = []
        if self.marks_queued:
            marks = [
                (
                    queued_key(self._prefix, m.id),
                    with_call(marker_value(m.task, m.enqueued_at), m.body),
                    self._marker_ms + m.delay_ms,
                )
                for m in messages
            ]
        rows = [row(m) for m in messages] if self.index_apart else []
        clients = self._for_loop()
        if clients.writer is None:
            clients.writer = BesideWriter(clients.results, self.index_spec)
        ids = [m.id for m in messages]
        results = [result_key(self._result_prefix, task_id) for task_id in ids]
        clients.writer.add(ids, results, marks, rows)

    async def read(self, task_id: str) -> Snapshot:
        """The call's result meta and marker, in one round trip when they share a Redis (once
        the call's beside write, when this loop dispatched it, is done)."""
        clients = self._for_loop()
        writer = clients.writer
        if writer is not None and writer.pending:
            await writer.settled((task_id,))
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

    async def read_many(self, task_ids: Sequence[str]) -> list[Snapshot]:
        """`read` of each of `task_ids`, in one round trip: one MGET, or one to each Redis at
        once when the markers live in the broker's (used, as `read` uses them, only for calls
        with no result yet)."""
        if not task_ids:
            return []
        clients = self._for_loop()
        writer = clients.writer
        if writer is not None and writer.pending:
            await writer.settled(task_ids)
        meta_keys = [result_key(self._result_prefix, task_id) for task_id in task_ids]
        marker_keys = [
            key
            for task_id in task_ids
            for key in (queued_key(self._prefix, task_id), dedup_key(self._prefix, task_id))
        ]
        if clients.markers is None:
            raw = await clients.results.mget([*meta_keys, *marker_keys])
            raw_metas, raw_markers = raw[: len(task_ids)], raw[len(task_ids) :]
        else:
            raw_metas, raw_markers = await asyncio.gather(
                clients.results.mget(meta_keys), clients.markers.mget(marker_keys)
            )
        found = []
        for i, task_id in enumerate(task_ids):
            meta = decode_json(raw_metas[i])
            marker = None
            if clients.markers is None or meta is None or meta.get("status") == "PENDING":
                pair = raw_markers[2 * i : 2 * i + 2]
                marker = next((m for m in map(decode_json, pair) if m is not None), None)
            found.append(Snapshot(task_id, meta, marker))
        return found

    async def revoke(self, snapshot: Snapshot, reason: str) -> Snapshot | None:
        """Store REVOKED for a call no worker claimed (None); if one did meanwhile, or the call
        ended, store nothing and return what the result now says."""
        clients = self._for_loop()
        spec = self.index_spec
        if clients.revoke is None:
            script = REVOKE_SCRIPT if spec is None else REVOKE_INDEXED
            clients.revoke = clients.results.register_script(script)
        args: list[Any] = [revoked_meta(snapshot, reason), self.expires]
        if spec is not None:  # and moved to cancelled in the index, by the same script
            marker = snapshot.marker or {}
            fields = {**marker, **snapshot.tb}
            args = composed_args(
                args,
                spec.move(snapshot.id, "cancelled", fields.get("task"), fields.get("enqueued_at")),
            )
        current = await clients.revoke(
            keys=[result_key(self._result_prefix, snapshot.id)], args=args
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
        if clients.index is not None:
            await clients.index.close()
        if clients.writer is not None:
            await clients.writer.wait_idle()
        await close_async_redis(clients.results)
        if clients.markers is not None:
            await close_async_redis(clients.markers)
