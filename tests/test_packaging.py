"""What resolvers install: the Celery plugin alone gets the newest Celery; with the ARQ plugin
too, arq's own `redis<6` leads both pip and uv to Celery 5.6 (kombu 5.7 needs redis-py >= 6.4)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _index_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _index_reachable(), reason="the package index is unreachable")


def _versions(report: dict[str, object]) -> dict[str, str]:
    installs = report["install"]
    assert isinstance(installs, list)
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in installs}


def _pip(venv: Path, *targets: str) -> dict[str, str]:
    report = venv / "report.json"
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run(
        [*pip, "install", "--dry-run", "-q", "--report", str(report), *targets],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return _versions(json.loads(report.read_text()))


def _uv(venv: Path, *targets: str) -> dict[str, str]:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    out = subprocess.run(
        [uv, "pip", "install", "--dry-run", "--python", str(venv / "bin" / "python"), *targets],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    found: dict[str, str] = {}
    for line in (out.stdout + out.stderr).splitlines():
        name, sep, version = line.strip().lstrip("+ ").partition("==")
        if sep:
            found[name] = version
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resolve") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    # pip as users have it today: old resolvers backtrack into sdists of ancient kombu releases
    pip = [str(path / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True, capture_output=True)
    return path


@pytest.mark.parametrize("resolver", [_pip, _uv], ids=["pip", "uv"])
def test_plugins_resolve_to_the_celery_line_their_redis_py_allows(venv: Path, resolver) -> None:  # type: ignore[no-untyped-def]
    alone = resolver(venv, ".", "./backends/celery")
    assert alone["celery"].startswith("5.") and tuple(map(int, alone["celery"].split(".")[:2])) >= (
        5,
        7,
    )
    assert tuple(map(int, alone["redis"].split(".")[:2])) >= (6, 4)
    both = resolver(venv, ".", "./backends/celery", "./backends/arq")
    assert both["celery"].startswith(("5.5.", "5.6.")) and both["kombu"].startswith(
        ("5.5.", "5.6.")
    )
    assert int(both["redis"].split(".")[0]) == 5
    assert both["arq"].startswith("0.")
