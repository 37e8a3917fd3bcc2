"""`mount_dashboard(app)`: serve the dashboard's page at `/` and its files under `/ui/static`.

The page and its files are public (they hold no data); every piece of data the page shows comes from the `/v1`
API, which keeps its own token check. The page is sent with a strict Content-Security-Policy: scripts, styles
and connections only from this origin, so nothing a job's name or log line contains can run as code even if it
slipped past the page's escaping.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["CONTENT_SECURITY_POLICY", "STATIC_DIR", "STATIC_PATH", "mount_dashboard"]

logger = logging.getLogger(__name__)

#: Folder holding index.html, the JavaScript modules, the stylesheet and the vendored chart library.
STATIC_DIR = Path(__file__).resolve().parent / "static"
#: URL prefix of the static files (index.html refers to them relative to the page, so a proxy prefix works).
STATIC_PATH = "/ui/static"

#: Only this origin's scripts, styles and connections; `data:` images for the inline favicon and chart exports.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page is tiny and must pick up a new app version at once; the files below it revalidate by ETag.
    "Cache-Control": "no-cache",
}


def mount_dashboard(app: FastAPI) -> None:
    """Add `GET /` (the page) and `/ui/static` (its files) to `app`, both left out of the OpenAPI schema.

    Raises:
        RuntimeError: the static folder is missing (an installation without the package data).
    """
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        raise RuntimeError(
            f"the dashboard's files are missing (expected {index}): reinstall the package so that "
            "service/dashboard/static is included."
        )

    @app.get("/", include_in_schema=False)
    def dashboard_page() -> FileResponse:
        """The dashboard's single page; its hash routes (#/jobs, #/jobs/<id>, ...) run in the browser."""
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="dashboard-static")
    logger.debug("dashboard mounted at / with files under %s", STATIC_PATH)
