"""Request and response bodies of the HTTP API, named by role (`JobCreate`, `JobPublic`, `JobsPublic`, ...).

Every field has a description: the OpenAPI document at /docs is generated from these classes. Response
models are built from store rows by the `from_row` constructors, so the routes stay one-liners.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.spec import JobSpec
from service.status import JobStatus
from service.store.limits import find_unstorable_text
from service.store.models import EpochPointRow, JobRow, LogLineRow, StepPointRow
from service.store.repository import LayerHistory, LayerMatrix, LayersAtStep, as_utc
from service.store.study_results import StudyState
from service.store.verdict import Verdict
from service.study_spec import StudySpec

__all__ = [
    "ClusterPublic",
    "EpochPoint",
    "ErrorPublic",
    "JobCreate",
    "JobPublic",
    "JobSummary",
    "JobsPublic",
    "LayerHistoryPublic",
    "LayerMatrixPublic",
    "LayerPoint",
    "LayersPublic",
    "LogLine",
    "LogsPublic",
    "MetricsPublic",
    "ModelPublic",
    "ModelsPublic",
    "ReadinessPublic",
    "StepPoint",
    "StudiesPublic",
    "StudyCreate",
    "StudyPublic",
    "TrialPublic",
    "VerdictPublic",
    "WhoAmIPublic",
]


def _refuse_unstorable_body(cls: type, data: Any) -> Any:
    """Text the database cannot store (a NUL character, ...) anywhere in a body is a 422 naming the field."""
    found = find_unstorable_text(data)
    if found is not None:
        where, reason = found
        raise ValueError(f"{where or 'the body'} {reason}: remove it.")
    return data


class JobCreate(JobSpec):
    """Body of `POST /v1/jobs`: the job spec (unknown fields are refused)."""

    _refuse_unstorable_text = model_validator(mode="before")(classmethod(_refuse_unstorable_body))


class StudyCreate(StudySpec):
    """Body of `POST /v1/studies`: the study spec (unknown fields are refused)."""

    _refuse_unstorable_text = model_validator(mode="before")(classmethod(_refuse_unstorable_body))


class ErrorPublic(BaseModel):
    """Body of every 4xx/5xx answer: one or more sentences saying what is wrong and how to fix it."""

    detail: str = Field(description="What went wrong and how to fix it.")
    errors: list[dict[str, Any]] | None = Field(
        None, description="For validation errors: one entry per problem, with `field` and `message`."
    )


class JobSummary(BaseModel):
    """How the run went so far (live while it runs, final once it ended)."""

    epochs_done: int = Field(description="Epochs finished.")
    last_step: int | None = Field(description="Last reported training step.")
    last_val_acc: float | None = Field(description="Validation accuracy after the latest epoch.")
    best_val_acc: float | None = Field(description="Best validation accuracy of any epoch.")
    final_val_acc: float | None = Field(description="Validation accuracy at the end of the run.")
    final_val_acc_precise: float | None = Field(
        None,
        description="Validation accuracy at the end with precise BatchNorm statistics (precise_bn; what the saved "
        "model scores); null without precise_bn.",
    )
    final_train_loss: float | None = Field(description="Training loss of the latest epoch (final once ended).")
    verdict: str | None = Field(
        description="converged (target reached), plateaued (no improvement for `patience` epochs), diverged "
        "(NaN/inf loss) or completed; null until the run ends."
    )
    warning: str | None = Field(
        None,
        description="Something to act on, found at the end: the BatchNorm running statistics lagging the weights "
        "(recorded drift beyond batch noise), with the remedy.",
    )


class JobPublic(BaseModel):
    """A job as the API shows it."""

    id: str = Field(description="Job id (32 hex digits).")
    owner: str = Field(description="The principal whose token submitted the job.")
    name: str | None = Field(description="The spec's optional label.")
    status: JobStatus = Field(description="queued, running, succeeded, failed or cancelled.")
    spec: JobSpec = Field(description="The submitted spec, with defaults filled in.")
    created_at: datetime = Field(description="When the job was submitted (UTC).")
    started_at: datetime | None = Field(description="When its run was launched (UTC).")
    finished_at: datetime | None = Field(description="When it ended (UTC).")
    error: str | None = Field(
        description="Why it failed or was cancelled (for a worker failure: the rank and its message)."
    )
    cancel_requested: bool = Field(description="A cancel was requested and the run is stopping.")
    queue_position: int | None = Field(
        description="1-based place in the queue while queued, counting only the jobs you can see (yours; an "
        "admin's: everyone's)."
    )
    has_model: bool = Field(description="The final model can be downloaded from /v1/jobs/{id}/model.")
    summary: JobSummary = Field(description="Progress and results.")
    study_id: str | None = Field(None, description="The study this job is a trial of (null: not a trial).")
    study_arm: int | None = Field(None, description="For a trial: the index of its arm in the study's `arms`.")
    study_seed: int | None = Field(None, description="For a trial: its seed.")

    @classmethod
    def from_row(cls, job: JobRow, *, queue_position: int | None = None, has_model: bool = False) -> JobPublic:
        return cls(
            id=job.id,
            owner=job.owner,
            name=job.name,
            status=JobStatus(job.status),
            spec=JobSpec.model_validate(job.spec),
            created_at=as_utc(job.created_at),
            started_at=as_utc(job.started_at),
            finished_at=as_utc(job.finished_at),
            error=job.error,
            cancel_requested=bool(job.cancel_requested),
            queue_position=queue_position,
            has_model=has_model,
            summary=JobSummary(
                epochs_done=job.epochs_done or 0,
                last_step=job.last_step,
                last_val_acc=job.last_val_acc,
                best_val_acc=job.best_val_acc,
                final_val_acc=job.final_val_acc,
                final_val_acc_precise=job.final_val_acc_precise,
                final_train_loss=job.final_train_loss,
                verdict=job.verdict,
                warning=job.warning,
            ),
            study_id=job.study_id,
            study_arm=job.study_arm,
            study_seed=job.study_seed,
        )


class JobsPublic(BaseModel):
    """One page of jobs, newest first."""

    data: list[JobPublic] = Field(description="The jobs of this page.")
    count: int = Field(description="Number of jobs matching the filter, over all pages.")


class StepPoint(BaseModel):
    """Training metrics of one reported step."""

    model_config = ConfigDict(from_attributes=True)

    step: int = Field(description="Global optimizer step (0-based).")
    epoch: int = Field(description="Epoch the step belongs to.")
    train_loss: float | None = Field(description="Mean training loss over the ranks (null if not finite).")
    lr: float | None = Field(description="Learning rate used for the step.")
    samples_per_s: float | None = Field(description="Training throughput over all workers.")
    step_time_s: float | None = Field(description="Wall time of the step.")


class EpochPoint(BaseModel):
    """Training and validation metrics at the end of one epoch."""

    model_config = ConfigDict(from_attributes=True)

    epoch: int = Field(description="Epoch number.")
    step: int = Field(description="Global step at the end of the epoch.")
    train_loss: float | None = Field(description="Mean training loss of the epoch.")
    train_acc: float | None = Field(description="Training accuracy of the epoch.")
    val_loss: float | None = Field(description="Validation loss.")
    val_acc: float | None = Field(description="Validation accuracy.")
    val_loss_precise: float | None = Field(
        None, description="Validation loss with precise BatchNorm statistics (precise_bn); null when not run."
    )
    val_acc_precise: float | None = Field(
        None, description="Validation accuracy with precise BatchNorm statistics (precise_bn); null when not run."
    )
    epoch_time_s: float | None = Field(description="Wall time of the epoch.")


class MetricsPublic(BaseModel):
    """The convergence metrics of a job."""

    job_id: str = Field(description="The job.")
    steps: list[StepPoint] = Field(description="Step points with step > since_step, in step order.")
    epochs: list[EpochPoint] = Field(description="Epoch points ending after since_step, in epoch order.")

    @classmethod
    def from_rows(cls, job_id: str, steps: list[StepPointRow], epochs: list[EpochPointRow]) -> MetricsPublic:
        return cls(
            job_id=job_id,
            steps=[StepPoint.model_validate(row) for row in steps],
            epochs=[EpochPoint.model_validate(row) for row in epochs],
        )


class LayersPublic(BaseModel):
    """Every BatchNorm layer's statistics at one recorded step."""

    job_id: str = Field(description="The job.")
    step: int | None = Field(
        description="The recorded step shown (null: nothing recorded yet): the one asked for, or the nearest one "
        "that is kept (with channels: the nearest step that still keeps its per-channel vectors)."
    )
    requested_step: int | None = Field(description="The `step` asked for (null: the latest).")
    epoch: int | None = Field(description="Epoch of that step.")
    recorded_steps: list[int] = Field(description="Every step with recorded summaries, ascending.")
    kept_steps: list[int] = Field(
        description="Recorded steps that still keep their per-channel vectors (the most recent ones and a "
        "log-spaced selection of older ones, at most the job's stats_keep), ascending."
    )
    layers: dict[str, dict[str, Any]] = Field(
        description="Per layer (module path, in model order): the merged statistics of "
        "syncbn.merge_packed_layer_stats: summaries of the global batch mean/var, running stats, gamma/beta, "
        "gradient norms, dead_channels, drift, cross-worker skew (skew_between_share, skew_max_gap), ranks_agree, "
        "per_rank_count; with channels: the per-channel lists mean, var, running_mean, running_var (float32)."
    )

    @classmethod
    def from_result(cls, job_id: str, result: LayersAtStep) -> LayersPublic:
        return cls(
            job_id=job_id,
            step=result.step,
            requested_step=result.requested_step,
            epoch=result.epoch,
            recorded_steps=result.recorded_steps,
            kept_steps=result.kept_steps,
            layers=result.layers,
        )


