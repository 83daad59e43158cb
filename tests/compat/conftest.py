"""Fixtures of the compatibility suite: each scenario runs in every `Way` (see ways.py)."""

from __future__ import annotations

import pytest

from tests.compat.ways import WAYS, Way


@pytest.fixture(
    params=[(name, False) for name in WAYS] + [(name, True) for name in WAYS],
    ids=[*WAYS, *(f"{name}-lifespan" for name in WAYS)],
)
def way(request: pytest.FixtureRequest) -> Way:
    """The way of this run of a scenario: native, plain or registered; a bare TestClient as
    upstream's tests use, or (ids ending in -lifespan) the bridge's lifespan, run by `with`."""
    name, lifespan = request.param
    return Way(name, lifespan)
