"""`bridge.dashboard()`: a page that lists task calls live, with each call's details, progress,
cancel and retry, served together with the JSON API it reads, so one router (and so one set of
dependencies) guards both."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import RedirectResponse

from ._router import HandleSource, build_router

__all__ = ["build_dashboard"]

API_PREFIX = "/api/tasks"
"""Where the page finds the tasks API, below the dashboard's own prefix."""

_MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
_STATIC = frozenset(_MEDIA_TYPES) - {"index.html"}

# The page runs only its own script and style (no inline code, nothing from elsewhere), and no
# other site may frame it: its buttons cancel and re-run calls.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "same-origin",
}


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str


@functools.cache
def _asset(name: str) -> _Asset:
    body = files("taskbridge").joinpath("dashboard", name).read_bytes()
    etag = f'"{hashlib.blake2b(body, digest_size=8).hexdigest()}"'
    return _Asset(body, _MEDIA_TYPES[name], etag)


def _serve(name: str, request: Request) -> Response:
    asset = _asset(name)
    # no-cache: browsers revalidate (a 304 when unchanged), so an upgrade is never half-applied
    headers = {"ETag": asset.etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if name == "index.html":
        headers |= _PAGE_HEADERS
    seen = request.headers.get("if-none-match", "")
    if asset.etag in (tag.strip().removeprefix("W/") for tag in seen.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


def build_dashboard(
    bridge: HandleSource, prefix: str = "/taskbridge", **router_options: Any
) -> APIRouter:
    """Build the dashboard router for `bridge` (see `TaskBridge.dashboard`).

    `{prefix}/` serves the page, `{prefix}/static/...` its script and style, and
    `{prefix}/api/tasks` the tasks API of `bridge.router()`, which the page finds relative to its
    own address (so it works below any mount point or `root_path`). The page and its files are
    left out of the OpenAPI schema, and so is this copy of the API: `bridge.router()` is the one
    documented. Keyword arguments go to APIRouter, e.g. `dependencies=[Depends(require_admin)]`.
    """
    router = APIRouter(prefix=prefix, **router_options)

    if prefix:
        last = prefix.rstrip("/").rsplit("/", 1)[-1]

        @router.get("", include_in_schema=False)
        async def dashboard_redirect(request: Request) -> RedirectResponse:
            # relative, so the browser keeps whatever mount point or root_path is in front
            query = request.url.query
            return RedirectResponse(f"{last}/?{query}" if query else f"{last}/")

    @router.get("/", include_in_schema=False)
    async def dashboard_page(request: Request) -> Response:
        return _serve("index.html", request)

    @router.get("/static/{name}", include_in_schema=False)
    async def dashboard_static(name: str, request: Request) -> Response:
        if name not in _STATIC:
            raise HTTPException(status_code=404, detail=f"no dashboard file {name!r}")
        return _serve(name, request)

    router.include_router(build_router(bridge, prefix=API_PREFIX), include_in_schema=False)
    return router