class LayerMatrixPublic(BaseModel):
    """Summary statistics of every layer over the recorded steps: what the dashboard's heatmap draws."""

    job_id: str = Field(description="The job.")
    layers: list[str] = Field(description="Layers (module paths) in model order: the rows.")
    steps: list[int] = Field(description="Recorded steps, ascending, downsampled evenly to max_steps: the columns.")
    epochs: list[int] = Field(description="Epoch of each step.")
    available: int = Field(description="Recorded steps before downsampling.")
    values: dict[str, list[list[float | None]]] = Field(
        description="Per statistic asked for: one list per layer, aligned with `steps` (null: none)."
    )

    @classmethod
    def from_result(cls, job_id: str, matrix: LayerMatrix) -> LayerMatrixPublic:
        return cls(
            job_id=job_id,
            layers=matrix.layers,
            steps=matrix.steps,
            epochs=matrix.epochs,
            available=matrix.available,
            values=matrix.values,
        )


class LayerPoint(BaseModel):
    """One layer's statistics at one recorded step."""

    step: int = Field(description="Recorded step.")
    epoch: int = Field(description="Epoch of that step.")
    stats: dict[str, Any] = Field(description="The merged statistics (see LayersPublic.layers).")


class LayerHistoryPublic(BaseModel):
    """One layer's statistics over the run, downsampled to at most `max_points` points."""

    job_id: str = Field(description="The job.")
    layer: str = Field(description="Module path of the BatchNorm layer, e.g. 'layer1.0.bn1'.")
    available: int = Field(
        description="Points the series had before downsampling (recorded steps; with channels: kept snapshots)."
    )
    points: list[LayerPoint] = Field(
        description="Ascending; evenly spaced over the available ones, the first and the last always included."
    )

    @classmethod
    def from_result(cls, job_id: str, layer: str, history: LayerHistory) -> LayerHistoryPublic:
        return cls(
            job_id=job_id,
            layer=layer,
            available=history.available,
            points=[LayerPoint(step=p.step, epoch=p.epoch, stats=p.stats) for p in history.points],
        )


