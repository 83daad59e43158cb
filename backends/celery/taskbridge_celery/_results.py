"""Celery's Redis result backend, keeping what taskbridge's status needs next to each result.

Installed on the apps `build_app` makes (worker and API side) when the alias has a result
backend. It stores what Celery stores, plus the `tb` field (see `_keys`), in fewer bytes: a
result is kept for a day, one per call, so its size is what Redis holds per call. The JSON is
compact (no blanks after `,` and `:`: kombu's JSON reads it back identically), and a `traceback`
of None is left out (Celery's readers all take `meta.get("traceback")`: the same None). It adds
two operations the worker uses instead of Celery's own writes:

- `claim`: before an attempt runs, one Lua script stores STARTED, unless the result says the call
  was revoked (cancelled before it started, possibly while no worker was running) or already
  succeeded (a redelivered message) in this dispatch: then the attempt does not run (a result of
  an earlier dispatch of the id, by its enqueue time, is replaced by a second call of the
  script). It replaces Celery's `task_track_started` write (a GET, then SET and PUBLISH), so it
  costs no extra round trip. The same script deletes the call's `queued` marker, which the
  result replaces from then on (when the broker is another Redis, one DEL there instead).
- `report_progress`: one Lua script stores PROGRESS with the task's fraction and message, only
  over the running attempt's own STARTED/PROGRESS.

Every other store (SUCCESS, FAILURE, RETRY, REVOKED) merges the `tb` field of the meta it
replaces (either format), which Celery reads anyway (its SUCCESS guard), so the start time and
progress survive into the final state. A final state drops the fields that only serve a running
call (worker, pool, pid: see `_keys.RUNNING_ONLY`); its finish time is Celery's `date_done`, from
which its other times count back.

With a call index (`_index`), each of these writes moves the call in the index in the same
script: the claim to running, a progress report only publishes the change, and the stores of
RETRY, SUCCESS, FAILURE and REVOKED to retrying, succeeded, failed and cancelled (a store is then
one script, Celery's SET and PUBLISH, instead of Celery's MULTI/EXEC of the same). The stores of
FAILURE, RETRY and REVOKED keep the call's `args` and `kwargs` (Celery's `result_extended`
names, bounded: see `_index.kept_arguments`), so a failed or cancelled call can run again; a
SUCCESS keeps its result only.

A `sentinel://` result backend gets `TaskBridgeSentinelBackend`: the same, on Celery's own
`SentinelBackend` (the master named by `result_backend_transport_options.master_name`, found
through the Sentinels by redis-py, again after a failover; the scripts run on whichever master
the client's connection reaches, and are loaded there again when it does not know them).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import states  # type: ignore[import-untyped]
from celery.backends.redis import (  # type: ignore[import-untyped]
    RedisBackend,
    SentinelBackend,
)
from celery.exceptions import BackendStoreError  # type: ignore[import-untyped]
from kombu.exceptions import EncodeError  # type: ignore[import-untyped]
from kombu.utils.encoding import bytes_to_str  # type: ignore[import-untyped]
from kombu.utils.json import dumps as json_dumps  # type: ignore[import-untyped]

from taskbridge.backends import composed_args

from ._index import (
    CLAIM_INDEXED,
    INDEX_SETTING,
    PROGRESS_INDEXED,
    STORE_INDEXED,
    IndexSpec,
    kept_arguments,
)
from ._keys import (
    CLAIM_SCRIPT,
    PROGRESS_SCRIPT,
    RUNNING_ONLY,
    STATES,
    TB_FIELD,
    date_done_ms,
    queued_key,
    tb_fields,
    tb_value,
    to_ms,
)
from ._options import QUEUED_MARKERS
from ._protocol import ENQUEUED_HEADER
from ._sentinel import is_sentinel, sentinel_address

__all__ = ["TaskBridgeRedisBackend", "TaskBridgeSentinelBackend", "backend_cls", "request_fields"]

logger = logging.getLogger("taskbridge.celery")

PROGRESS = "PROGRESS"
"""The state of a running call that reported progress (Celery's custom-state convention)."""

COMPACT = (",", ":")
"""JSON separators without blanks."""

KEEPS_ARGUMENTS = frozenset({states.FAILURE, states.REVOKED, states.RETRY})
"""States whose meta keeps the call's arguments (bounded, see `_index.kept_arguments`), so that
a call that failed, or was cancelled (between attempts too), can be run again."""

CLAIM_TRIES = 3
"""Claims of one attempt at most: the second replaces a final result of an earlier dispatch;
a third only when another worker stored one in between."""


def backend_cls(url: str) -> str:
    """What to set as `app.backend_cls` so that Celery builds this backend for `url`
    (`<class>+<url>`, Celery's own syntax), leaving `conf.result_backend` as configured:
    `TaskBridgeSentinelBackend` for a `sentinel://` URL, else `TaskBridgeRedisBackend`."""
    name = "TaskBridgeSentinelBackend" if is_sentinel(url) else "TaskBridgeRedisBackend"
    return f"{__name__}:{name}+{url}"


def request_fields(request: Any, state: str) -> dict[str, Any]:
    """The `tb` fields a store of `state` for `request` (a Celery Context) sets."""
    fields: dict[str, Any] = {}
    if request is not None:
        name = getattr(request, "task", None)
        if isinstance(name, str):
            fields["task"] = name
        retries = getattr(request, "retries", None)
        if isinstance(retries, int):
            fields["attempt"] = retries + 1
        enqueued = getattr(request, ENQUEUED_HEADER, None)
        if isinstance(enqueued, int | float) and not isinstance(enqueued, bool):
            fields["enqueued_at"] = enqueued
    return fields


class TaskBridgeRedisBackend(RedisBackend):  # type: ignore[misc]
    """Celery's RedisBackend, with the `tb` field, `claim` and `report_progress`."""

    _claim_script: Any = None
    _progress_script: Any = None
    _store_script: Any = None
    _index: IndexSpec | None = None
    _index_read = False
    _markers: tuple[str, bool] | None = None
    """The `queued` markers' key prefix and whether they live in this Redis; None: none."""
    _markers_read = False
    _marker_client: Any = None
    """The broker's Redis, when the markers live there and it is another one."""

    def _encode(self, data: Any) -> tuple[str, str, Any]:
        # Celery's `_encode` (kombu's `dumps`, whose JSON encoder also writes datetimes, UUIDs
        # and Decimals), compact; Celery 5.7 compresses what it returns when configured to.
        if self.serializer != "json":
            return super()._encode(data)  # type: ignore[no-any-return]
        try:
            payload = json_dumps(data, separators=COMPACT)
        except Exception as exc:
            raise EncodeError(exc) from exc
        return "application/json", "utf-8", payload

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        # KeyValueStoreBackend._store_result (Celery 5.5 to 5.7), merging the `tb` field.
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        current = self._get_task_meta_for(task_id)
        if current["status"] == states.SUCCESS:
            return result
        fields = {**tb_fields(current), **request_fields(request, state)}
        if state in states.READY_STATES:
            for name in RUNNING_ONLY:
                fields.pop(name, None)
        if state in KEEPS_ARGUMENTS and "args" not in meta and request is not None:
            meta.update(
                kept_arguments(getattr(request, "args", None), getattr(request, "kwargs", None))
                or {}
            )
        try:
            self._store_meta(task_id, self._finish(meta, fields), state, fields)
        except BackendStoreError as ex:
            raise BackendStoreError(str(ex), state=state, task_id=task_id) from ex
        return result

    def _store_meta(self, task_id: str, value: Any, state: str, fields: dict[str, Any]) -> None:
        """Store a result meta as Celery does; with an index, move the call to the state's
        index state in the same script."""
        key = self.get_key_for_task(task_id)
        spec = self.index_spec()
        if spec is None or state == states.PENDING:
            self._set_with_state(key, value, state)
            return
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:  # as Celery's `set`
            raise BackendStoreError("value too large for Redis backend")
        moved = STATES.get(state, "running")
        index = spec.move(task_id, moved, fields.get("task"), fields.get("enqueued_at"))
        self.ensure(self._store_indexed, (key, composed_args([value, self.expires or 0], index)))

    def _store_indexed(self, key: str, args: list[Any]) -> Any:
        if self._store_script is None:
            self._store_script = self.client.register_script(STORE_INDEXED)
        return self._store_script(keys=[key], args=args)

    def index_spec(self) -> IndexSpec | None:
        """The call index this worker moves calls in (None: the alias keeps none)."""
        if not self._index_read:
            self._index = IndexSpec.from_setting(self.app.conf.get(INDEX_SETTING))
            self._index_read = True
        return self._index

    def keep_arguments(self, request: Any, meta: dict[str, Any]) -> None:
        """Add the call's arguments to the REVOKED meta the API stored when it cancelled the
        call before any worker had it (the API never has them): once its message reaches a
        worker, the cancelled call can be run again. A failure only leaves them out."""
        if meta.get("status") != states.REVOKED or "args" in meta:
            return
        kept = kept_arguments(getattr(request, "args", None), getattr(request, "kwargs", None))
        if kept is None:
            return
        # ...with its task and enqueue time, which the API did not know either on RabbitMQ
        fields = tb_fields(meta)
        for name, value in request_fields(request, states.REVOKED).items():
            if name != "attempt":  # it never started
                fields.setdefault(name, value)
        try:
            value = self.encode({**meta, **kept, TB_FIELD: tb_value(fields, date_done_ms(meta))})
            self.client.set(self.get_key_for_task(request.id), value, xx=True, keepttl=True)
        except Exception as exc:
            logger.debug("arguments of cancelled call %s not kept: %s", request.id, exc)

    def _finish(self, meta: dict[str, Any], fields: dict[str, Any]) -> Any:
        """`meta` with the `tb` field of `fields`, encoded, without a traceback of None."""
        if meta.get("traceback", True) is None:
            del meta["traceback"]
        meta[TB_FIELD] = tb_value(fields, date_done_ms(meta))
        return self.encode(meta)

    def _meta(self, request: Any, state: str, result: Any, fields: dict[str, Any]) -> bytes:
        meta = self._get_result_meta(result=result, state=state, traceback=None, request=request)
        meta["task_id"] = request.id
        encoded: bytes | str = self._finish(meta, fields)
        return encoded.encode() if isinstance(encoded, str) else encoded

    def claim(
        self, request: Any, pool: str | None, is_async: bool
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Store STARTED for the attempt `request` is about to run, unless the call was revoked
        or already succeeded in this dispatch. Returns (that result meta, or None when the
        attempt may run; the `tb` fields of the attempt, for its progress reports)."""
        now = time.time()
        pid, hostname = os.getpid(), getattr(request, "hostname", None)
        fields = {
            **request_fields(request, states.STARTED),
            "started_at": now,
            "hostname": hostname,
            "pid": pid,
            "pool": pool,
            "async": is_async,
        }
        meta = self._meta(request, states.STARTED, {"pid": pid, "hostname": hostname}, fields)
        keys = [self.get_key_for_task(request.id)]
        markers = self._marker_setting()
        if markers is not None and markers[1]:
            keys.append(queued_key(markers[0], request.id))
        found: dict[str, Any] | None = None
        replacing: bytes | str = ""
        for _ in range(CLAIM_TRIES):
            current = self.ensure(
                self._claim, (keys, [meta, self.expires or 0, replacing], request)
            )
            found = None if not current else self.decode(current)
            if found is None or not _earlier_dispatch(found, fields.get("enqueued_at")):
                break
            replacing = current
        if markers is not None and not markers[1]:
            self._delete_marker(queued_key(markers[0], request.id))
        return found, fields

    def _claim(self, keys: list[str], args: list[Any], request: Any) -> Any:
        spec = self.index_spec()
        if self._claim_script is None:
            script = CLAIM_SCRIPT if spec is None else CLAIM_INDEXED
            self._claim_script = self.client.register_script(script)
        if spec is not None:  # moved to running in the index by the same script
            fields = request_fields(request, states.STARTED)
            index = spec.move(request.id, "running", fields.get("task"), fields.get("enqueued_at"))
            args = composed_args(args, index)
        return self._claim_script(keys=keys, args=args)

    def _marker_setting(self) -> tuple[str, bool] | None:
        if not self._markers_read:
            found = self.app.conf.get(QUEUED_MARKERS)
            if isinstance(found, dict):
                self._markers = (str(found.get("prefix") or ""), bool(found.get("with_results")))
            self._markers_read = True
        return self._markers

    def _delete_marker(self, key: str) -> None:
        """The marker lives in the broker's Redis, another one: one DEL there. A failure only
        leaves the marker to its TTL."""
        try:
            if self._marker_client is None:
                self._marker_client = _broker_redis(self.app.conf)
            self._marker_client.delete(key)
        except Exception as exc:
            logger.debug("queued marker %s not deleted (it expires): %s", key, exc)

    def report_progress(self, request: Any, fields: dict[str, Any]) -> None:
        """Store PROGRESS for the running attempt, with its fields (progress included)."""
        result = {"progress": fields.get("progress"), "message": fields.get("progress_message")}
        meta = self._meta(request, PROGRESS, result, fields)
        key = self.get_key_for_task(request.id)
        args: list[Any] = [meta, self.expires or 0]
        spec = self.index_spec()
        if spec is not None:  # a change (no new state) the index publishes, in the same script
            args = composed_args(args, spec.move(request.id, None))
        self.ensure(self._progress, (key, args))

    def _progress(self, key: str, args: list[Any]) -> Any:
        if self._progress_script is None:
            script = PROGRESS_SCRIPT if self.index_spec() is None else PROGRESS_INDEXED
            self._progress_script = self.client.register_script(script)
        return self._progress_script(keys=[key], args=args)


def _earlier_dispatch(meta: dict[str, Any], enqueued: Any) -> bool:
    """Whether a result was stored by an earlier dispatch of the call id than the one enqueued
    at `enqueued` (epoch seconds): both enqueue times are known and differ. A call keyed again
    once its key expired reuses its id."""
    theirs = tb_fields(meta).get("enqueued_at")
    if not isinstance(theirs, int | float) or not isinstance(enqueued, int | float):
        return False
    return to_ms(theirs) != to_ms(enqueued)


def _broker_redis(conf: Any) -> Any:
    """A redis-py client of the broker's Redis (through its Sentinels for a `sentinel://` URL,
    with the master and options kombu uses)."""
    import redis

    url = str(conf.broker_url)
    options = dict(conf.broker_transport_options or {})
    address = sentinel_address(url)
    if address is None:
        return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    from redis.sentinel import Sentinel

    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        address.sentinels,
        min_other_sentinels=int(options.get("min_other_sentinels") or 0),
        sentinel_kwargs={"socket_timeout": 5, **dict(options.get("sentinel_kwargs") or {})},
    )
    return sentinel.master_for(  # type: ignore[no-untyped-call]
        str(options.get("master_name")),
        db=address.db,
        username=address.username,
        password=address.password,
        socket_timeout=5,
    )


class TaskBridgeSentinelBackend(TaskBridgeRedisBackend, SentinelBackend):  # type: ignore[misc]
    """Celery's SentinelBackend (a RedisBackend whose connection pool asks the Sentinels for the
    master), with the `tb` field, `claim` and `report_progress` of
    TaskBridgeRedisBackend (which its Method Resolution Order puts first)."""
