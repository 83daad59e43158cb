"""The dashboard in a real browser: Chromium driven by Playwright, against a real uvicorn server
on a free port, with in-process tasks that the test steps through from its own thread. What the
page shows is checked as it changes, with Playwright's waiting assertions (no fixed sleeps): a
dispatched call is listed, its progress moves in the detail pane as the task reports it (pushed
by the events stream, without a reload), the Cancel button cancels a running call (and shows
the API's refusal when it cannot), and the Retry button runs a failed call again as a new call
linked to the old one.

`TASKBRIDGE_DASHBOARD_SCREENSHOT=docs/dashboard.png uv run pytest tests/test_dashboard_browser.py`
also saves the README's picture of the page (1280x800).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx2 as httpx
import pytest
import uvicorn
from fastapi import FastAPI

from conftest import wait_until
from taskbridge import Task, TaskBridge, report_progress
from tests.browser import APT_TIMEOUT
from tests.browser import browser as browser
from tests.browser import chromium as chromium

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

pytestmark = pytest.mark.timeout(APT_TIMEOUT + 60)  # the first run may install Chromium

SCREENSHOT_ENV = "TASKBRIDGE_DASHBOARD_SCREENSHOT"


class CardDeclinedError(Exception):
    """What the payment task raises the first time it charges an order."""


class Gate:
    """Lets a task running on the server's loop go on one step at a time, from the test's
    thread (asyncio objects are not thread-safe: every release goes through the loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._steps = asyncio.Semaphore(0)

    async def step(self) -> None:
        await self._steps.acquire()

    def allow(self, steps: int = 1) -> None:
        for _ in range(steps):
            self.loop.call_soon_threadsafe(self._steps.release)


@dataclass
class Site:
    """The app under test, served by uvicorn on its own thread and event loop."""

    url: str
    loop: asyncio.AbstractEventLoop
    bridge: TaskBridge
    tasks: dict[str, Task[..., Any]]
    gates: dict[str, Gate] = field(default_factory=dict)
    blocks: dict[str, threading.Event] = field(default_factory=dict)
    delayed: list[str] = field(default_factory=list)

    @property
    def dashboard(self) -> str:
        return f"{self.url}/taskbridge/"

    def gate(self, key: str) -> Gate:
        self.gates[key] = Gate(self.loop)
        return self.gates[key]

    def block(self, key: str) -> threading.Event:
        self.blocks[key] = threading.Event()
        return self.blocks[key]

    def dispatch(self, name: str, *args: Any, delay: float | None = None) -> str:
        """Enqueue a call on the server's loop (as an endpoint would); its id."""
        task = self.tasks[name] if delay is None else self.tasks[name].using(delay=delay)
        handle = asyncio.run_coroutine_threadsafe(task.enqueue(*args), self.loop).result(10)
        if delay is not None:
            self.delayed.append(handle.id)
        return handle.id

    def state(self, task_id: str) -> str:
        status = asyncio.run_coroutine_threadsafe(self.bridge.handle(task_id).info(), self.loop)
        return status.result(10).state

    def api(self, method: str, path: str) -> Any:
        answer = httpx.request(method, f"{self.url}/taskbridge/api/tasks{path}", timeout=10)
        answer.raise_for_status()
        return answer.json()


def _app(site_gates: dict[str, Gate], blocks: dict[str, threading.Event]) -> FastAPI:
    bridge = TaskBridge({"default_backend": "inprocess"})
    declined: set[str] = set()

    @bridge.task(name="reports.render")
    async def render_report(key: str, pages: int = 4) -> dict[str, Any]:
        """Reports its progress page by page; each page waits for the test to allow it."""
        report_progress(0.0, "starting")
        for page in range(1, pages + 1):
            await site_gates[key].step()
            report_progress(page / pages, f"page {page} of {pages}")
        return {"report": key, "pages": pages}

    @bridge.task(name="billing.charge")
    def charge_card(order: str, cents: int) -> dict[str, Any]:
        """Declined the first time an order is charged, accepted when run again."""
        if order not in declined:
            declined.add(order)
            raise CardDeclinedError(f"card declined for {order}")
        return {"order": order, "charged": cents}

    @bridge.task(name="mail.sync_inbox")
    async def sync_inbox(key: str) -> None:
        """Waits until the test lets it go (or cancels it)."""
        await site_gates[key].step()

    @bridge.task(name="exports.csv")
    def export_csv(key: str) -> str:
        """A `def` task: once running in the API process it cannot be interrupted."""
        blocks[key].wait(30)
        return f"{key}.csv"

    @bridge.task(name="mail.send_welcome")
    def send_welcome(email: str) -> None:
        """Done at once."""

    @bridge.task(name="mail.newsletter")
    def send_newsletter(issue: int) -> None:
        """Dispatched with a delay: stays queued."""

    app = FastAPI(lifespan=bridge.lifespan)
    app.include_router(bridge.dashboard())
    app.state.bridge = bridge
    return app


@pytest.fixture
def site() -> Iterator[Site]:
    """A fresh app (empty call store) served on a free port for each test."""
    gates: dict[str, Gate] = {}
    blocks: dict[str, threading.Event] = {}
    app = _app(gates, blocks)
    bridge: TaskBridge = app.state.bridge
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),))
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 10, "the server to start")
    assert server.started, "the server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    site = Site(f"http://127.0.0.1:{port}", loop, bridge, dict(bridge.tasks), gates, blocks)
    try:
        yield site
    finally:
        # the shutdown waits for running calls: let every one of them end first
        for task_id in site.delayed:
            asyncio.run_coroutine_threadsafe(bridge.handle(task_id).cancel(), loop).result(10)
        for gate in gates.values():
            gate.allow(100)
        for block in blocks.values():
            block.set()
        server.should_exit = True
        thread.join(30)
        loop.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A 1280x800 page; the test fails on any script error or refused resource (CSP)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=10_000)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"script error: {error}"))

    def console(message: Any) -> None:
        # a refused cancel or retry (409) is an answer the page shows, not a problem
        if message.type == "error" and "status of 409" not in message.text:
            problems.append(f"console: {message.text}")

    opened.on("console", console)
    try:
        yield opened
    finally:
        context.close()
    assert problems == []