class LogLine(BaseModel):
    """One log line about a job."""

    model_config = ConfigDict(from_attributes=True)

    seq: int = Field(description="Position in the job's event stream (use as `after` to read on).")
    created_at: datetime = Field(description="When it was stored (UTC).")
    level: str = Field(description="debug, info, warning or error.")
    source: str = Field(description="run (from the workers/controller) or service (lifecycle).")
    message: str = Field(description="The line.")

    @classmethod
    def from_row(cls, row: LogLineRow) -> LogLine:
        return cls(
            seq=row.seq, created_at=as_utc(row.created_at), level=row.level, source=row.source, message=row.message
        )


class LogsPublic(BaseModel):
    """Log lines of a job, oldest first."""

    data: list[LogLine] = Field(description="The lines with seq > after.")
    count: int = Field(description="Number of lines in `data`.")


class ClusterPublic(BaseModel):
    """The Ray cluster the service runs jobs on, and how busy it is."""

    cpus: float = Field(description="Logical CPUs of the cluster.")
    gpus: float = Field(description="GPUs of the cluster.")
    available_cpus: float = Field(description="CPUs not reserved right now.")
    available_gpus: float = Field(description="GPUs not reserved right now.")
    nodes: list[dict[str, Any]] = Field(description="Per node: its resources.")
    max_concurrent_jobs: int = Field(description="Jobs that may run at once.")
    running_jobs: int = Field(description="Your jobs running now (an admin's view: everyone's).")
    queued_jobs: int = Field(description="Your jobs waiting in the queue (an admin's view: everyone's).")
    replica: str = Field(description="The replica that answered.")
    leader: str | None = Field(description="The replica that schedules jobs now; null while none does.")


