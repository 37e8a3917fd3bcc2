"""Queue a study: admit each distinct trial like a job submission, then create the study and its trials at once.

One function for the REST route (`POST /v1/studies`) and for `syncbn study` on an embedded Ray, so both refuse the
same specs with the same sentences and queue the trials in the same order (seed by seed).
"""

from __future__ import annotations

import uuid

from service.engine.model_registry import check_model_name
from service.jobs.manager import JobCannotFitError, JobManager
from service.store.models import DEFAULT_OWNER, StudyRow
from service.study_spec import StudySpec

__all__ = ["submit_study"]


def submit_study(manager: JobManager, spec: StudySpec, owner: str = DEFAULT_OWNER) -> StudyRow:
    """Check every distinct trial against the cluster and queue the study's trials as jobs of `owner`.

    Raises:
        ValueError: the base names a model the service cannot build.
        JobCannotFitError: an arm could never fit the cluster, or reads data it may not (the message names the arm);
            nothing is queued then.
    """
    check_model_name(spec.base.model)
    trials = spec.trial_specs()
    labels = spec.labels()
    checked: set[str] = set()
    for arm, _, trial in trials:
        key = trial.model_dump_json(exclude={"seed", "name"})
        if key in checked:
            continue
        checked.add(key)
        try:
            manager.submit_check(trial)
        except JobCannotFitError as exc:
            raise JobCannotFitError(f"arms[{arm}] ({labels[arm]}): {exc}") from exc
    study, _ = manager.store.create_study(
        uuid.uuid4().hex,
        spec.model_dump(mode="json"),
        [(uuid.uuid4().hex, arm, seed, trial.model_dump(mode="json")) for arm, seed, trial in trials],
        owner=owner,
    )
    manager.wake()
    return study
