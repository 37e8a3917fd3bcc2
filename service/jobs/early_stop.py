"""Early stopping of studies: once a study with `early_stop` has a settled verdict, its queued trials are cancelled.

The leader checks a study after one of its trials ends (and every study with queued trials after it takes the
lease, in case the previous leader stopped between the two steps below). Stopping is two steps, in this order:
1. `studies.stopped_early_at` is set in one transaction, only if the study is neither cancelled nor stopped already;
2. every trial still queued is cancelled (only if it is still queued: running ones finish, and count).
A study that was stopped early but still holds queued trials (the leader died between 1 and 2) gets step 2 again.
The study's status stays derived from its trials: `succeeded` once the running ones end, with the verdict's
sentence saying that it stopped early.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from service.status import JobStatus
from service.store.repository import JobStore
from service.store.study_results import study_verdict_of
from service.store.verdict import settled
from service.study_spec import StudySpec

__all__ = ["stop_study_if_settled"]

logger = logging.getLogger(__name__)


def stop_study_if_settled(store: JobStore, study_id: str) -> int:
    """Stop the study early if it asks for it and its verdict settled; return how many queued trials were cancelled.

    Only the leader calls this, from the thread that also launches queued jobs, so a trial cannot start between
    the check and its cancel; the cancel still applies only to a trial that is queued at that moment.
    """
    study = store.get_study(study_id)
    if study is None or study.cancel_requested:
        return 0
    try:
        spec = StudySpec.model_validate(study.spec)
    except ValidationError:
        return 0  # a spec this version cannot read: nothing to decide with
    if not spec.early_stop:
        return 0
    trials = store.study_trials(study_id)
    queued = [job for job in trials if job.status == JobStatus.QUEUED.value]
    if not queued:
        return 0
    pairs = study.stopped_early_pairs or 0
    if study.stopped_early_at is None:
        verdict = study_verdict_of(store, spec, trials)
        if verdict is None or not settled(verdict):
            return 0
        pairs = min(c.difference.n_pairs for c in verdict.comparisons)
        if not store.mark_study_stopped_early(study_id, pairs):
            return 0
        outcome = verdict.outcome
        logger.info("study %s settled after %d paired seeds (%s): cancelling queued trials", study_id, pairs, outcome)
    reason = f"cancelled before it started: its study settled early, after {pairs} paired seeds"
    cancelled = 0
    for job in queued:
        done = store.transition(
            job.id, JobStatus.CANCELLED, error=reason, message=f"job {reason}", only_from=JobStatus.QUEUED
        )
        cancelled += done is not None
    return cancelled
