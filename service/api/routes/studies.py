"""The studies resource: submit a study (its trials are queued as ordinary jobs), list, read, cancel, follow.

No scheduling lives here or anywhere else for studies: the trials are jobs of the study's owner that the job
manager's queue runs like any other; a study's status and verdict are derived from them on every read.

`GET /v1/studies/{id}/events` (Server-Sent Events):
- `study` (no id): the study as `GET /v1/studies/{id}` answers it, when the stream opens and after every trial
  that ends (so the verdict's updates arrive as they happen);
- `trial`: a trial's status transition, `job_id, arm, seed` and the data of the job's own `status` event. Its id
  is the stream's cursor: the trials' status-event ids in trial order, joined by dots (e.g. `3.1.0.0`). It is
  derived from the jobs' stored event logs, so `Last-Event-ID` resumes exactly, across restarts of the service
  too; an id that does not fit the study (another study's, or trials deleted since) starts from the beginning.
The stream ends once every trial has ended (after the last `study` event).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent

from service.api.deps import ManagerDep, PrincipalDep, StoreDep
from service.api.models import StudiesPublic, StudyCreate, StudyPublic
from service.api.routes.responses import errors
from service.jobs.manager import JobStateError
from service.jobs.study_submission import submit_study as submit_study_trials
from service.status import JobStatus
from service.store import JobStore
from service.store.models import StudyRow
from service.store.study_results import read_study
from service.study_spec import StudySpec

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["studies"])

#: Seconds between two reads of the trials' status events while a study runs.
EVENTS_TICK_S = 1.0
#: Reconnection delay suggested to clients, in milliseconds.
RETRY_MS = 2000


def get_study(
    study_id: Annotated[str, Path(description="Study id, as returned by POST /v1/studies.", max_length=64)],
    store: StoreDep,
    principal: PrincipalDep,
) -> StudyRow:
    """The study named in the path; 404 when there is none or it belongs to another principal."""
    study = store.get_study(study_id)
    if study is None or not principal.may_see(study.owner):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no study with id {study_id!r}: list studies with GET /v1/studies."
        )
    return study


StudyDep = Annotated[StudyRow, Depends(get_study)]


@router.post(
    "/studies",
    status_code=status.HTTP_201_CREATED,
    response_model=StudyPublic,
    summary="Submit a study: paired runs of a job's arms over the same seeds",
    responses=errors(401, 413, 422, 503),
)
def submit_study(body: StudyCreate, response: Response, manager: ManagerDep, principal: PrincipalDep) -> StudyPublic:
    """Queue every trial of the study (each arm with each seed) as a job of yours, all at once.

    Each trial is admitted like a job submission: a spec that can never fit the cluster, or names a model the
    service cannot build, is refused with 422 (naming the arm) and nothing is queued.
    """
    spec = StudySpec.model_validate(body.model_dump(mode="json"))
    study = submit_study_trials(manager, spec, owner=principal.name)
    response.headers["Location"] = f"/v1/studies/{study.id}"
    return StudyPublic.from_state(read_study(manager.store, study))


@router.get("/studies", response_model=StudiesPublic, summary="List studies", responses=errors(401, 422))
def list_studies(
    store: StoreDep,
    principal: PrincipalDep,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000, description="Studies to skip (newest first).")] = 0,
    limit: Annotated[int, Query(ge=1, le=100, description="Studies per page.")] = 20,
) -> StudiesPublic:
    """One page of your studies (an admin's: everyone's), newest first, each with its status and verdict."""
    rows, count = store.list_studies(offset=offset, limit=limit, owner=principal.owner_filter())
    return StudiesPublic(data=[StudyPublic.from_state(read_study(store, row)) for row in rows], count=count)


@router.get("/studies/{study_id}", response_model=StudyPublic, summary="Read a study", responses=errors(401, 404, 422))
def read_one_study(study: StudyDep, store: StoreDep) -> StudyPublic:
    """The study's trials with their statuses, its derived status, and the verdict so far."""
    return StudyPublic.from_state(read_study(store, study))


@router.delete(
    "/studies/{study_id}",
    response_model=StudyPublic,
    summary="Cancel a study",
    responses=errors(401, 404, 422),
)
def cancel_study(study: StudyDep, store: StoreDep, manager: ManagerDep) -> StudyPublic:
    """Cancel the study's queued and running trials (through the jobs' own cancel); finished trials are kept with
    their results, and the study reads `cancelled` from now on (its verdict, if any, stays readable)."""
    store.mark_study_cancel_requested(study.id)
    for job in store.study_trials(study.id):
        if JobStatus(job.status).is_terminal:
            continue
        with contextlib.suppress(JobStateError, LookupError):  # it ended (or was deleted) meanwhile
            manager.cancel(job.id)
    latest = store.get_study(study.id) or study
    return StudyPublic.from_state(read_study(store, latest))


def _cursor(last_event_id: str | None, trials: int) -> list[int]:
    """The per-trial positions named by a `Last-Event-ID` (zeros when absent or not one of this study's ids)."""
    if last_event_id:
        parts = last_event_id.split(".")
        if len(parts) == trials and all(part.isdigit() for part in parts):
            return [int(part) for part in parts]
    return [0] * trials


@router.get(
    "/studies/{study_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a study live (Server-Sent Events)",
    responses=errors(401, 404, 422, non_json_route=True),
)
async def stream_study_events(
    study: StudyDep,
    store: StoreDep,
    manager: ManagerDep,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            max_length=2000,
            pattern=r"^[0-9.]*$",
            description="Resume after this event id (browsers send it when they reconnect).",
        ),
    ] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Trial transitions and the study (with its verdict) after each trial that ends; ends when all trials ended."""
    trials = await run_in_threadpool(store.study_trials, study.id)
    place = {job.id: index for index, job in enumerate(trials)}
    cursor = _cursor(last_event_id, len(trials))
    yield ServerSentEvent(comment=f"events of study {study.id}", retry=RETRY_MS)
    yield ServerSentEvent(event="study", data=await _study_data(store, study.id))
    while True:
        # Statuses first: a trial seen ended here has its final status event stored already (same transaction).
        latest = await run_in_threadpool(store.study_trials, study.id)
        finished = all(JobStatus(job.status).is_terminal for job in latest)
        rows = await run_in_threadpool(store.status_events, list(place))
        ended_now = False
        for row in rows:
            index = place[row.job_id]
            if row.seq <= cursor[index]:
                continue
            cursor[index] = row.seq
            job = trials[index]
            data = {"job_id": job.id, "arm": job.study_arm, "seed": job.study_seed, **row.data}
            yield ServerSentEvent(id=".".join(map(str, cursor)), event="trial", data=data)
            ended_now = ended_now or JobStatus(row.data.get("status", "queued")).is_terminal
        if ended_now:
            yield ServerSentEvent(event="study", data=await _study_data(store, study.id))
        if finished or manager.stopping:
            return  # shutting down: the client reconnects with Last-Event-ID
        await asyncio.sleep(EVENTS_TICK_S)


async def _study_data(store: JobStore, study_id: str) -> dict[str, Any]:
    """The study as GET /v1/studies/{id} answers it, as JSON data."""
    row = await run_in_threadpool(store.get_study, study_id)
    if row is None:
        return {}
    state = await run_in_threadpool(read_study, store, row)
    return StudyPublic.from_state(state).model_dump(mode="json")
