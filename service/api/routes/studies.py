"""The studies resource: submit a study (its trials are queued as ordinary jobs), list, read, cancel.

No scheduling lives here or anywhere else for studies: the trials are jobs of the study's owner that the job
manager's queue runs like any other; a study's status and verdict are derived from them on every read.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status

from service.api.deps import ManagerDep, PrincipalDep, StoreDep
from service.api.models import StudiesPublic, StudyCreate, StudyPublic
from service.api.routes.responses import errors
from service.engine.model_registry import check_model_name
from service.jobs.manager import JobCannotFitError, JobStateError
from service.status import JobStatus
from service.store.models import StudyRow
from service.store.study_results import read_study
from service.study_spec import StudySpec

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["studies"])


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
    check_model_name(spec.base.model)
    trials = spec.trial_specs()
    checked: set[str] = set()
    labels = spec.labels()
    for arm, _, trial in trials:
        key = trial.model_dump_json(exclude={"seed", "name"})
        if key in checked:
            continue
        checked.add(key)
        try:
            manager.submit_check(trial)
        except JobCannotFitError as exc:
            raise JobCannotFitError(f"arms[{arm}] ({labels[arm]}): {exc}") from exc
    study_id = uuid.uuid4().hex
    study, _ = manager.store.create_study(
        study_id,
        spec.model_dump(mode="json"),
        [(uuid.uuid4().hex, arm, seed, trial.model_dump(mode="json")) for arm, seed, trial in trials],
        owner=principal.name,
    )
    manager.wake()
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