def _row(page: Page, task_id: str) -> Locator:
    return page.locator(f'[data-testid="task-row"][data-id="{task_id}"]')


def _detail(page: Page, name: str) -> Locator:
    return page.get_by_test_id("detail").get_by_test_id(name)


def test_a_call_is_listed_and_its_progress_moves_live(site: Site, page: Page) -> None:
    from playwright.sync_api import expect

    gate = site.gate("weekly")
    task_id = site.dispatch("reports.render", "weekly")
    page.goto(site.dashboard)
    page.evaluate("window.notReloaded = true")
    row = _row(page, task_id)
    expect(row).to_be_visible()
    expect(row.get_by_test_id("row-open")).to_have_text("reports.render")
    expect(row.get_by_test_id("row-state")).to_have_text("running")
    expect(page.get_by_test_id("count-running")).to_have_text("1")

    row.click()
    expect(_detail(page, "detail-id")).to_have_text(task_id)
    expect(_detail(page, "detail-state")).to_have_text("running")
    expect(_detail(page, "detail-progress-text")).to_have_text("0%")
    expect(_detail(page, "detail-progress-message")).to_have_text("starting")
    expect(_detail(page, "detail-live")).to_be_visible()  # the events stream is open
    expect(_detail(page, "cancel")).to_be_visible()
    expect(_detail(page, "retry")).to_be_hidden()

    gate.allow(1)
    expect(_detail(page, "detail-progress-text")).to_have_text("25%")
    expect(_detail(page, "detail-progress-message")).to_have_text("page 1 of 4")
    expect(_detail(page, "detail-progress")).to_have_attribute("aria-valuenow", "25")
    gate.allow(2)
    expect(_detail(page, "detail-progress-text")).to_have_text("75%")
    expect(_detail(page, "detail-progress-message")).to_have_text("page 3 of 4")
    expect(_detail(page, "detail-progress")).to_have_attribute("aria-valuenow", "75")
    expect(row.locator(".pct")).to_have_text("75%")  # the list follows too

    gate.allow(1)
    expect(_detail(page, "detail-state")).to_have_text("succeeded")
    expect(_detail(page, "detail-progress-text")).to_have_text("100%")
    expect(_detail(page, "detail-live")).to_be_hidden()  # closed at the final state
    result = _detail(page, "detail-result")
    expect(result).not_to_have_class(re.compile(r"\bnone\b"))
    assert json.loads(result.inner_text()) == {"report": "weekly", "pages": 4}
    expect(_detail(page, "cancel")).to_be_hidden()
    expect(row.get_by_test_id("row-state")).to_have_text("succeeded")
    expect(page.get_by_test_id("count-succeeded")).to_have_text("1")
    assert page.evaluate("window.notReloaded") is True
    assert f"call={task_id}" in page.url  # a reload shows the same call


