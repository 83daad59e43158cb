"""ConnectionState: a worker's link to its broker, mirrored to a health file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from taskbridge.backends import ConnectionState


def test_the_health_file_exists_exactly_while_connected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "healthy"
    path.write_text("stale from a previous run")
    caplog.set_level(logging.INFO, "taskbridge.worker")
    state = ConnectionState("worker x", path)
    assert not path.exists() and not state.connected

    state.down("connection refused")
    state.down("connection refused")  # logged once, not once per attempt
    state.up()
    assert state.connected and json.loads(path.read_text())["connected"] is True
    state.down("reset by peer")
    assert not path.exists() and state.reason == "reset by peer"
    state.up()
    assert path.exists()
    state.close()
    assert not path.exists()

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "worker x: cannot reach the broker (connection refused); retrying",
        "worker x: connected to the broker",
        "worker x: lost the broker (reset by peer); reconnecting",
        messages[3],
    ]
    assert messages[3].startswith("worker x: reconnected to the broker after ")


def test_without_a_file_it_only_tracks_the_state() -> None:
    state = ConnectionState("w")
    state.up()
    assert state.connected and state.health_file is None
