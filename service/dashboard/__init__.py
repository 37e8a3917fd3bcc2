"""The dashboard: a single-page web app served by the service itself (`/` and `/ui/static/...`).

Plain HTML, CSS and JavaScript modules under `static/` (no build step, no CDN); charts use the vendored uPlot
library. The page reads the same public REST API as every other client, with the user's bearer token when the
service has API tokens. `mount_dashboard(app)` adds its two routes to a FastAPI app.
"""

from service.dashboard.mount import STATIC_DIR, STATIC_PATH, mount_dashboard

__all__ = ["STATIC_DIR", "STATIC_PATH", "mount_dashboard"]