class WhoAmIPublic(BaseModel):
    """Who the service takes the caller for."""

    principal: str = Field(description="The principal your token stands for ('default' for a bare token).")
    admin: bool = Field(description="You see and manage every principal's jobs.")
    authenticated: bool = Field(description="The service checks tokens (false: open, everyone is 'default').")


class ReadinessPublic(BaseModel):
    """Whether the service can take work: the database and Ray both answer."""

    ready: bool = Field(description="Both checks passed.")
    database: str = Field(description="'ok' or the error.")
    ray: str = Field(description="'ok' or the error.")
    replica: str = Field(description="This replica's name (settings.replica_name, default host:port/pid).")
    leader: str | None = Field(
        description="The replica that schedules jobs now (holds the leader lease); null while none does, e.g. "
        "while the database does not answer."
    )
    leading: bool = Field(description="Whether this replica is the leader.")


class ModelPublic(BaseModel):
    """One model the service can build, by the name a job spec gives in `model`."""

    name: str = Field(description="The name to put in a job spec's `model` field.")
    package: str = Field(description="The installed package that provides it (syncbn for the built-ins).")
    summary: str = Field(description="The first sentence of the model's docstring, whole.")


class ModelsPublic(BaseModel):
    """Every model the service can build: built-ins, installed plugins (entry points), torchvision's, timm's."""

    data: list[ModelPublic] = Field(description="The models, built-ins first.")
    count: int = Field(description="Number of models.")


class ArmVerdictPublic(BaseModel):
    """One arm's result over its succeeded trials."""

    arm: int = Field(description="Index of the arm in the study's `arms`.")
    label: str = Field(description="What the arm changes, e.g. 'sync_bn=false'.")
    mean: float | None = Field(description="Mean over seeds of each trial's best metric (null: no trial done).")
    ci_low: float | None = Field(description="Lower end of the t interval of that mean (null: fewer than 2 seeds).")
    ci_high: float | None = Field(description="Upper end of the t interval of that mean.")
    n: int = Field(description="Seeds with a result.")
    samples_per_s: float | None = Field(description="Mean training throughput of its trials (all workers).")
    wall_s: float | None = Field(description="Mean wall time of its trials, from start to end.")


