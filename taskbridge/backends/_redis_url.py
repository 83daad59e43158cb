"""Redis URLs of the shared in-process status store, read without redis-py (options are checked
at start-up whether or not it is installed).

`redis://` and `rediss://` (TLS) name one server. A Sentinel URL lists the Sentinels to ask,
separated by `;`, in the form kombu and Celery read:
`sentinel://[user:password@]host:26379/db;sentinel://host2:26379`; the database and the
master's credentials come from the first URL (a later one giving others is refused rather than
ignored), and the master's name from the `status_sentinel_master` option.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .._backends import redact_url

__all__ = ["SentinelAddress", "check_redis_url", "sentinel_address"]

_SCHEMES = ("redis", "rediss", "sentinel")


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    """A `sentinel://` URL taken apart: the Sentinels to ask, and how to use the master."""

    sentinels: list[tuple[str, int]]
    db: int
    username: str | None
    password: str | None


def check_redis_url(url: str) -> None:
    """ValueError, saying what is expected, unless `url` is a redis://, rediss:// or
    sentinel:// URL (list) this store can use."""
    scheme = urlsplit(url.split(";", 1)[0].strip()).scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"{redact_url(url)!r} is not a Redis URL: give redis://host:6379/0, rediss:// for "
            "TLS, or sentinel://host:26379/0;sentinel://host2:26379 for Redis Sentinel"
        )
    if scheme == "sentinel":
        sentinel_address(url)
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed for its ValueError
    except ValueError as exc:
        raise ValueError(f"{redact_url(url)!r} is not a valid URL ({exc})") from None
    if not parts.hostname:
        raise ValueError(f"{redact_url(url)!r} names no host: give redis://host:6379/0")


def sentinel_address(url: str) -> SentinelAddress | None:
    """Parse `sentinel://[user:password@]host:port[/db][;sentinel://host:port...]`; None for a
    URL of another scheme (ValueError for a malformed one)."""
    if urlsplit(url.split(";", 1)[0].strip()).scheme.lower() != "sentinel":
        return None
    hosts: list[tuple[str, int]] = []
    first: tuple[int, str | None, str | None] | None = None
    for raw in url.split(";"):
        part = raw.strip()
        try:
            parts = urlsplit(part)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{redact_url(part)!r} is not a valid URL ({exc})") from None
        if parts.scheme.lower() != "sentinel" or not parts.hostname or port is None:
            raise ValueError(
                f"{redact_url(part)!r} is not sentinel://host:port (each Sentinel of a list, "
                "separated by ';', with its port)"
            )
        hosts.append((parts.hostname, port))
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"{redact_url(part)!r}: the path must be a database number, e.g. /1")
        own = (
            int(path) if path else 0,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )
        if first is None:
            first = own
        elif (path and own[0] != first[0]) or (own[1:] != (None, None) and own[1:] != first[1:]):
            raise ValueError(
                f"{redact_url(part)!r}: the database and the master's credentials are read from "
                "the first sentinel:// URL only; give them there (or the same on every one)"
            )
    assert first is not None
    return SentinelAddress(hosts, *first)
