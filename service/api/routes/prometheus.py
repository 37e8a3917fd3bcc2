"""`GET /metrics`: the service's Prometheus metrics (see `service.api.prometheus`)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.routes.responses import errors

__all__ = ["router"]

router = APIRouter(tags=["monitoring"])


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={
        200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}},
        **errors(401, non_json_route=True),
    },
)
def prometheus_metrics(request: Request) -> Response:
    """Jobs by status, queue length, running jobs, records ingested, request latencies by route."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
