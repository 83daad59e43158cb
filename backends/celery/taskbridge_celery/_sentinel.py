"""Redis Sentinel URLs, read as kombu and Celery read them, and the API side's clients of the
master they name.

A Sentinel URL lists the Sentinels to ask, separated by `;`:
`sentinel://[user:password@]host:26379;sentinel://host2:26379/db` (the same form for the broker,
kombu's `SentinelTransport`, and for the result backend, Celery's `SentinelBackend`). Both take
the database and the master's credentials from the first URL only, and the master's name from
the transport option `master_name`; the Sentinels themselves are asked with `sentinel_kwargs`
(a password of their own, timeouts).

The worker connects through kombu and Celery themselves. The API side (dispatch, status,
cancellation, idempotency keys) uses redis.asyncio's `Sentinel(...).master_for(master_name)`:
each new connection asks a Sentinel where the master is, so after a failover the next
connection goes to the promoted replica (and a connection to a master demoted to replica is
dropped on its first write: redis-py's `SentinelManagedConnection`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio
from redis.asyncio.sentinel import Sentinel

from taskbridge.backends import redact_url

__all__ = [
    "SENTINEL_SCHEME",
    "SentinelAddress",
    "async_redis",
    "close_async_redis",
    "is_sentinel",
    "redact",
    "sentinel_address",
]

SENTINEL_SCHEME = "sentinel"


def redact(url: str) -> str:
    """`url` with every password replaced by `***`, each part of a `;`-separated list too."""
    return ";".join(redact_url(part) for part in url.split(";"))


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    """A `sentinel://` URL taken apart: the Sentinels to ask, and how to use the master."""

    sentinels: list[tuple[str, int]]
    db: int
    username: str | None
    password: str | None


def _db(path: str, part: str) -> int | None:
    path = path.strip("/")
    if not path:
        return None
    try:
        return int(path)
    except ValueError:
        raise ValueError(
            f"{redact_url(part)!r}: the path must be a database number, e.g. /1"
        ) from None


def sentinel_address(url: str) -> SentinelAddress | None:
    """Parse `sentinel://[user:password@]host:port[;sentinel://host:port...][/db]`; None for a
    URL of another scheme.

    kombu and Celery read the database and the credentials from the first URL only and ignore
    them on the others: a later URL naming another database or other credentials is refused
    (it would be silently ignored by the engine). Every Sentinel needs its port (kombu assumes
    26379 for the broker, Celery 6379 for the result backend). Options go in the transport
    options, not in a query string.
    """
    if urlsplit(url.split(";", 1)[0].strip()).scheme.lower() != SENTINEL_SCHEME:
        return None
    hosts: list[tuple[str, int]] = []
    db: int | None = None
    username: str | None = None
    password: str | None = None
    for index, raw in enumerate(url.split(";")):
        part = raw.strip()
        try:
            parts = urlsplit(part)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{redact_url(part)!r} is not a valid URL ({exc})") from None
        if parts.scheme.lower() != SENTINEL_SCHEME or not parts.hostname:
            raise ValueError(
                f"{redact_url(part)!r} is not sentinel://host:port (every part of a Sentinel "
                "list, separated by ';', is a sentinel:// URL)"
            )
        if port is None:
            raise ValueError(
                f"{redact_url(part)!r} names no port: give each Sentinel's port, e.g. "
                f"sentinel://{parts.hostname}:26379 (kombu and Celery assume different ones)"
            )
        if parts.query or parts.fragment:
            raise ValueError(
                f"{redact_url(part)!r}: a sentinel:// URL takes no query options here; set them "
                "in celery.broker_transport_options or celery.result_backend_transport_options"
            )
        hosts.append((parts.hostname, port))
        part_db = _db(parts.path, part)
        part_user = unquote(parts.username) if parts.username else None
        part_password = unquote(parts.password) if parts.password else None
        if index == 0:
            db, username, password = part_db, part_user, part_password
            continue
        if part_db is not None and part_db != (db or 0):
            raise ValueError(
                f"{redact(url)!r}: kombu and Celery read the database from the first "
                f"sentinel:// URL only (here {db or 0}), and a later one names /{part_db}; put "
                f"/{part_db} on the first URL (or on every one)"
            )
        if (part_user, part_password) != (None, None) and (part_user, part_password) != (
            username,
            password,
        ):
            raise ValueError(
                f"{redact(url)!r}: kombu and Celery read the master's credentials from the "
                "first sentinel:// URL only, and a later one gives others; put them on the "
                "first URL (the Sentinels' own password is the sentinel_password option)"
            )
    return SentinelAddress(hosts, db or 0, username, password)


def is_sentinel(url: str | None) -> bool:
    """Whether `url` is a `sentinel://` URL (list)."""
    return url is not None and urlsplit(url.strip()).scheme.lower() == SENTINEL_SCHEME


def async_redis(
    url: str, transport_options: Mapping[str, Any], timeout: float
) -> redis.asyncio.Redis:
    """A redis.asyncio client of `url`; for a `sentinel://` URL, a client of the master named by
    the transport option `master_name`, found through the Sentinels (again after a failover),
    asked with the transport options' `sentinel_kwargs` and `min_other_sentinels` as kombu and
    Celery ask them. `timeout` bounds each connection attempt and each command (the Sentinels'
    too, unless `sentinel_kwargs` sets its own). No connection is made until the first command.
    """
    address = sentinel_address(url)
    if address is None:
        client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=timeout, socket_timeout=timeout
        )
        return client
    master_name = transport_options.get("master_name")
    if not master_name:  # refused by the options' validation; a clear error all the same
        raise ValueError(f"{redact(url)}: the 'master_name' transport option must be set")
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        address.sentinels,
        min_other_sentinels=int(transport_options.get("min_other_sentinels") or 0),
        sentinel_kwargs={
            "socket_connect_timeout": timeout,
            "socket_timeout": timeout,
            **dict(transport_options.get("sentinel_kwargs") or {}),
        },
    )
    master: redis.asyncio.Redis = sentinel.master_for(
        str(master_name),
        db=address.db,
        username=address.username,
        password=address.password,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
    )
    return master


async def close_async_redis(client: redis.asyncio.Redis) -> None:
    """Close a client of `async_redis`: its connections and, for a Sentinel-managed master,
    the connections to the Sentinels (which the master's client does not own)."""
    await client.aclose()
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()