class DifferencePublic(BaseModel):
    """The reference arm minus another arm, seed by seed (paired)."""

    mean: float = Field(description="Mean paired difference (positive: the reference's metric is larger).")
    ci_low: float | None = Field(description="Lower end of its t interval (null: one pair only).")
    ci_high: float | None = Field(description="Upper end of its t interval.")
    p_value: float | None = Field(description="Two-sided paired t-test (scipy.stats.ttest_rel's test).")
    n_pairs: int = Field(description="Seeds both arms finished.")


class ComparisonPublic(BaseModel):
    """The reference arm (the first) against one other arm."""

    arm: int = Field(description="Index of the other arm.")
    label: str = Field(description="What the other arm changes.")
    outcome: str = Field(description="pays, does_not_pay or inconclusive.")
    difference: DifferencePublic = Field(description="Reference minus this arm, paired by seed.")
    cost_ratio: float | None = Field(
        description="This arm's samples/s over the reference's: above 1, the reference is that much slower."
    )
    seeds_needed: int | None = Field(
        description="When inconclusive: about how many paired seeds would resolve a difference of this size at this "
        "spread (1001: more than 1000)."
    )


class LayerSkewPublic(BaseModel):
    """A BatchNorm layer whose workers' batches disagreed most in the local arm."""

    layer: str = Field(description="Module path of the layer.")
    between_share_mean: float = Field(
        description="Mean over training of the between-rank share of the batch variance (skew_between_share_mean)."
    )
    points: int = Field(description="Recorded steps (over the local arm's trials) the mean is taken over.")


class VerdictPublic(BaseModel):
    """Does the reference arm pay? The answer for the first other arm, with every comparison and its parts."""

    outcome: str = Field(
        description="pays (the interval of the difference lies on the good side of zero, beyond the margin), "
        "does_not_pay (within +-margin, or on the bad side) or inconclusive."
    )
    sentence: str = Field(description="The answer in one plain sentence, with the numbers.")
    metric: str = Field(description="val_accuracy or val_loss.")
    margin: float = Field(description="Differences within +-margin were judged too small to matter.")
    confidence: float = Field(description="Confidence of the intervals.")
    arms: list[ArmVerdictPublic] = Field(description="Per arm, in the study's order.")
    difference: DifferencePublic = Field(description="The reference minus the first other arm (what `outcome` says).")
    cost_ratio: float | None = Field(description="Of the first comparison (see comparisons[].cost_ratio).")
    seeds_needed: int | None = Field(description="Of the first comparison (see comparisons[].seeds_needed).")
    comparisons: list[ComparisonPublic] = Field(description="The reference against each other arm.")
    layers: list[LayerSkewPublic] = Field(
        description="The local arm's layers with the largest cross-worker skew (what synchronisation corrects)."
    )

    @classmethod
    def from_verdict(cls, verdict: Verdict, labels: list[str]) -> VerdictPublic:
        arms = []
        for index, summary in enumerate(verdict.arms):
            parts = (
                {"mean": None, "ci_low": None, "ci_high": None, "n": 0, "samples_per_s": None, "wall_s": None}
                if summary is None
                else {
                    "mean": summary.mean,
                    "ci_low": summary.ci_low,
                    "ci_high": summary.ci_high,
                    "n": summary.n,
                    "samples_per_s": summary.samples_per_s,
                    "wall_s": summary.wall_s,
                }
            )
            arms.append(ArmVerdictPublic(arm=index, label=labels[index], **parts))
        comparisons = [
            ComparisonPublic(
                arm=c.arm,
                label=labels[c.arm],
                outcome=c.outcome,
                difference=DifferencePublic(
                    mean=c.difference.mean,
                    ci_low=c.difference.ci_low,
                    ci_high=c.difference.ci_high,
                    p_value=c.difference.p_value,
                    n_pairs=c.difference.n_pairs,
                ),
                cost_ratio=c.cost_ratio,
                seeds_needed=c.seeds_needed,
            )
            for c in verdict.comparisons
        ]
        first = comparisons[0]
        return cls(
            outcome=verdict.outcome,
            sentence=verdict.sentence,
            metric=verdict.metric,
            margin=verdict.margin,
            confidence=verdict.confidence,
            arms=arms,
            difference=first.difference,
            cost_ratio=first.cost_ratio,
            seeds_needed=first.seeds_needed,
            comparisons=comparisons,
            layers=[LayerSkewPublic(**layer) for layer in verdict.layers],
        )