def test_the_cancel_button_cancels_a_running_call(site: Site, page: Page) -> None:
    from playwright.sync_api import expect

    site.gate("inbox")
    task_id = site.dispatch("mail.sync_inbox", "inbox")
    page.goto(site.dashboard)
    _row(page, task_id).click()
    expect(_detail(page, "detail-state")).to_have_text("running")

    _detail(page, "cancel").click()
    expect(_detail(page, "detail-state")).to_have_text("cancelled")
    expect(_detail(page, "detail-message")).to_contain_text("Cancelled")
    expect(_detail(page, "cancel")).to_be_hidden()
    expect(_detail(page, "retry")).to_be_visible()  # a cancelled call can run again
    expect(_row(page, task_id).get_by_test_id("row-state")).to_have_text("cancelled")
    expect(page.get_by_test_id("count-cancelled")).to_have_text("1")
    assert site.state(task_id) == "cancelled"


def test_a_call_that_cannot_be_cancelled_shows_why(site: Site, page: Page) -> None:
    from playwright.sync_api import expect

    block = site.block("ledger")
    task_id = site.dispatch("exports.csv", "ledger")
    page.goto(f"{site.dashboard}?call={task_id}")  # opened from its address
    expect(_detail(page, "detail-state")).to_have_text("running")

    _detail(page, "cancel").click()
    message = _detail(page, "detail-message")
    expect(message).to_have_text(re.compile(r"^Not cancelled: .*cannot be interrupted"))
    expect(message).to_have_class(re.compile(r"\berror\b"))
    expect(_detail(page, "detail-state")).to_have_text("running")

    block.set()
    expect(_detail(page, "detail-state")).to_have_text("succeeded")
    expect(_detail(page, "detail-result")).to_have_text('"ledger.csv"')


def test_the_retry_button_runs_a_failed_call_again(site: Site, page: Page) -> None:
    from playwright.sync_api import expect

    failed = site.dispatch("billing.charge", "order-1041", 4200)
    wait_until(lambda: site.state(failed) == "failed", 10, "the charge to fail")
    page.goto(site.dashboard)
    _row(page, failed).get_by_test_id("row-open").click()
    expect(_detail(page, "detail-state")).to_have_text("failed")
    expect(_detail(page, "detail-error")).to_be_visible()
    expect(_detail(page, "detail-error-type")).to_contain_text("CardDeclinedError")
    expect(_detail(page, "detail-error-message")).to_have_text("card declined for order-1041")
    expect(_detail(page, "detail-traceback")).to_contain_text("raise CardDeclinedError")
    assert json.loads(_detail(page, "detail-args").inner_text()) == ["order-1041", 4200]
    expect(_detail(page, "cancel")).to_be_hidden()

    _detail(page, "retry").click()
    new_link = _detail(page, "retry-new-call")
    expect(new_link).to_be_visible()
    again = new_link.inner_text()
    assert again and again != failed
    expect(_detail(page, "detail-message")).to_contain_text(f"Started again as call {again}")
    retried = _row(page, again)
    expect(retried).to_be_visible()  # listed, marked as a re-run of the failed call
    expect(retried.locator(".retry-mark")).to_have_attribute("title", f"re-run of {failed}")

    new_link.click()
    expect(_detail(page, "detail-id")).to_have_text(again)
    expect(_detail(page, "detail-retry-of-link")).to_have_text(failed)
    expect(_detail(page, "detail-state")).to_have_text("succeeded")  # accepted this time
    assert json.loads(_detail(page, "detail-result").inner_text()) == {
        "order": "order-1041",
        "charged": 4200,
    }
    expect(_row(page, again)).to_have_attribute("aria-current", "true")

    _detail(page, "detail-retry-of-link").click()  # back to the call it re-ran
    expect(_detail(page, "detail-id")).to_have_text(failed)
    expect(_detail(page, "detail-state")).to_have_text("failed")


