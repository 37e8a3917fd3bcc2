"""The jobs resource: submit, list, read, cancel, delete, and download the final model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from service.api.deps import JobDep, ManagerDep, Principal, PrincipalDep, SettingsDep, StoreDep
from service.api.models import JobCreate, JobPublic, JobsPublic
from service.api.routes.responses import errors
from service.engine.model_registry import check_model_name
from service.jobs.manager import JobManager, JobNotFoundError, JobStateError
from service.spec import JobSpec
from service.status import JobStatus
from service.store.limits import string_length
from service.store.models import IdempotencyKeyRow, JobRow

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["jobs"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=string_length(IdempotencyKeyRow.key),
        pattern=r"^[\x21-\x7e]+$",
        description="Any unique string (e.g. a UUID, printable ASCII without spaces): retrying the same "
        "submission with the same key returns the job created the first time instead of a second job.",
    ),
]


def job_public(job: JobRow, manager: JobManager, queue_position: int | None = None) -> JobPublic:
    """The public view of a job row."""
    has_model = job.status == JobStatus.SUCCEEDED.value and manager.model_file(job) is not None
    return JobPublic.from_row(job, queue_position=queue_position, has_model=has_model)


def _position(job: JobRow, manager: JobManager, principal: Principal) -> int | None:
    """The job's place among the queued jobs the principal can see (its own; an admin's: everyone's)."""
    if job.status != JobStatus.QUEUED.value:
        return None
    return manager.store.queue_positions(owner=principal.owner_filter()).get(job.id)


@router.post(
    "/jobs",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    summary="Submit a training job",
    responses={
        200: {"model": JobPublic, "description": "Replayed: the job created earlier with this Idempotency-Key."},
        **errors(401, 413, 422, 503),
    },
)
def submit_job(
    body: JobCreate,
    response: Response,
    manager: ManagerDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Queue a job. It starts when a slot and its CPUs/GPUs are free; jobs start in submission order.

    A spec that can never fit the cluster (more workers, CPUs or GPUs than it has), or that names a model the
    service cannot build (see GET /v1/models), is refused with 422.
    """
    spec = JobSpec.model_validate(body.model_dump())
    # Only names the registry lists can be built (422 with close matches), for data they can take (422 naming the
    # model's input channels and the data set's).
    check_model_name(spec.model, spec.dataset.sample_shape(), spec.dataset.kind)
    job, created = manager.submit(spec, idempotency_key=idempotency_key, owner=principal.name)
    if not created:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_public(job, manager, _position(job, manager, principal))


@router.get("/jobs", response_model=JobsPublic, summary="List jobs", responses=errors(401, 422))
def list_jobs(
    manager: ManagerDep,
    store: StoreDep,
    principal: PrincipalDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status", description="Only jobs in this state.")] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000, description="Jobs to skip (newest first).")] = 0,
    limit: Annotated[int, Query(ge=1, le=500, description="Jobs per page.")] = 50,
    study: Annotated[
        str | None, Query(max_length=64, description="Only the trials of this study (GET /v1/studies).")
    ] = None,
) -> JobsPublic:
    """One page of your jobs (an admin's: everyone's), newest first; `count` is the number of matching jobs over
    all pages."""
    rows, count = store.list_jobs(
        status=status_filter, offset=offset, limit=limit, owner=principal.owner_filter(), study=study
    )
    queued = any(r.status == JobStatus.QUEUED.value for r in rows)
    positions = store.queue_positions(owner=principal.owner_filter()) if queued else {}
    return JobsPublic(data=[job_public(row, manager, positions.get(row.id)) for row in rows], count=count)


@router.get("/jobs/{job_id}", response_model=JobPublic, summary="Read a job", responses=errors(401, 404, 422))
def read_job(job: JobDep, manager: ManagerDep, principal: PrincipalDep) -> JobPublic:
    """Status, timestamps, error reason and summary (epochs done, last/best validation accuracy, verdict)."""
    return job_public(job, manager, _position(job, manager, principal))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobPublic,
    summary="Cancel a job",
    responses={
        202: {"model": JobPublic, "description": "The run is still stopping; the job will end as cancelled."},
        **errors(401, 404, 409, 422),
    },
)
async def cancel_job(job: JobDep, manager: ManagerDep, settings: SettingsDep, response: Response) -> JobPublic:
    """Cancel a queued job, or stop a running one and free its workers.

    Answers 200 once the job is cancelled, or 202 if its run has not stopped within `cancel_wait_s`.
    Cancelling a job that already ended is a 409.
    """
    await run_in_threadpool(manager.cancel, job.id)
    deadline = time.monotonic() + settings.cancel_wait_s
    while True:
        latest = await run_in_threadpool(manager.store.get_job, job.id)
        if latest is None:
            raise JobNotFoundError(job.id)
        if JobStatus(latest.status).is_terminal or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.1)
    if not JobStatus(latest.status).is_terminal:
        response.status_code = status.HTTP_202_ACCEPTED
    return await run_in_threadpool(job_public, latest, manager)


@router.delete(
    "/jobs/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a finished job",
    responses=errors(401, 404, 409, 422),
)
def delete_job(job: JobDep, manager: ManagerDep) -> Response:
    """Remove a finished job with its metrics, statistics, logs and files. Queued or running jobs: 409."""
    manager.delete(job.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/jobs/{job_id}/model",
    response_class=FileResponse,
    summary="Download the final model",
    responses={
        200: {
            "description": "The final state dict (torch.save), with plain BatchNorm layers.",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        **errors(401, 404, 409, 422, non_json_route=True),
    },
)
def download_model(job: JobDep, manager: ManagerDep) -> Response:
    """The final model of a succeeded job: a plain torch state dict (SyncBatchNorm reverted to BatchNorm),
    loadable with `torch.load(path, weights_only=True)` into the same architecture built with nn.BatchNorm*d.
    Read from the run storage (`storage_uri`), where Ray Train put it.
    """
    if job.status != JobStatus.SUCCEEDED.value:
        raise JobStateError(f"job {job.id} is {job.status}: a model is available only once a job has succeeded.")
    found = manager.model_file(job)
    if found is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"job {job.id} succeeded but its model file is missing from the run storage.",
        )
    storage, path = found
    filename = f"{job.id}-model.pt"
    local = storage.local_file(path)
    if local is not None:
        return FileResponse(local, media_type="application/octet-stream", filename=filename)
    return StreamingResponse(
        _chunks(storage.open(path)),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _chunks(stream: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    """Read an object-store stream in chunks (iterated in a thread by Starlette), closing it at the end."""
    with stream:
        while chunk := stream.read(size):
            yield chunk
