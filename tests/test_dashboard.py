"""The dashboard router over HTTP: the page and its files, the API it reads below it, the same
dependencies guarding all of it, nothing in /docs, and the files in the wheel.

What the page does in a browser is `test_dashboard_browser.py`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.testclient import TestClient

from taskbridge import TaskBridge, Tasks

ROOT = Path(__file__).resolve().parent.parent
PAGE_FILES = ("index.html", "app.js", "app.css")


def _app(**options: Any) -> tuple[FastAPI, TaskBridge]:
    bridge = TaskBridge({"default_backend": "inprocess"})

    @bridge.task
    def double(n: int) -> int:
        return n * 2

    app = FastAPI(lifespan=bridge.lifespan)
    app.include_router(bridge.dashboard(**options))

    @app.post("/double/{n}")
    async def dispatch(n: int, tasks: Tasks) -> str:
        return tasks.add_task(double, n).id

    return app, bridge


@pytest.fixture
def client() -> Iterator[TestClient]:
    app, _ = _app()
    with TestClient(app) as client:
        yield client


def test_the_page_is_served_with_a_strict_content_security_policy(client: TestClient) -> None:
    page = client.get("/taskbridge/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    # everything the page loads is relative to it, so any mount point works
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(assets) == ["data:,", "static/app.css", "static/app.js"]


def test_the_address_without_a_slash_redirects_relative_to_itself(client: TestClient) -> None:
    answer = client.get("/taskbridge", follow_redirects=False)
    assert answer.status_code == 307
    assert answer.headers["location"] == "taskbridge/"  # keeps any root_path in front
    assert client.get("/taskbridge").text == client.get("/taskbridge/").text
    linked = client.get("/taskbridge?call=abc&state=failed", follow_redirects=False)
    assert linked.headers["location"] == "taskbridge/?call=abc&state=failed"


@pytest.mark.parametrize(
    ("name", "media_type"),
    [("app.js", "text/javascript; charset=utf-8"), ("app.css", "text/css; charset=utf-8")],
)
def test_static_files_have_their_media_type_and_revalidate(
    client: TestClient, name: str, media_type: str
) -> None:
    answer = client.get(f"/taskbridge/static/{name}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == media_type
    assert answer.content == files("taskbridge").joinpath("dashboard", name).read_bytes()
    assert answer.headers["cache-control"] == "no-cache"
    etag = answer.headers["etag"]
    again = client.get(f"/taskbridge/static/{name}", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    other = client.get(f"/taskbridge/static/{name}", headers={"If-None-Match": '"other"'})
    assert other.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "index.html",
        "missing.js",
        "..%2F_dashboard.py",
        "%2E%2E%2F%2E%2E%2Fpyproject.toml",
        "../_bridge.py",
        "dashboard/app.js",
    ],
)
def test_only_the_known_files_are_served(client: TestClient, path: str) -> None:
    assert client.get(f"/taskbridge/static/{path}").status_code == 404


def test_the_api_the_page_reads_is_mounted_below_it(client: TestClient) -> None:
    task_id = client.post("/double/21").json()
    status = client.get(f"/taskbridge/api/tasks/{task_id}").json()
    assert (status["state"], status["result"]) == ("succeeded", 42)
    page = client.get("/taskbridge/api/tasks", params={"state": "succeeded"}).json()
    assert [item["id"] for item in page["items"]] == [task_id]
    stats = client.get("/taskbridge/api/tasks/stats").json()
    assert stats["total"] == 1 and stats["states"]["succeeded"] == 1
    assert client.get("/taskbridge/api/tasks/nope").status_code == 404
    # the dashboard alone does not add the documented `/tasks` API
    assert client.get(f"/tasks/{task_id}").status_code == 404


def test_nothing_of_the_dashboard_is_in_the_openapi_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert list(paths) == ["/double/{n}"]


def test_another_prefix_moves_the_page_its_files_and_its_api() -> None:
    app, _ = _app(prefix="/admin/calls")
    with TestClient(app) as client:
        assert client.get("/admin/calls/").status_code == 200
        assert client.get("/admin/calls/static/app.js").status_code == 200
        assert client.get("/admin/calls", follow_redirects=False).headers["location"] == "calls/"
        task_id = client.post("/double/1").json()
        assert client.get(f"/admin/calls/api/tasks/{task_id}").status_code == 200
        assert client.get("/taskbridge/").status_code == 404


def test_the_page_works_behind_a_root_path() -> None:
    app, _ = _app()
    with TestClient(app, root_path="/behind/proxy") as client:
        answer = client.get("/behind/proxy/taskbridge", follow_redirects=False)
        assert answer.headers["location"] == "taskbridge/"
        assert client.get("/behind/proxy/taskbridge/static/app.css").status_code == 200


def require_admin(x_admin: str | None = Header(default=None)) -> None:
    if x_admin != "yes":
        raise HTTPException(status_code=401, detail="admins only")


def test_dependencies_guard_the_page_its_files_and_every_api_route() -> None:
    app, _ = _app(dependencies=[Depends(require_admin)])
    with TestClient(app) as client:
        task_id = client.post("/double/2").json()
        routes = [
            ("GET", "/taskbridge"),
            ("GET", "/taskbridge/"),
            ("GET", "/taskbridge/static/app.js"),
            ("GET", "/taskbridge/static/app.css"),
            ("GET", "/taskbridge/api/tasks"),
            ("GET", "/taskbridge/api/tasks/stats"),
            ("GET", f"/taskbridge/api/tasks/{task_id}"),
            ("GET", f"/taskbridge/api/tasks/{task_id}/events"),
            ("DELETE", f"/taskbridge/api/tasks/{task_id}"),
            ("POST", f"/taskbridge/api/tasks/{task_id}/retry"),
        ]
        for method, path in routes:
            refused = client.request(method, path, follow_redirects=False)
            assert (refused.status_code, refused.json()) == (401, {"detail": "admins only"}), path
        admitted = {"X-Admin": "yes"}
        assert client.get("/taskbridge/", headers=admitted).status_code == 200
        assert client.get("/taskbridge/static/app.js", headers=admitted).status_code == 200
        status = client.get(f"/taskbridge/api/tasks/{task_id}", headers=admitted).json()
        assert status["result"] == 4


def test_the_page_has_no_inline_code_and_never_writes_data_as_markup() -> None:
    folder = files("taskbridge").joinpath("dashboard")
    page = folder.joinpath("index.html").read_text()
    script = folder.joinpath("app.js").read_text()
    assert not re.search(r"\son[a-z]+\s*=", page), "inline event handlers break the CSP"
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "inline scripts break the CSP"
    assert not re.search(r"<style|\sstyle=", page), "inline styles break the CSP"
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, f"{sink} could turn data into markup or code"
    for name in PAGE_FILES:
        text = folder.joinpath(name).read_text()
        assert not re.search(r"https?://", text), f"{name} must load nothing from elsewhere"


def test_the_wheel_ships_the_page(tmp_path: Path) -> None:
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed: it builds the wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    built = subprocess.run(
        [uv, "build", "--wheel", "--out-dir", str(tmp_path), str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    if built.returncode != 0 and "hatchling" in built.stderr and "fetch" in built.stderr.lower():
        pytest.skip(f"the build backend cannot be fetched: {built.stderr.strip()[-300:]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("fastapi_taskbridge-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"taskbridge/dashboard/{name}" for name in PAGE_FILES} <= names