def test_counts_filters_and_more_pages(site: Site, page: Page) -> None:
    from playwright.sync_api import expect

    welcomes = [site.dispatch("mail.send_welcome", f"user{n}@example.com") for n in range(53)]
    declined = site.dispatch("billing.charge", "order-7", 990)
    site.dispatch("mail.newsletter", 12, delay=3600)
    wait_until(lambda: site.state(declined) == "failed", 10, "the charge to fail")
    page.goto(site.dashboard)
    expect(page.get_by_test_id("count-all")).to_have_text("55")
    expect(page.get_by_test_id("count-succeeded")).to_have_text("53")
    expect(page.get_by_test_id("count-failed")).to_have_text("1")
    expect(page.get_by_test_id("count-queued")).to_have_text("1")
    mail = page.locator('[data-testid="task-stats-row"][data-task="mail.send_welcome"]')
    expect(mail.locator('[data-state="succeeded"]')).to_have_text("53")
    rows = page.get_by_test_id("task-row")
    expect(rows).to_have_count(50)  # one page, newest first

    page.get_by_test_id("load-more").click()
    expect(rows).to_have_count(55)
    expect(page.get_by_test_id("load-more")).to_be_hidden()
    expect(_row(page, welcomes[0])).to_be_visible()  # the oldest, from the second page

    page.get_by_test_id("state-count-failed").click()
    expect(page.get_by_test_id("state-count-failed")).to_have_attribute("aria-pressed", "true")
    expect(rows).to_have_count(1)
    expect(_row(page, declined)).to_be_visible()
    expect(page.get_by_test_id("filter-state")).to_have_value("failed")
    assert "state=failed" in page.url

    page.get_by_test_id("filter-clear").click()
    page.get_by_test_id("filter-task").select_option("mail.newsletter")
    expect(rows).to_have_count(1)
    expect(rows.first.get_by_test_id("row-state")).to_have_text("queued")

    mail.get_by_role("button", name="mail.send_welcome").click()  # the per-task table filters
    expect(page.get_by_test_id("filter-task")).to_have_value("mail.send_welcome")
    expect(rows).to_have_count(50)
    page.get_by_test_id("filter-backend").select_option("inprocess")
    expect(rows).to_have_count(50)
    expect(page.get_by_test_id("load-more")).to_be_visible()


def test_the_picture_of_the_dashboard(site: Site, page: Page) -> None:
    """A realistic mix of calls with one detail open; saved when SCREENSHOT_ENV names a file."""
    from playwright.sync_api import expect

    for email in ("ada@example.com", "grace@example.com", "linus@example.com"):
        site.dispatch("mail.send_welcome", email)
    paid = site.dispatch("billing.charge", "order-1042", 1999)
    declined = site.dispatch("billing.charge", "order-1041", 4200)
    wait_until(lambda: site.state(paid) == "failed", 10, "the charge to fail")
    site.api("POST", f"/{paid}/retry")
    site.gate("support")
    cancelled = site.dispatch("mail.sync_inbox", "support")
    site.api("DELETE", f"/{cancelled}")
    site.dispatch("mail.newsletter", 48, delay=3600)
    gate = site.gate("monthly")
    report = site.dispatch("reports.render", "monthly", 8)
    gate.allow(3)
    wait_until(lambda: site.state(declined) == "failed", 10, "the charge to fail")

    page.goto(f"{site.dashboard}?call={report}")
    expect(page.get_by_test_id("task-row")).to_have_count(9)
    expect(page.get_by_test_id("count-all")).to_have_text("9")
    expect(_detail(page, "detail-progress-text")).to_have_text("38%")
    expect(page.get_by_test_id("updated")).to_contain_text("updated")
    target = os.environ.get(SCREENSHOT_ENV)
    if target:
        page.screenshot(path=target)
