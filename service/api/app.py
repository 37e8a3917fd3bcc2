"""`create_app(settings)`: the FastAPI application of the service, built from its settings and nothing else.

The lifespan opens the store, starts the job manager (which connects to Ray, takes the leader lease when it is
free and then recovers jobs left by a previous leader) and stops both on shutdown (the leader hands its lease
over; runs keep going). Routes live in `service.api.routes`, one module per resource.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool

from service.api.body_limit import BodySizeLimitMiddleware
from service.api.deps import require_token
from service.api.errors import register_error_handlers
from service.api.prometheus import RequestMetricsMiddleware, ServiceMetrics
from service.api.routes import (
    cluster,
    events,
    health,
    job_metrics,
    jobs,
    layers,
    logs,
    models,
    prometheus,
    studies,
    whoami,
)
from service.api.storable_text import reject_unstorable_parameters
from service.dashboard import mount_dashboard
from service.engine.model_registry import list_models
from service.jobs.manager import JobManager
from service.settings import Settings
from service.store import JobStore
from syncbn import __version__

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Submit distributed training jobs that use exact synchronized BatchNorm, follow them live, and read their
convergence metrics and per-layer BatchNorm statistics (including cross-worker skew).

All job routes live under `/v1`. When the service has API tokens, send `Authorization: Bearer <token>`: each
token stands for a principal who sees only its own jobs (another principal's job is a 404), admins see all.
Errors are JSON `{"detail": "<sentence>"}`: 404 unknown job, 409 wrong state, 422 invalid input, 503 while the
database or Ray does not answer (retry after `Retry-After` seconds; nothing was written).
"""


def create_app(settings: Settings) -> FastAPI:
    """Build the application; nothing starts until the server runs its lifespan."""
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = JobStore(settings.resolved_database_url(), stats_keep=settings.stats_keep)
        try:
            manager = JobManager(settings, store)  # a second replica on one SQLite file is refused here
        except BaseException:
            store.close()
            raise
        try:
            await run_in_threadpool(manager.start)
        except BaseException:
            manager.lease.release()
            store.close()
            raise
        # Read the model registry once now: it imports torch and the installed plugins, which would otherwise
        # make the first GET /v1/models (the dashboard's form) wait for them.
        entries = await run_in_threadpool(list_models)
        logger.info("models: %s", ", ".join(entry.name for entry in entries))
        app.state.store = store
        app.state.manager = manager
        metrics.bind(manager)
        logger.info("syncbn service ready (database %s)", store.engine.url.render_as_string(hide_password=True))
        try:
            yield
        finally:
            metrics.bind(None)
            await run_in_threadpool(manager.stop)
            store.close()

    app = FastAPI(
        title="syncbn",
        version=__version__,
        summary="Distributed training with exact synchronized BatchNorm, as a service.",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    register_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    secured = [Depends(require_token)]
    app.include_router(health.router)
    app.include_router(prometheus.router, dependencies=secured)
    # Parameters the database cannot store are refused before any route reads it (422 naming the parameter).
    guarded = [*secured, Depends(reject_unstorable_parameters)]
    for resource in (jobs, job_metrics, layers, logs, events, cluster, models, whoami, studies):
        app.include_router(resource.router, dependencies=guarded)
    mount_dashboard(app)  # the web page at / and its files under /ui/static (public; its data comes from /v1)
    return app
