"""Celery's Redis result backend, keeping what taskbridge's status needs next to each result.

Installed on the apps `build_app` makes (worker and API side) when the alias has a result
backend. It stores exactly what Celery stores, plus the `taskbridge` field (see `_keys`), and
adds two operations the worker uses instead of Celery's own writes:

- `claim`: before an attempt runs, one Lua script stores STARTED, unless the result says the call
  was revoked (cancelled before it started, possibly while no worker was running) or already
  succeeded (a redelivered message): then the attempt does not run. It replaces Celery's
  `task_track_started` write (a GET, then SET and PUBLISH), so it costs no extra round trip.
  The same script deletes the call's `queued` marker, which the result replaces from then on
  (when the broker is another Redis, one DEL there instead).
- `report_progress`: one Lua script stores PROGRESS with the task's fraction and message, only
  over the running attempt's own STARTED/PROGRESS.

Every other store (SUCCESS, FAILURE, RETRY, REVOKED) merges the `taskbridge` field of the meta it
replaces, which Celery reads anyway (its SUCCESS guard), so the start time and progress survive
into the final state. A final state drops the fields that only serve a running call (worker,
pool, pid: see `_keys.RUNNING_ONLY`); its finish time is Celery's `date_done`.

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
from kombu.utils.encoding import bytes_to_str  # type: ignore[import-untyped]

from ._keys import CLAIM_SCRIPT, PROGRESS_SCRIPT, RUNNING_ONLY, TB_FIELD, queued_key, tb_fields
from ._options import QUEUED_MARKERS
from ._protocol import ENQUEUED_HEADER
from ._sentinel import is_sentinel, sentinel_address

__all__ = ["TaskBridgeRedisBackend", "TaskBridgeSentinelBackend", "backend_cls", "request_fields"]

logger = logging.getLogger("taskbridge.celery")

PROGRESS = "PROGRESS"
"""The state of a running call that reported progress (Celery's custom-state convention)."""


def backend_cls(url: str) -> str:
    """What to set as `app.backend_cls` so that Celery builds this backend for `url`
    (`<class>+<url>`, Celery's own syntax), leaving `conf.result_backend` as configured:
    `TaskBridgeSentinelBackend` for a `sentinel://` URL, else `TaskBridgeRedisBackend`."""
    name = "TaskBridgeSentinelBackend" if is_sentinel(url) else "TaskBridgeRedisBackend"
    return f"{__name__}:{name}+{url}"


def request_fields(request: Any, state: str) -> dict[str, Any]:
    """The `taskbridge` fields a store of `state` for `request` (a Celery Context) sets."""
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
    """Celery's RedisBackend, with the `taskbridge` field, `claim` and `report_progress`."""

    _claim_script: Any = None
    _progress_script: Any = None
    _markers: tuple[str, bool] | None = None
    """The `queued` markers' key prefix and whether they live in this Redis; None: none."""
    _markers_read = False
    _marker_client: Any = None
    """The broker's Redis, when the markers live there and it is another one."""

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        # KeyValueStoreBackend._store_result (Celery 5.5/5.6), merging the taskbridge field.
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
        meta[TB_FIELD] = fields
        try:
            self._set_with_state(self.get_key_for_task(task_id), self.encode(meta), state)
        except BackendStoreError as ex:
            raise BackendStoreError(str(ex), state=state, task_id=task_id) from ex
        return result

    def _meta(self, request: Any, state: str, result: Any, fields: dict[str, Any]) -> bytes:
        meta = self._get_result_meta(result=result, state=state, traceback=None, request=request)
        meta["task_id"] = request.id
        meta[TB_FIELD] = fields
        encoded: bytes | str = self.encode(meta)
        return encoded.encode() if isinstance(encoded, str) else encoded

    def claim(
        self, request: Any, pool: str | None, is_async: bool
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Store STARTED for the attempt `request` is about to run, unless the call was revoked
        or already succeeded. Returns (that result meta, or None when the attempt may run; the
        `taskbridge` fields of the attempt, for its progress reports)."""
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
        enqueued = fields.get("enqueued_at")
        args = [meta, self.expires or 0, "" if enqueued is None else repr(enqueued)]
        keys = [self.get_key_for_task(request.id)]
        markers = self._marker_setting()
        if markers is not None and markers[1]:
            keys.append(queued_key(markers[0], request.id))
        current = self.ensure(self._claim, (keys, args))
        if markers is not None and not markers[1]:
            self._delete_marker(queued_key(markers[0], request.id))
        return (None if not current else self.decode(current)), fields

    def _claim(self, keys: list[str], args: list[Any]) -> Any:
        if self._claim_script is None:
            self._claim_script = self.client.register_script(CLAIM_SCRIPT)
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
        self.ensure(self._progress, (key, [meta, self.expires or 0]))

    def _progress(self, key: str, args: list[Any]) -> Any:
        if self._progress_script is None:
            self._progress_script = self.client.register_script(PROGRESS_SCRIPT)
        return self._progress_script(keys=[key], args=args)


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
    master), with the `taskbridge` field, `claim` and `report_progress` of
    TaskBridgeRedisBackend (which its Method Resolution Order puts first)."""
