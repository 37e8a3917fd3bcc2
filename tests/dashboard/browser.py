"""`BrowserPage`: a Playwright page with what the dashboard tests check on every page.

It collects uncaught script errors, console errors and Content-Security-Policy violations (a test ends with
`page.assert_clean()`), and saves screenshots under `artifacts/screenshots/` named after the test.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM_ARGS", "PLAYWRIGHT_MISSING", "BrowserPage"]

#: Headless, sandbox-free (containers), and quiet: no network calls of Chromium's own (no internet here).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: Why a dashboard test is skipped when Playwright for Python is not installed.
PLAYWRIGHT_MISSING = "Playwright for Python is missing: pip install -e '.[dev]' (its browsers are not needed)"

#: Console lines that report an HTTP error status the test provoked on purpose (401, 404, 409, 422).
_EXPECTED_HTTP_ERROR = re.compile(r"^Failed to load resource: the server responded with a status of (401|404|409|422)")


class BrowserPage:
    """A page plus the errors it logged; `shot(name)` saves a screenshot."""

    def __init__(self, page: Any, screenshots: Path, prefix: str) -> None:
        self.page = page
        self.screenshots = screenshots
        self.prefix = re.sub(r"[^\w.-]+", "_", prefix)
        self.errors: list[str] = []
        page.set_default_timeout(30_000)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("console", self._on_console)
        page.on("dialog", lambda dialog: dialog.accept())  # the delete buttons ask for confirmation

    def _on_console(self, message: Any) -> None:
        if message.type == "error" and not _EXPECTED_HTTP_ERROR.match(message.text):
            self.errors.append(f"console: {message.text}")

    def goto(self, url: str) -> None:
        self.page.goto(url, wait_until="load")

    def shot(self, name: str, *, full_page: bool = True, path: Path | None = None) -> Path:
        """Save a screenshot to artifacts/screenshots/<test>-<name>.png (or `path`)."""
        target = path or self.screenshots / f"{self.prefix}-{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(target), full_page=full_page)
        return target

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()

    def attribute(self, selector: str, name: str) -> str | None:
        return self.page.locator(selector).get_attribute(name)

    def assert_clean(self) -> None:
        """No uncaught script error, no console error, no CSP violation happened on this page."""
        assert not self.errors, "the page logged errors:\n" + "\n".join(self.errors)
