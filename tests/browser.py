"""Headless-browser tests: Debian's chromium (``/usr/bin/chromium``; ``scripts/services.sh start
chromium`` installs it) driven by Playwright, against the Django app that pytest-django's
``live_server`` serves on loopback from the test database.

A pytest plugin (listed in tests/conftest.py's ``pytest_plugins``) with one fixture,
``browser_page``: a fresh browser context (no cookies) per test, and a ``BrowserPage`` with the
Playwright ``page``, ``goto(path)``, ``login(user)`` and ``screenshot(name)``::

    @pytest.mark.browser
    @pytest.mark.urls("tests.prefs_urls")  # the URLconf the live server answers with
    def test_something(browser_page, django_user_model):
        user = django_user_model.objects.create_user("ann")
        browser_page.login(user)  # a real session, as after the login form
        page = browser_page.goto("/prefs/")
        page.get_by_label("News: E-mail").check()
        page.get_by_role("button", name="Save").click()
        browser_page.screenshot("after-save")  # var/.../artifacts/<test>-after-save.png

Screenshots go to ``<SITEMESSAGE_VAR_DIR>/artifacts/`` (``settings.VAR_DIR``); a test that fails
leaves ``<test>-failed.png`` there too. Tests using the fixture must carry the ``browser``
marker; they are skipped, with the reason, only when chromium is not installed.

While Playwright runs, an asyncio loop counts as running in the test's thread (Playwright's
sync API does that on purpose), so Django would refuse ORM calls from the test as "async
unsafe"; the fixture allows them (DJANGO_ALLOW_ASYNC_UNSAFE) for the test only, and starts and
stops Playwright per test so that no other test ever runs beside that loop. The live server
gets plain-http cookies (SESSION_COOKIE_SECURE and CSRF_COOKIE_SECURE off) for the test.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page, Response

#: Debian's chromium; Playwright's own browser downloads are not used.
CHROMIUM = "/usr/bin/chromium"
#: Headless in a container: no sandbox (root), no GPU, and nothing that phones home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Milliseconds a Playwright action or navigation may take before the test fails.
TIMEOUT_MS = 15_000

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


class BrowserPage:
    """One test's browser tab on the live server."""

    def __init__(self, page: Page, base_url: str, artifacts: Path, test_name: str) -> None:
        #: The Playwright page: locators, clicks, assertions.
        self.page = page
        #: The live server's root, ``http://localhost:<port>``.
        self.base_url = base_url
        self.artifacts = artifacts
        self.test_name = test_name

    def url(self, path: str) -> str:
        """The absolute URL of a path on the live server."""
        return self.base_url + path

    def goto(self, path: str) -> Page:
        """Opens a path of the live server; fails the test unless it answers 2xx or 3xx."""
        response: Response | None = self.page.goto(self.url(path))
        assert response is not None and response.status < 400, (
            f"GET {path} answered {response.status if response else 'nothing'}"
        )
        return self.page

    def login(self, user: Any) -> None:
        """Logs ``user`` in for the rest of the test: a real session, stored in the database,
        whose cookie the browser then sends (what the admin login form would leave behind)."""
        from django.conf import settings
        from django.test import Client

        client = Client()
        client.force_login(user)
        cookie = client.cookies[settings.SESSION_COOKIE_NAME]
        self.page.context.add_cookies(
            [{"name": cookie.key, "value": cookie.value, "url": self.base_url}]
        )

    def screenshot(self, name: str) -> Path:
        """Saves a full-page PNG as ``<artifacts>/<test>-<name>.png``; returns its path."""
        path = self.artifacts / f"{self.test_name}-{safe_name(name)}.png"
        self.page.screenshot(path=str(path), full_page=True)
        path.chmod(0o600)
        return path


def safe_name(text: str) -> str:
    """A file name part: letters, digits, dots, dashes and underscores only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:120] or "page"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keeps each phase's report on the test item, for the failure screenshot."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.fixture
def browser_page(
    request: pytest.FixtureRequest, live_server: Any, settings: Any, monkeypatch: Any
) -> Iterator[BrowserPage]:
    """A headless chromium tab on the live server (see the module docstring)."""
    if request.node.get_closest_marker("browser") is None:
        pytest.fail(f"{request.node.nodeid} uses browser_page without @pytest.mark.browser")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed (scripts/services.sh start chromium)")
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    settings.SESSION_COOKIE_SECURE = settings.CSRF_COOKIE_SECURE = False
    artifacts = Path(settings.VAR_DIR) / "artifacts"
    artifacts.mkdir(mode=0o700, parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context().new_page()
            page.set_default_timeout(TIMEOUT_MS)
            # Chromium asks every site for one; a 404 in each test's log would be noise.
            page.route("**/favicon.ico", lambda route: route.fulfill(status=204))
            tab = BrowserPage(page, live_server.url, artifacts, safe_name(request.node.name))
            yield tab
            call = request.node.stash.get(_REPORTS, {}).get("call")
            if call is not None and call.failed:
                tab.screenshot("failed")
        finally:
            browser.close()
