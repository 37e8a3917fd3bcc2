"""Log lines of a job: the run's progress and errors, and the service's lifecycle notes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.api.deps import JobDep, StoreDep
from service.api.models import LogLine, LogsPublic
from service.api.routes.responses import errors
from service.store.limits import integer_range
from service.store.models import LogLineRow

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["logs"])


@router.get(
    "/jobs/{job_id}/logs", response_model=LogsPublic, summary="Read a job's log", responses=errors(401, 404, 422)
)
def read_logs(
    job: JobDep,
    store: StoreDep,
    after: Annotated[
        int, Query(ge=0, le=integer_range(LogLineRow.seq)[1], description="Only lines with seq > after (for polling).")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Most lines to return.")] = 1000,
) -> LogsPublic:
    """Lines oldest first; a failed job's last lines carry the worker's error (rank and message)."""
    lines = [LogLine.from_row(row) for row in store.logs(job.id, after=after, limit=limit)]
    return LogsPublic(data=lines, count=len(lines))
