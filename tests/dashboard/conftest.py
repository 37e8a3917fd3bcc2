"""Fixtures of the dashboard tests: a real headless Chromium driven by Playwright, and the session's local Ray.

The browser is Debian's `chromium` package (`/usr/bin/chromium`, or the path in `SYNCBN_CHROMIUM`), launched by
Playwright for Python; Playwright's own browser downloads are never used. Without chromium or Playwright the tests
are skipped with the reason and the command that installs them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard.browser import CHROMIUM_ARGS, PLAYWRIGHT_MISSING, BrowserPage
from tests.service.conftest import ray_cluster  # noqa: F401  (the session's real local Ray, shared with tests/service)

#: Debian's chromium (apt-get install -y chromium); override with SYNCBN_CHROMIUM.
CHROMIUM = Path(os.environ.get("SYNCBN_CHROMIUM", "/usr/bin/chromium"))
#: Screenshots of every test land here (gitignored), for people to look at after a run.
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """One headless Chromium for the dashboard tests (closed after the last of them)."""
    if not CHROMIUM.exists():
        pytest.skip(
            f"no chromium at {CHROMIUM}: install Debian's package with `apt-get install -y chromium` "
            "(or set SYNCBN_CHROMIUM to a Chromium binary)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """`open_page(url)` -> a BrowserPage in a fresh browser context (own sessionStorage); closed afterwards."""
    contexts = []

    def opener(url: str) -> BrowserPage:
        context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
        contexts.append(context)
        page = BrowserPage(context.new_page(), SCREENSHOTS, prefix=request.node.name)
        page.goto(url)
        return page

    yield opener
    for context in contexts:
        context.close()
