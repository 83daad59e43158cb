"""Whether a worker is connected to its broker, for logs and container health checks."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path

__all__ = ["ConnectionState"]

logger = logging.getLogger("taskbridge.worker")


class ConnectionState:
    """A worker's link to its broker: `connected`, since when, and why not.

    Every change is logged once (not once per failed attempt). With a `health_file`
    (`taskbridge worker ... --health-file PATH`), the file exists exactly while the worker is
    connected and holds `{"connected": true, "since": <epoch s>, "pid": ...}`: a container's
    health check is `test -f PATH`. It is removed on disconnection and when the worker exits.
    Safe to call from any thread.
    """

    def __init__(self, name: str, health_file: str | os.PathLike[str] | None = None) -> None:
        self.name = name
        self.health_file = None if health_file is None else Path(health_file)
        self.connected = False
        self.since = time.time()
        self.reason: str | None = "not connected yet"
        self._ever = False
        self._told = False
        self._lock = threading.Lock()
        self._remove_file()

    def up(self) -> None:
        """The worker reached its broker (again)."""
        with self._lock:
            if self.connected:
                return
            down_for = time.time() - self.since
            was_down, self._ever = self._ever, True
            self.connected, self.since, self.reason = True, time.time(), None
            self._write_file()
        if was_down:
            logger.warning("%s: reconnected to the broker after %.1fs", self.name, down_for)
        else:
            logger.info("%s: connected to the broker", self.name)

    def down(self, reason: str) -> None:
        """The worker lost its broker; it keeps trying to reconnect."""
        with self._lock:
            if not self.connected and self.reason == reason:
                return
            was_connected = self.connected
            never = not self._ever
            if was_connected:
                self.since = time.time()
            self.connected, self.reason = False, reason
            self._remove_file()
        if was_connected:
            logger.error("%s: lost the broker (%s); reconnecting", self.name, reason)
        elif never and not self._told:
            self._told = True
            logger.error("%s: cannot reach the broker (%s); retrying", self.name, reason)

    def close(self) -> None:
        """The worker is exiting: it is no longer a healthy worker."""
        with self._lock:
            self.connected, self.reason = False, "stopped"
            self._remove_file()

    def _write_file(self) -> None:
        if self.health_file is None:
            return
        payload = {"connected": True, "since": self.since, "pid": os.getpid(), "name": self.name}
        temporary = self.health_file.with_name(self.health_file.name + ".tmp")
        try:
            temporary.write_text(json.dumps(payload))
            temporary.replace(self.health_file)  # atomic: a reader never sees half a file
        except OSError as exc:
            logger.warning("cannot write the health file %s: %s", self.health_file, exc)

    def _remove_file(self) -> None:
        if self.health_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.health_file.unlink()