class TrialPublic(BaseModel):
    """One trial of a study: an ordinary job (see GET /v1/jobs/{job_id})."""

    job_id: str = Field(description="The job.")
    arm: int = Field(description="Index of its arm in the study's `arms`.")
    seed: int = Field(description="Its seed.")
    status: JobStatus = Field(description="The job's status.")


class StoppedEarlyPublic(BaseModel):
    """A study that stopped early: its verdict settled, so the trials still queued were cancelled."""

    at: datetime = Field(description="When the verdict settled (UTC).")
    paired_seeds: int = Field(description="Paired seeds of the verdict at that moment.")
    cancelled_trials: int = Field(description="Queued trials cancelled for it (they never started).")


class StudyPublic(BaseModel):
    """A study as the API shows it: status and verdict are derived from its trials when read."""

    id: str = Field(description="Study id (32 hex digits).")
    owner: str = Field(description="The principal whose token submitted the study (its trials are theirs too).")
    name: str | None = Field(description="The spec's optional label.")
    status: str = Field(
        description="queued (no trial started), running, succeeded (every trial ended and there is a verdict), "
        "failed (every trial ended, no verdict possible) or cancelled."
    )
    created_at: datetime = Field(description="When the study was submitted (UTC).")
    spec: StudySpec = Field(description="The submitted spec, with defaults filled in.")
    arms: list[dict[str, Any]] = Field(description="Per arm: its index, label and the fields it overrides.")
    trials: list[TrialPublic] = Field(
        description="Its trials in the order they were queued: seed by seed, every arm of each seed."
    )
    verdict: VerdictPublic | None = Field(
        description="null until at least two seeds of two arms have succeeded; then updated as trials finish."
    )
    stopped_early: StoppedEarlyPublic | None = Field(
        None, description="Set when the study (with early_stop) settled before running every trial."
    )

    @classmethod
    def from_state(cls, state: StudyState) -> StudyPublic:
        labels = state.spec.labels()
        return cls(
            id=state.study.id,
            owner=state.study.owner,
            name=state.study.name,
            status=state.status,
            created_at=as_utc(state.study.created_at),
            spec=state.spec,
            arms=[
                {"arm": index, "label": labels[index], "overrides": arm.overrides()}
                for index, arm in enumerate(state.spec.arms)
            ],
            trials=[
                TrialPublic(job_id=job.id, arm=job.study_arm, seed=job.study_seed, status=JobStatus(job.status))
                for job in state.trials
                if job.study_arm is not None and job.study_seed is not None
            ],
            verdict=VerdictPublic.from_verdict(state.verdict, labels) if state.verdict is not None else None,
            stopped_early=(
                StoppedEarlyPublic(
                    at=state.stopped_early.at,
                    paired_seeds=state.stopped_early.paired_seeds,
                    cancelled_trials=state.stopped_early.cancelled_trials,
                )
                if state.stopped_early is not None
                else None
            ),
        )


class StudiesPublic(BaseModel):
    """One page of studies, newest first."""

    data: list[StudyPublic] = Field(description="The studies of this page.")
    count: int = Field(description="Number of studies over all pages.")
