"""A study as it stands, derived when read from its trials' rows and stored metrics (nothing of it is kept).

A study's trials are ordinary jobs, so the service never schedules, resumes or counts anything for a study: its
status comes from its trials' statuses, and its verdict (`service.store.verdict`) from what the trials stored:
- per trial: the best `val_acc` (or lowest `val_loss`) over its epoch points, the mean `samples_per_s` over its
  step points, and its wall time (`finished_at - started_at`); only succeeded trials count;
- the local arm's layer summaries: each layer's `skew_between_share_mean` over the recorded steps of its trials.

A restart of the service in the middle of a study therefore needs nothing but the jobs' own recovery.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from service.status import JobStatus
from service.store.models import JobRow, StudyRow
from service.store.repository import JobStore, as_utc
from service.store.verdict import ArmResult, Verdict, default_margin, study_verdict
from service.study_spec import StudySpec

__all__ = [
    "SKEW_KEY",
    "StoppedEarly",
    "StudyState",
    "StudyStatus",
    "derive_status",
    "read_study",
    "study_verdict_of",
]

logger = logging.getLogger(__name__)

#: The layer summary statistic whose mean over steps ranks the layers of the verdict.
SKEW_KEY = "skew_between_share_mean"
#: Recorded steps read per trial for the layer ranking (downsampled evenly beyond that).
SKEW_STEPS = 2000


class StudyStatus:
    """The states of a study (strings, as the API shows them)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ALL = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)


@dataclass(frozen=True)
class StoppedEarly:
    """A study with `early_stop` whose verdict settled: when, after how many paired seeds, and how many of its
    queued trials were cancelled for it (they never started)."""

    at: datetime
    paired_seeds: int
    cancelled_trials: int

    def sentence(self) -> str:
        """What the verdict's sentence adds, e.g. 'It stopped early after 2 paired seeds (2 queued trials not run).'"""
        trials = f"{self.cancelled_trials} queued trial{'s' if self.cancelled_trials != 1 else ''} not run"
        return f"It stopped early after {self.paired_seeds} paired seeds ({trials})."


@dataclass
class StudyState:
    """A study row with its spec, its trials (jobs), derived status and verdict."""

    study: StudyRow
    spec: StudySpec
    trials: list[JobRow]
    status: str
    verdict: Verdict | None
    stopped_early: StoppedEarly | None = None


def derive_status(cancel_requested: bool, statuses: list[JobStatus], has_verdict: bool) -> str:
    """queued (no trial started), running (some trial running or some ended while others wait), succeeded (every
    trial ended and there is a verdict), failed (every trial ended and no verdict is possible) or cancelled."""
    if cancel_requested:
        return StudyStatus.CANCELLED
    if any(not status.is_terminal for status in statuses):
        started = any(status is JobStatus.RUNNING or status.is_terminal for status in statuses)
        return StudyStatus.RUNNING if started else StudyStatus.QUEUED
    return StudyStatus.SUCCEEDED if has_verdict else StudyStatus.FAILED


def _wall_s(job: JobRow) -> float | None:
    started, finished = as_utc(job.started_at), as_utc(job.finished_at)
    if started is None or finished is None:
        return None
    return (finished - started).total_seconds()


def _layer_shares(store: JobStore, jobs: list[JobRow]) -> dict[str, list[float]]:
    shares: dict[str, list[float]] = {}
    for job in jobs:
        matrix = store.layer_matrix(job.id, [SKEW_KEY], max_steps=SKEW_STEPS)
        for layer, values in zip(matrix.layers, matrix.values.get(SKEW_KEY, []), strict=False):
            shares.setdefault(layer, []).extend(v for v in values if v is not None)
    return shares


def study_verdict_of(store: JobStore, spec: StudySpec, trials: list[JobRow]) -> Verdict | None:
    """The verdict from the succeeded trials' stored metrics, or None while fewer than two seeds of two arms are
    done."""
    done = [job for job in trials if job.status == JobStatus.SUCCEEDED.value and job.study_arm is not None]
    results = store.trial_results([job.id for job in done])
    values: list[dict[int, float]] = [{} for _ in spec.arms]
    speeds: list[list[float]] = [[] for _ in spec.arms]
    walls: list[list[float]] = [[] for _ in spec.arms]
    for job in done:
        arm = job.study_arm
        if arm is None or not 0 <= arm < len(spec.arms) or job.study_seed is None:
            continue
        result = results[job.id]
        value = result.best_val_acc if spec.metric == "val_accuracy" else result.lowest_val_loss
        if value is None:
            continue
        values[arm][job.study_seed] = value
        if result.samples_per_s is not None:
            speeds[arm].append(result.samples_per_s)
        wall = _wall_s(job)
        if wall is not None:
            walls[arm].append(wall)
    if not values[0]:
        return None
    margin = spec.margin
    if margin is None:
        reference = list(values[0].values())
        margin = default_margin(spec.metric, sum(reference) / len(reference))
    local = spec.local_arm()
    shares = _layer_shares(store, [job for job in done if job.study_arm == local]) if local is not None else None
    arms = [ArmResult(values[i], speeds[i], walls[i]) for i in range(len(spec.arms))]
    return study_verdict(
        arms,
        metric=spec.metric,
        confidence=spec.confidence,
        margin=margin,
        labels=spec.labels(),
        sync_only=spec.sync_only(),
        layer_shares=shares,
    )


def read_study(store: JobStore, study: StudyRow) -> StudyState:
    """The study with its trials, status and verdict, as of now.

    Raises:
        ValueError: the stored spec is not a StudySpec this code can read.
    """
    try:
        spec = StudySpec.model_validate(study.spec)
    except ValidationError as exc:
        raise ValueError(f"study {study.id} holds a spec this version cannot read: {exc}") from exc
    trials = store.study_trials(study.id)
    verdict = study_verdict_of(store, spec, trials)
    status = derive_status(bool(study.cancel_requested), [JobStatus(job.status) for job in trials], verdict is not None)
    stopped = None
    if study.stopped_early_at is not None:
        never_started = [j for j in trials if j.status == JobStatus.CANCELLED.value and j.started_at is None]
        stopped = StoppedEarly(as_utc(study.stopped_early_at), study.stopped_early_pairs or 0, len(never_started))
        if verdict is not None:
            verdict.sentence = f"{verdict.sentence} {stopped.sentence()}"
    return StudyState(study, spec, trials, status, verdict, stopped)
