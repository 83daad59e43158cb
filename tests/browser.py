"""A real headless browser for tests: Debian's `chromium`, driven by Playwright for Python.

Playwright never downloads a browser here (`playwright install` is not used): it launches the
system's Chromium through `executable_path`. When `chromium` is not on PATH and this is a
Debian-like machine where we are root, it is installed with apt-get. Without a browser the tests
that need one are skipped, saying why; on CI (`CI=true`) they fail instead, so a CI machine
without one is noticed.

Use it from a test module with `from tests.browser import browser as browser, chromium as
chromium`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

APT_TIMEOUT = 900
"""Seconds one apt-get command may take (Chromium and its libraries are a large download)."""


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: browser tests must run on CI)", pytrace=False)
    pytest.skip(reason)


def _apt_get(apt: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        [apt, *arguments], env=env, capture_output=True, text=True, timeout=APT_TIMEOUT
    )


def install_chromium() -> tuple[str | None, str]:
    """Install Debian's `chromium` with apt-get when we can: its path, or None and why not."""
    apt = shutil.which("apt-get")
    if apt is None:
        return None, "`chromium` is not on PATH and there is no apt-get to install it"
    if os.geteuid() != 0:
        return None, "`chromium` is not on PATH; install it (`apt-get install chromium`) as root"
    install = ("install", "-y", "--no-install-recommends", "chromium")
    done = _apt_get(apt, *install)
    if done.returncode != 0:  # a stale or empty package list: read it, then try again
        _apt_get(apt, "update")
        done = _apt_get(apt, *install)
    found = shutil.which("chromium")
    if found is not None:
        return found, ""
    if done.returncode == 0:
        return None, "apt-get installed chromium, but `chromium` is still not on PATH"
    tail = (done.stdout + done.stderr).strip()[-400:]
    return None, f"apt-get could not install chromium (exit {done.returncode}): {tail}"


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of a Chromium to drive, found or installed once per test session."""
    found = shutil.which("chromium")
    if found is None:
        found, why = install_chromium()
        if found is None:
            _unavailable(f"no Chromium for the browser tests: {why}")
    assert found is not None
    return found


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    """A headless Chromium driven by Playwright, for one test module.

    Module-scoped rather than session-scoped: Playwright's sync API runs its own event loop,
    which must be gone before the suite's asyncio tests run on theirs.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (it is in the dev dependency group)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=["--disable-dev-shm-usage"],  # containers often give /dev/shm little room
        )
        try:
            yield launched
        finally:
            launched.close()
