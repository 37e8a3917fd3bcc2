"""The convergence metrics of a job: step points and epoch points."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.api.deps import JobDep, StoreDep
from service.api.models import MetricsPublic
from service.api.routes.responses import errors
from service.store.limits import integer_range
from service.store.models import StepPointRow

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["metrics"])


@router.get(
    "/jobs/{job_id}/metrics",
    response_model=MetricsPublic,
    summary="Read a job's convergence metrics",
    responses=errors(401, 404, 422),
)
def read_metrics(
    job: JobDep,
    store: StoreDep,
    since_step: Annotated[
        int | None,
        Query(
            ge=-1,
            le=integer_range(StepPointRow.step)[1],
            description="Only points after this step (poll with the last step you have).",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100_000, description="Most points of each kind to return.")] = 10_000,
) -> MetricsPublic:
    """Per reported step: train loss, learning rate, samples/s, step time. Per epoch: train and validation
    loss and accuracy. Available while the job runs and after it ended."""
    steps, epochs = store.metrics(job.id, since_step=since_step, limit=limit)
    return MetricsPublic.from_rows(job.id, steps, epochs)
