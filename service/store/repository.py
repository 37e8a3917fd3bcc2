"""The store: every read and write of the service's database goes through `JobStore`.

Responsibilities:
- open the database named by an SQLAlchemy URL (an SQLite file by default, Postgres by URL) and upgrade its
  schema to the newest Alembic revision (`service.store.migration`; a database newer than the code is refused);
- create jobs for their owner (honouring `Idempotency-Key`, per owner), move them between states (only along
  the allowed transitions of `JobStatus`, checked atomically in the database), and delete them with everything
  they own;
- ingest a batch of run records (steps, epochs, layer statistics, logs, the end record) in ONE transaction,
  together with the events that Server-Sent-Events clients receive and the recorder cursor, so a crash can
  neither lose nor duplicate a record;
- answer the API's queries (listing, metrics, layer statistics, logs, events); listings and counts take an
  `owner` to show one principal's jobs only (None: every job).
- studies: create a study with all its trial jobs in one transaction, read and list studies, a study's trials,
  and the aggregates its verdict reads (best validation metrics and mean throughput per trial, status events).

Writes of this process are serialised by a lock (SQLite allows one writer anyway, and the per-job event
counter must not race); reads run concurrently. Rows are returned detached from their session.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.status import JobStatus
from service.store.engine import make_engine
from service.store.layer_codec import (
    SUMMARY_FIELDS,
    decode_summary,
    decode_vector_arrays,
    decode_vectors,
    encode_summary,
    summary_columns,
    vectors_from_lists,
)
from service.store.migration import upgrade_database
from service.store.models import (
    DEFAULT_OWNER,
    EpochPointRow,
    IdempotencyKeyRow,
    JobEventRow,
    JobRow,
    LayerSeriesRow,
    LayerSummaryRow,
    LayerVectorsRow,
    LogLineRow,
    StepPointRow,
    StudyRow,
)
from service.store.retention import downsample, nearest, snapshots_to_keep

__all__ = [
    "DEFAULT_STATS_KEEP",
    "IdempotencyKeyReusedError",
    "IngestResult",
    "JobStore",
    "LayerHistory",
    "LayerMatrix",
    "LayerPointData",
    "LayersAtStep",
    "TrialResult",
    "json_safe",
    "utcnow",
]

#: Per-channel snapshots kept per layer and job when neither the job's spec nor the settings say otherwise.
DEFAULT_STATS_KEEP = 256

logger = logging.getLogger(__name__)


class IdempotencyKeyReusedError(ValueError):
    """An `Idempotency-Key` came back with a different request body than the one it was first used with."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"the Idempotency-Key {key!r} was already used for job {job_id} with a different request body: "
            "use a new key for a different job, or resend the original body."
        )
        self.key = key
        self.job_id = job_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.job_id))


@dataclass
class IngestResult:
    """What one batch of run records changed: the new cursors and, if the run ended, its final state."""

    record_seq: int
    event_seq: int
    stored: int = 0
    ended: JobStatus | None = None
    skipped_kinds: list[str] = field(default_factory=list)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """Attach UTC to a naive timestamp read back from SQLite (Postgres keeps the zone)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def json_safe(value: Any) -> Any:
    """`value` with every NaN/inf float replaced by None, so JSON columns and responses stay valid JSON.

    A diverged run reports NaN losses; Postgres' json type and strict JSON encoders reject them.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / NaN / inf / non-numeric values."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _integer(value: Any, default: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return default
    return int(value)


@dataclass(frozen=True)
class TrialResult:
    """What a study's verdict reads of one trial: its best validation metrics and mean throughput."""

    best_val_acc: float | None
    lowest_val_loss: float | None
    samples_per_s: float | None


@dataclass
class LayerPointData:
    """One layer's statistics at one recorded step: the summary, plus the per-channel lists when asked and kept."""

    step: int
    epoch: int
    stats: dict[str, Any]


@dataclass
class LayersAtStep:
    """Every layer at one step, with the step that was asked for and which steps keep per-channel vectors."""

    step: int | None
    epoch: int | None
    requested_step: int | None
    layers: dict[str, dict[str, Any]]
    recorded_steps: list[int]
    kept_steps: list[int]


@dataclass
class LayerMatrix:
    """Some summary statistics of every layer at (a downsampled selection of) the recorded steps."""

    layers: list[str]
    steps: list[int]
    epochs: list[int]
    available: int
    values: dict[str, list[list[float | None]]]


@dataclass
class LayerHistory:
    """One layer's (possibly downsampled) series and how many points it was taken from."""

    points: list[LayerPointData]
    available: int


def _queued_job_row(job_id: str, owner: str, spec: dict[str, Any], now: datetime, **study: Any) -> JobRow:
    """A new job's row as it is queued: a plain submission, or a study's trial (`study`: its id, arm and seed)."""
    return JobRow(
        id=job_id,
        owner=owner,
        name=spec.get("name"),
        status=JobStatus.QUEUED.value,
        spec=json_safe(spec),
        created_at=now,
        cancel_requested=False,
        epochs_done=0,
        record_seq=0,
        event_seq=0,
        **study,
    )


class JobStore:
    """Jobs, metric points, layer statistics, logs, events and idempotency keys in one SQL database."""

    def __init__(self, url: str, *, stats_keep: int = DEFAULT_STATS_KEEP) -> None:
        self.url = url
        self.stats_keep = stats_keep
        self.engine = make_engine(url)
        try:
            self.schema = upgrade_database(self.engine)
        except BaseException:
            self.engine.dispose()
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = threading.Lock()
        self._latest_event: dict[str, int] = {}
        self._latest_lock = threading.Lock()
        # Layer series ids per job (name -> id) as committed: series are only ever added, and go with their job.
        self._series_cache: dict[str, dict[str, int]] = {}

    # -- plumbing -------------------------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_lock, self._sessions() as session, session.begin():
            yield session

    def _lock_job(self, session: Session, job_id: str) -> JobRow | None:
        return session.scalars(select(JobRow).where(JobRow.id == job_id).with_for_update()).first()

    def _note_event(self, job_id: str, seq: int) -> None:
        with self._latest_lock:
            if seq > self._latest_event.get(job_id, 0):
                self._latest_event[job_id] = seq

    def latest_event_hint(self, job_id: str) -> int:
        """The newest event id this process has written for `job_id` (0 if none): a cheap change check."""
        with self._latest_lock:
            return self._latest_event.get(job_id, 0)

    def ping(self) -> None:
        """Run `SELECT 1`; raises if the database cannot be reached."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    @staticmethod
    def _add_event(session: Session, job: JobRow, kind: str, data: dict[str, Any], now: datetime) -> int:
        job.event_seq += 1
        session.add(JobEventRow(job_id=job.id, seq=job.event_seq, kind=kind, data=json_safe(data), created_at=now))
        return job.event_seq

    @classmethod
    def _add_log(cls, session: Session, job: JobRow, level: str, message: str, source: str, now: datetime) -> int:
        data = {"level": level, "source": source, "message": message, "at": now.isoformat()}
        seq = cls._add_event(session, job, "log", data, now)
        session.add(LogLineRow(job_id=job.id, seq=seq, created_at=now, level=level, source=source, message=message))
        return seq

    @staticmethod
    def _status_data(job: JobRow, previous: str | None, now: datetime) -> dict[str, Any]:
        return {
            "status": job.status,
            "previous": previous,
            "at": now.isoformat(),
            "error": job.error,
            "verdict": job.verdict,
            "epochs_done": job.epochs_done,
            "last_val_acc": job.last_val_acc,
            "best_val_acc": job.best_val_acc,
            "final_val_acc": job.final_val_acc,
            "final_val_acc_precise": job.final_val_acc_precise,
            "final_train_loss": job.final_train_loss,
            "warning": job.warning,
        }

    # -- jobs -----------------------------------------------------------------------------------------------

    def create_job(
        self,
        job_id: str,
        spec: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        owner: str = DEFAULT_OWNER,
    ) -> tuple[JobRow, bool]:
        """Insert a queued job of `owner`; with an idempotency key the owner already used for the same body,
        return that job.

        Returns:
            (job, created): `created` is False when an earlier job was returned for the key.

        Raises:
            IdempotencyKeyReusedError: the key was used before with a different body.
        """
        if idempotency_key is not None:
            existing = self.job_for_idempotency_key(idempotency_key, request_hash, owner=owner)
            if existing is not None:
                return existing, False
        now = utcnow()
        try:
            with self._write() as session:
                job = _queued_job_row(job_id, owner, spec, now)
                session.add(job)
                session.flush()
                if idempotency_key is not None:
                    session.add(
                        IdempotencyKeyRow(
                            owner=owner,
                            key=idempotency_key,
                            job_id=job_id,
                            request_hash=request_hash or "",
                            created_at=now,
                        )
                    )
                self._add_event(session, job, "status", self._status_data(job, None, now), now)
                self._add_log(session, job, "info", "job submitted and queued", "service", now)
                session.flush()
        except IntegrityError:
            # Two requests with the same new key raced: the other one won, answer with its job.
            if idempotency_key is None:
                raise
            existing = self.job_for_idempotency_key(idempotency_key, request_hash, owner=owner)
            if existing is None:
                raise
            return existing, False
        self._note_event(job_id, job.event_seq)
        return job, True

    def job_for_idempotency_key(
        self, key: str, request_hash: str | None, *, owner: str = DEFAULT_OWNER
    ) -> JobRow | None:
        """The job `owner` created earlier with this `Idempotency-Key`, or None if the key is new to the owner.

        Raises:
            IdempotencyKeyReusedError: the key was used with a different body (`request_hash` differs).
        """
        with self._read() as session:
            row = session.get(IdempotencyKeyRow, (owner, key))
            if row is None:
                return None
            if request_hash is not None and row.request_hash != request_hash:
                raise IdempotencyKeyReusedError(key, row.job_id)
            return session.scalars(select(JobRow).where(JobRow.id == row.job_id)).first()

    def get_job(self, job_id: str) -> JobRow | None:
        """The job with this id, or None."""
        with self._read() as session:
            return session.scalars(select(JobRow).where(JobRow.id == job_id)).first()

    def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        offset: int = 0,
        limit: int = 50,
        owner: str | None = None,
        study: str | None = None,
    ) -> tuple[list[JobRow], int]:
        """One page of jobs, newest first, optionally of one status, one owner and one study (its trials); and how
        many match in total."""
        query = select(JobRow)
        count_query = select(func.count()).select_from(JobRow)
        if study is not None:
            query = query.where(JobRow.study_id == study)
            count_query = count_query.where(JobRow.study_id == study)
        if owner is not None:
            query = query.where(JobRow.owner == owner)
            count_query = count_query.where(JobRow.owner == owner)
        if status is not None:
            query = query.where(JobRow.status == status.value)
            count_query = count_query.where(JobRow.status == status.value)
        with self._read() as session:
            rows = list(session.scalars(query.order_by(JobRow.number.desc()).offset(offset).limit(limit)))
            count = session.scalar(count_query) or 0
        return rows, count

    def jobs_with_status(self, status: JobStatus) -> list[JobRow]:
        """All jobs in `status`, oldest first (for queued jobs: the queue order)."""
        with self._read() as session:
            return list(session.scalars(select(JobRow).where(JobRow.status == status.value).order_by(JobRow.number)))

    def queue_positions(self, *, owner: str | None = None) -> dict[str, int]:
        """1-based position of every queued job in the queue, counting only `owner`'s jobs (None: everyone's), so
        a principal learns nothing about other principals' jobs from its place in the queue."""
        query = select(JobRow.id).where(JobRow.status == JobStatus.QUEUED.value)
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        with self._read() as session:
            ids = session.scalars(query.order_by(JobRow.number))
            return {job_id: index for index, job_id in enumerate(ids, start=1)}

    def count_by_status(self, *, owner: str | None = None) -> dict[JobStatus, int]:
        """Number of jobs (of `owner`, or of everyone) in each state (every state present, zeros included)."""
        query = select(JobRow.status, func.count())
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        with self._read() as session:
            rows = session.execute(query.group_by(JobRow.status)).all()
        counts = dict.fromkeys(JobStatus, 0)
        for status, count in rows:
            counts[JobStatus(status)] = count
        return counts

    def transition(
        self,
        job_id: str,
        target: JobStatus,
        *,
        error: str | None = None,
        message: str | None = None,
        level: str = "info",
        only_from: JobStatus | None = None,
    ) -> JobRow | None:
        """Move a job to `target` if its current state allows it (and is `only_from`, when given); record a status
        event and a log line.

        Returns:
            The updated job, or None when the job does not exist or its state does not allow the move.
        """
        now = utcnow()
        with self._write() as session:
            job = self._lock_job(session, job_id)
            if job is None or not JobStatus(job.status).can_become(target):
                return None
            if only_from is not None and job.status != only_from.value:
                return None
            previous = job.status
            job.status = target.value
            if target is JobStatus.RUNNING:
                job.started_at = now
            if target.is_terminal:
                job.finished_at = now
            if error is not None:
                job.error = error
            self._add_event(session, job, "status", self._status_data(job, previous, now), now)
            self._add_log(session, job, level, message or f"job {target.value}", "service", now)
        self._note_event(job_id, job.event_seq)
        return job

    def mark_cancel_requested(self, job_id: str) -> JobRow | None:
        """Flag a running job as being cancelled (the run's end record finishes the move); None if not running."""
        now = utcnow()
        with self._write() as session:
            job = self._lock_job(session, job_id)
            if job is None or job.status != JobStatus.RUNNING.value:
                return None
            if not job.cancel_requested:
                job.cancel_requested = True
                self._add_log(session, job, "info", "cancel requested; stopping the run", "service", now)
        self._note_event(job_id, job.event_seq)
        return job

    def add_log(self, job_id: str, level: str, message: str) -> None:
        """Append a service log line (and its event) to a job."""
        now = utcnow()
        with self._write() as session:
            job = self._lock_job(session, job_id)
            if job is None:
                return
            self._add_log(session, job, level, message, "service", now)
        self._note_event(job_id, job.event_seq)

    def stored_progress(self, job_id: str) -> dict[str, int]:
        """The last `step` point, `layers` step and `epoch` stored for a job (0 where none)."""
        with self._read() as session:
            step = session.scalar(select(func.max(StepPointRow.step)).where(StepPointRow.job_id == job_id))
            layers = session.scalar(
                select(func.max(LayerSummaryRow.step))
                .join(LayerSeriesRow, LayerSeriesRow.id == LayerSummaryRow.series_id)
                .where(LayerSeriesRow.job_id == job_id)
            )
            epoch = session.scalar(select(func.max(EpochPointRow.epoch)).where(EpochPointRow.job_id == job_id))
        return {"step": step or 0, "layers": layers or 0, "epoch": epoch or 0}

    def mark_resumed(self, job_id: str, epoch: int, reason: str) -> JobRow | None:
        """Record that a running job's run starts again from its checkpoint after `epoch`.

        The recorder cursor goes back to 0 (the new run has a new record log); a `resumed` event
        (`epoch, reason, at`) and a log line mark the moment on the job's timeline. None when the job is not running.
        """
        now = utcnow()
        with self._write() as session:
            job = self._lock_job(session, job_id)
            if job is None or job.status != JobStatus.RUNNING.value:
                return None
            job.record_seq = 0
            self._add_event(session, job, "resumed", {"epoch": epoch, "reason": reason, "at": now.isoformat()}, now)
            self._add_log(session, job, "info", f"resumed after a {reason} at epoch {epoch}", "service", now)
        self._note_event(job_id, job.event_seq)
        return job

    def delete_job(self, job_id: str) -> bool:
        """Delete a job and every row it owns; False if there was no such job."""
        with self._write() as session:
            job = self._lock_job(session, job_id)
            if job is None:
                return False
            series = select(LayerSeriesRow.id).where(LayerSeriesRow.job_id == job_id).scalar_subquery()
            for layer_table in (LayerVectorsRow, LayerSummaryRow):
                session.execute(delete(layer_table).where(layer_table.series_id.in_(series)))
            for table in (StepPointRow, EpochPointRow, LayerSeriesRow, LogLineRow, JobEventRow, IdempotencyKeyRow):
                session.execute(delete(table).where(table.job_id == job_id))
            session.execute(delete(JobRow).where(JobRow.id == job_id))
        with self._latest_lock:
            self._latest_event.pop(job_id, None)
        self._series_cache.pop(job_id, None)
        return True

    # -- studies --------------------------------------------------------------------------------------------

    def create_study(
        self,
        study_id: str,
        spec: dict[str, Any],
        trials: Sequence[tuple[str, int, int, dict[str, Any]]],
        *,
        owner: str = DEFAULT_OWNER,
    ) -> tuple[StudyRow, list[JobRow]]:
        """Insert a study of `owner` and its trials, queued jobs given as (job id, arm, seed, job spec), in ONE
        transaction: a study is never half-created, and its trials enter the queue together, in the given order.

        Returns:
            (study, trial jobs in the given order).
        """
        now = utcnow()
        with self._write() as session:
            study = StudyRow(
                id=study_id,
                owner=owner,
                name=spec.get("name"),
                spec=json_safe(spec),
                created_at=now,
                cancel_requested=False,
            )
            session.add(study)
            jobs = []
            for job_id, arm, seed, job_spec in trials:
                job = _queued_job_row(job_id, owner, job_spec, now, study_id=study_id, study_arm=arm, study_seed=seed)
                session.add(job)
                jobs.append(job)
            session.flush()
            for job in jobs:
                self._add_event(session, job, "status", self._status_data(job, None, now), now)
                message = (
                    f"job submitted and queued (trial of study {study_id}: arm {job.study_arm}, seed {job.study_seed})"
                )
                self._add_log(session, job, "info", message, "service", now)
            session.flush()
        for job in jobs:
            self._note_event(job.id, job.event_seq)
        return study, jobs

    def get_study(self, study_id: str) -> StudyRow | None:
        """The study with this id, or None."""
        with self._read() as session:
            return session.scalars(select(StudyRow).where(StudyRow.id == study_id)).first()

    def list_studies(self, *, offset: int = 0, limit: int = 50, owner: str | None = None) -> tuple[list[StudyRow], int]:
        """One page of studies, newest first, of one owner (None: everyone's); and how many there are in total."""
        query = select(StudyRow)
        count_query = select(func.count()).select_from(StudyRow)
        if owner is not None:
            query = query.where(StudyRow.owner == owner)
            count_query = count_query.where(StudyRow.owner == owner)
        with self._read() as session:
            rows = list(session.scalars(query.order_by(StudyRow.number.desc()).offset(offset).limit(limit)))
            count = session.scalar(count_query) or 0
        return rows, count

    def study_trials(self, study_id: str) -> list[JobRow]:
        """The trial jobs of a study still in the store, in the order they were created (seed by seed, arm by arm)."""
        with self._read() as session:
            query = select(JobRow).where(JobRow.study_id == study_id).order_by(JobRow.number)
            return list(session.scalars(query))

    def mark_study_cancel_requested(self, study_id: str) -> StudyRow | None:
        """Record that a study was cancelled (its trials are cancelled by the manager); None if there is no study."""
        with self._write() as session:
            study = session.scalars(select(StudyRow).where(StudyRow.id == study_id).with_for_update()).first()
            if study is not None:
                study.cancel_requested = True
        return study

    def mark_study_stopped_early(self, study_id: str, paired_seeds: int) -> bool:
        """Record that a study settled early (with `paired_seeds` pairs in its verdict); True if this call recorded
        it, False when it was already stopped early, cancelled, or is gone (so only one caller cancels its trials)."""
        with self._write() as session:
            study = session.scalars(select(StudyRow).where(StudyRow.id == study_id).with_for_update()).first()
            if study is None or study.cancel_requested or study.stopped_early_at is not None:
                return False
            study.stopped_early_at = utcnow()
            study.stopped_early_pairs = paired_seeds
        return True

    def studies_with_queued_trials(self) -> list[StudyRow]:
        """The studies that still hold a queued trial, oldest first (what a new leader checks for early stops)."""
        queued = select(JobRow.study_id).where(JobRow.study_id.is_not(None), JobRow.status == "queued").distinct()
        with self._read() as session:
            return list(session.scalars(select(StudyRow).where(StudyRow.id.in_(queued)).order_by(StudyRow.number)))

    def status_events(self, job_ids: Sequence[str]) -> list[JobEventRow]:
        """The `status` events of these jobs (a handful per job), oldest first: a study's event stream."""
        if not job_ids:
            return []
        query = (
            select(JobEventRow)
            .where(JobEventRow.job_id.in_(list(job_ids)), JobEventRow.kind == "status")
            .order_by(JobEventRow.created_at, JobEventRow.id)
        )
        with self._read() as session:
            return list(session.scalars(query))

    def trial_results(self, job_ids: Sequence[str]) -> dict[str, TrialResult]:
        """Per job: the best validation accuracy and lowest validation loss of its epochs, and the mean samples/s
        of its steps (two aggregate queries, whatever the number of trials)."""
        if not job_ids:
            return {}
        ids = list(job_ids)
        with self._read() as session:
            epochs = session.execute(
                select(EpochPointRow.job_id, func.max(EpochPointRow.val_acc), func.min(EpochPointRow.val_loss))
                .where(EpochPointRow.job_id.in_(ids))
                .group_by(EpochPointRow.job_id)
            ).all()
            steps = session.execute(
                select(StepPointRow.job_id, func.avg(StepPointRow.samples_per_s))
                .where(StepPointRow.job_id.in_(ids))
                .group_by(StepPointRow.job_id)
            ).all()
        best = {job_id: (_number(acc), _number(loss)) for job_id, acc, loss in epochs}
        speed = {job_id: _number(value) for job_id, value in steps}
        return {
            job_id: TrialResult(best.get(job_id, (None, None))[0], best.get(job_id, (None, None))[1], speed.get(job_id))
            for job_id in ids
        }

    # -- run records ----------------------------------------------------------------------------------------

    def ingest(self, job_id: str, records: Sequence[dict[str, Any]]) -> IngestResult:
        """Store a batch of run records (see `service.engine.runner.JobRun.poll`) in one transaction.

        Records whose `seq` is not above the job's cursor were stored before and are skipped, so polling
        again after a crash or a re-attach never duplicates anything. An `end` record moves a running job to
        its final state (a job whose cancellation was requested ends as cancelled unless it succeeded).
        """
        now = utcnow()
        with self._write() as session:
            job = self._lock_job(session, job_id)
            if job is None:
                return IngestResult(record_seq=0, event_seq=0)
            result = IngestResult(record_seq=job.record_seq, event_seq=job.event_seq)
            layers = _LayerIngest()
            session.info["layers"] = layers
            for record in sorted(records, key=lambda r: _integer(r.get("seq"))):
                seq = _integer(record.get("seq"))
                if seq <= job.record_seq:
                    continue
                job.record_seq = seq
                kind = record.get("kind")
                handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
                if handler is None:
                    result.skipped_kinds.append(str(kind))
                    continue
                ended = handler(self, session, job, record, now)
                result.stored += 1
                if ended is not None:
                    result.ended = ended
            if layers.reference is not None:
                # Once per batch: the rule keeps at most `stats_keep` snapshots after it, whatever the batch held.
                self._apply_retention(session, job, list(layers.series.values()), layers.reference)
            result.record_seq = job.record_seq
            result.event_seq = job.event_seq
        if result.ended is not None:
            self._series_cache.pop(job_id, None)  # no layers come after the end: keep the cache to running jobs
        elif layers.series is not None:
            self._series_cache[job_id] = layers.series  # committed: ids that later batches may use
        self._note_event(job_id, result.event_seq)
        return result

    def _ingest_step(self, session: Session, job: JobRow, record: dict[str, Any], now: datetime) -> None:
        point = StepPointRow(
            job_id=job.id,
            step=_integer(record.get("step")),
            epoch=_integer(record.get("epoch")),
            train_loss=_number(record.get("train_loss")),
            lr=_number(record.get("lr")),
            samples_per_s=_number(record.get("samples_per_s")),
            step_time_s=_number(record.get("step_time_s")),
        )
        session.add(point)
        job.last_step = point.step
        self._add_event(session, job, "step", _point_dict(point, StepPointRow), now)

    def _ingest_epoch(self, session: Session, job: JobRow, record: dict[str, Any], now: datetime) -> None:
        point = EpochPointRow(
            job_id=job.id,
            epoch=_integer(record.get("epoch")),
            step=_integer(record.get("step")),
            train_loss=_number(record.get("train_loss")),
            train_acc=_number(record.get("train_acc")),
            val_loss=_number(record.get("val_loss")),
            val_acc=_number(record.get("val_acc")),
            val_loss_precise=_number(record.get("val_loss_precise")),
            val_acc_precise=_number(record.get("val_acc_precise")),
            epoch_time_s=_number(record.get("epoch_time_s")),
        )
        session.add(point)
        job.epochs_done = max(job.epochs_done, point.epoch)  # epochs are numbered from 1
        if point.val_acc is not None:
            job.last_val_acc = point.val_acc
            job.best_val_acc = max(job.best_val_acc or point.val_acc, point.val_acc)
        if point.train_loss is not None:
            job.final_train_loss = point.train_loss
        self._add_event(session, job, "epoch", _point_dict(point, EpochPointRow), now)

    def _ingest_layers(self, session: Session, job: JobRow, record: dict[str, Any], now: datetime) -> None:
        """Store one recorded step's layers: a narrow summary each, the float32 vectors, then apply retention.

        `record["vectors"]` maps a layer to its float32 block (`layer_codec.encode_vectors`); a layer dict that
        carries the per-channel lists itself (records of the JSON era) is converted. The SSE event only names
        the step: `events()` fills in the summaries from the table when it is read.
        """
        step, epoch = _integer(record.get("step")), _integer(record.get("epoch"))
        layers = record.get("layers")
        if not isinstance(layers, dict):
            return
        vectors = record.get("vectors") if isinstance(record.get("vectors"), dict) else {}
        state: _LayerIngest = session.info["layers"]
        if state.series is None:
            cached = self._series_cache.get(job.id)
            state.series = dict(cached) if cached is not None else self._series(session, job.id)
        series = state.series
        summaries, blocks = [], []
        for raw_name, stats in layers.items():
            if not isinstance(stats, dict):
                continue
            name = str(raw_name)[:300]
            block = vectors.get(raw_name)
            block = block if isinstance(block, bytes) else vectors_from_lists(stats)
            channels = _integer(stats.get("channels"), default=len(block) // 16 if block else 0)
            series_id = series.get(name)
            if series_id is None:
                known = self._series(session, job.id)  # another writer (a former leader) may have added it
                series_id = known.get(name)
                if series_id is None:
                    row = LayerSeriesRow(job_id=job.id, position=len(known), layer=name, channels=channels)
                    session.add(row)
                    session.flush()
                    series_id = row.id
                series.update(known)
                series[name] = series_id
            summaries.append({"series_id": series_id, "step": step, "epoch": epoch, "summary": encode_summary(stats)})
            if block:
                blocks.append({"series_id": series_id, "step": step, "vectors": block})
        if summaries:
            ids = [row["series_id"] for row in summaries]
            if state.last_step is None:
                state.last_step = session.scalar(
                    select(func.max(LayerSummaryRow.step)).where(LayerSummaryRow.series_id.in_(ids))
                )
            if state.last_step is not None and step <= state.last_step:
                # A step recorded again (a resumed run that bypassed the record log's de-duplication): latest wins.
                for table in (LayerSummaryRow, LayerVectorsRow):
                    session.execute(delete(table).where(table.series_id.in_(ids), table.step == step))
            state.last_step = step if state.last_step is None else max(state.last_step, step)
            session.execute(insert(LayerSummaryRow.__table__), summaries)
            if blocks:
                session.execute(insert(LayerVectorsRow.__table__), blocks)
                state.reference = blocks[0]["series_id"]
        self._add_event(session, job, "layers", {"step": step, "epoch": epoch}, now)

    @staticmethod
    def _series(session: Session, job_id: str) -> dict[str, int]:
        rows = session.execute(
            select(LayerSeriesRow.layer, LayerSeriesRow.id)
            .where(LayerSeriesRow.job_id == job_id)
            .order_by(LayerSeriesRow.position)
        )
        return {name: series_id for name, series_id in rows}

    def _apply_retention(self, session: Session, job: JobRow, series_ids: list[int], reference: int) -> None:
        """Drop the per-channel vectors the retention rule no longer keeps (at most `stats_keep` steps).

        A record writes the vectors of all its layers at its step, so the steps of one layer (`reference`, one
        written just now) are the job's snapshots. Reading them from one series keeps this cheap: the table is
        clustered by (series, step) with the blobs inline, and a DISTINCT over every layer read all their pages
        (19 of the 35 ms an ingest took with 40 layers x 256 kept snapshots).
        """
        keep = self.stats_keep_of(job.spec)
        steps = list(session.scalars(select(LayerVectorsRow.step).where(LayerVectorsRow.series_id == reference)))
        if len(steps) <= keep:
            return
        dropped = sorted(set(steps) - set(snapshots_to_keep(steps, keep)))
        session.execute(
            delete(LayerVectorsRow).where(LayerVectorsRow.series_id.in_(series_ids), LayerVectorsRow.step.in_(dropped))
        )

    def stats_keep_of(self, spec: Any) -> int:
        """Per-channel snapshots kept per layer for a job: its spec's `stats_keep`, else the store's default."""
        value = spec.get("stats_keep") if isinstance(spec, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 2 else self.stats_keep

    def _ingest_log(self, session: Session, job: JobRow, record: dict[str, Any], now: datetime) -> None:
        level = str(record.get("level") or "info").lower()[:16]
        self._add_log(session, job, level, str(record.get("message", "")), "run", now)

    def _ingest_end(self, session: Session, job: JobRow, record: dict[str, Any], now: datetime) -> JobStatus | None:
        try:
            target = JobStatus(record.get("status"))
        except ValueError:
            target = JobStatus.FAILED
            record = {**record, "error": f"the run ended with an unknown status {record.get('status')!r}"}
        if not target.is_terminal:
            target = JobStatus.FAILED
        if job.cancel_requested and target is not JobStatus.SUCCEEDED:
            target = JobStatus.CANCELLED
        if not JobStatus(job.status).can_become(target):
            return None
        previous = job.status
        job.status = target.value
        job.finished_at = now
        error = record.get("error")
        if target is JobStatus.FAILED:
            job.error = str(error) if error else "the run failed without giving a reason"
        elif target is JobStatus.CANCELLED:
            job.error = "cancelled on request"
        verdict = record.get("verdict")
        job.verdict = str(verdict)[:16] if verdict else None
        epochs_done = record.get("epochs_done")
        if isinstance(epochs_done, int) and not isinstance(epochs_done, bool):
            job.epochs_done = epochs_done
        for name in ("best_val_acc", "final_val_acc", "final_val_acc_precise", "final_train_loss"):
            value = _number(record.get(name))
            if value is not None:
                setattr(job, name, value)
        warning = record.get("warning")
        job.warning = str(warning) if warning else None
        if job.final_val_acc is not None:
            job.last_val_acc = job.final_val_acc
        model_path = record.get("model_path")
        job.model_path = str(model_path) if model_path else None
        data = self._status_data(job, previous, now)
        timeline = record.get("timeline")
        if isinstance(timeline, dict):
            # When the run's start-up and wrap-up steps happened (service.engine.timeline); `at` is when it was stored.
            data["timeline"] = timeline
        self._add_event(session, job, "status", data, now)
        summary = f"job {target.value}" + (f": {job.error}" if target is JobStatus.FAILED else "")
        self._add_log(session, job, "error" if target is JobStatus.FAILED else "info", summary, "service", now)
        return target

    # -- queries --------------------------------------------------------------------------------------------

    def metrics(
        self, job_id: str, *, since_step: int | None = None, limit: int = 10_000
    ) -> tuple[list[StepPointRow], list[EpochPointRow]]:
        """Step points and epoch points with `step > since_step` (all when None), in step order."""
        steps = select(StepPointRow).where(StepPointRow.job_id == job_id)
        epochs = select(EpochPointRow).where(EpochPointRow.job_id == job_id)
        if since_step is not None:
            steps = steps.where(StepPointRow.step > since_step)
            epochs = epochs.where(EpochPointRow.step > since_step)
        with self._read() as session:
            step_rows = list(session.scalars(steps.order_by(StepPointRow.step, StepPointRow.id).limit(limit)))
            epoch_rows = list(session.scalars(epochs.order_by(EpochPointRow.epoch, EpochPointRow.id).limit(limit)))
        return step_rows, epoch_rows

    def _series_rows(self, session: Session, job_id: str) -> list[LayerSeriesRow]:
        query = select(LayerSeriesRow).where(LayerSeriesRow.job_id == job_id).order_by(LayerSeriesRow.position)
        return list(session.scalars(query))

    @staticmethod
    def _steps_of(session: Session, series_ids: list[int], table: Any) -> list[int]:
        if not series_ids:
            return []
        # Every layer is recorded at the same steps: the first layer's steps are the job's (an index range scan).
        query = select(table.step).where(table.series_id == series_ids[0]).order_by(table.step)
        return list(session.scalars(query))

    def layer_steps(self, job_id: str) -> list[int]:
        """Steps at which layer statistics were recorded, ascending."""
        with self._read() as session:
            return self._steps_of(session, [r.id for r in self._series_rows(session, job_id)], LayerSummaryRow)

    def kept_steps(self, job_id: str) -> list[int]:
        """Recorded steps whose per-channel vectors are still kept (see `service.store.retention`), ascending."""
        with self._read() as session:
            return self._steps_of(session, [r.id for r in self._series_rows(session, job_id)], LayerVectorsRow)

    def layers_at(self, job_id: str, step: int | None, *, channels: bool = True, arrays: bool = False) -> LayersAtStep:
        """Every layer's statistics at the recorded step nearest `step` (the latest when None), in model order.

        With `channels`, the nearest step that still keeps its per-channel vectors, which are included: as lists
        of floats, or with `arrays` as float32 numpy arrays (NaN kept; `layer_codec.decode_vector_arrays`).
        """
        with self._read() as session:
            series = self._series_rows(session, job_id)
            ids = [r.id for r in series]
            recorded = self._steps_of(session, ids, LayerSummaryRow)
            kept = self._steps_of(session, ids, LayerVectorsRow)
            if step is None:
                chosen = recorded[-1] if recorded else None
            else:
                chosen = nearest(kept if channels and kept else recorded, step)
            result = LayersAtStep(None, None, step, {}, recorded, kept)
            if chosen is None:
                return result
            summaries = session.execute(
                select(LayerSummaryRow.series_id, LayerSummaryRow.epoch, LayerSummaryRow.summary).where(
                    LayerSummaryRow.series_id.in_(ids), LayerSummaryRow.step == chosen
                )
            ).all()
            blocks: dict[int, bytes] = {}
            if channels:
                query = select(LayerVectorsRow.series_id, LayerVectorsRow.vectors).where(
                    LayerVectorsRow.series_id.in_(ids), LayerVectorsRow.step == chosen
                )
                blocks = dict(session.execute(query).all())
        by_id = {series_id: (epoch, blob) for series_id, epoch, blob in summaries}
        result.step = chosen
        for row in series:
            if row.id not in by_id:
                continue
            epoch, blob = by_id[row.id]
            result.epoch = epoch
            stats = decode_summary(blob, row.channels)
            if row.id in blocks:
                stats |= decode_vector_arrays(blocks[row.id]) if arrays else decode_vectors(blocks[row.id])
            result.layers[row.layer] = stats
        return result

    def layer_matrix(self, job_id: str, keys: Sequence[str], *, max_steps: int) -> LayerMatrix:
        """`keys` (summary statistics) of every layer (model order) at the recorded steps, downsampled evenly to
        `max_steps`: what the dashboard's heatmap draws.

        Built for 40 layers x 500 steps in a few tens of milliseconds: the rows are read with a Core query (the
        ORM's per-row work cost more than the query), only their float32 parts are decoded, in one numpy pass,
        and they are placed in the matrix by array indexing rather than row by row.

        Raises:
            ValueError: a key that is not a summary statistic (`layer_codec.SUMMARY_FIELDS`).
        """
        unknown = [key for key in keys if key not in SUMMARY_FIELDS]
        if unknown:
            raise ValueError(f"unknown statistics {unknown}: expected some of {', '.join(SUMMARY_FIELDS)}")
        with self._read() as session:
            series = self._series_rows(session, job_id)
            ids = [row.id for row in series]
            connection = session.connection()
            # Every layer is recorded at the same steps: the first layer's rows give the steps and their epochs.
            recorded = (
                connection.execute(
                    select(LayerSummaryRow.step, LayerSummaryRow.epoch)
                    .where(LayerSummaryRow.series_id == ids[0])
                    .order_by(LayerSummaryRow.step)
                ).all()
                if ids
                else []
            )
            picked = [recorded[i] for i in downsample(len(recorded), max_steps)] if recorded else []
            chosen = [step for step, _ in picked]
            query = select(LayerSummaryRow.series_id, LayerSummaryRow.step, LayerSummaryRow.summary).where(
                LayerSummaryRow.series_id.in_(ids)
            )
            rows = []
            if len(chosen) == len(recorded):
                rows = connection.execute(query).all() if chosen else []
            else:
                for start in range(0, len(chosen), 1000):
                    part = query.where(LayerSummaryRow.step.in_(chosen[start : start + 1000]))
                    rows += connection.execute(part).all()
        # Row and column of every row read: layers by their series id, steps by their place among `chosen`.
        grid = np.full((len(keys), len(series), len(chosen)), np.nan)
        if rows:
            series_ids, steps, blobs = zip(*rows, strict=True)
            by_id = {series_id: position for position, series_id in enumerate(ids)}
            layer = np.array([by_id[series_id] for series_id in series_ids], dtype=np.intp)
            columns = np.array(chosen, dtype=np.int64)
            steps_read = np.array(steps, dtype=np.int64)
            column = np.minimum(np.searchsorted(columns, steps_read), len(chosen) - 1)
            shown = columns[column] == steps_read  # a step the first layer lacks is not a column
            table = summary_columns(list(blobs), list(keys))  # (rows, keys), NaN for "none"
            grid[:, layer[shown], column[shown]] = table[shown].T
        values = {}
        for index, key in enumerate(keys):
            cells = grid[index].astype(object)  # Python floats, as the other layer routes serve them
            cells[~np.isfinite(grid[index])] = None
            values[key] = cells.tolist()
        epochs = [epoch for _, epoch in picked]
        return LayerMatrix([row.layer for row in series], chosen, epochs, len(recorded), values)

    def layer_names(self, job_id: str) -> list[str]:
        """Names (module paths) of the layers with recorded statistics, sorted."""
        with self._read() as session:
            return sorted(row.layer for row in self._series_rows(session, job_id))

    def layer_history(
        self,
        job_id: str,
        layer: str,
        *,
        since_step: int | None = None,
        limit: int = 10_000,
        max_points: int | None = None,
        channels: bool = True,
        arrays: bool = False,
    ) -> LayerHistory | None:
        """One layer's series after `since_step` (the first `limit` steps), downsampled to `max_points`.

        Without `channels`: the summaries of every recorded step; with `channels`: the kept snapshots, each with
        its per-channel lists (with `arrays`: float32 numpy arrays, NaN kept). None when the job has no such layer.
        """
        with self._read() as session:
            row = session.scalars(
                select(LayerSeriesRow).where(LayerSeriesRow.job_id == job_id, LayerSeriesRow.layer == layer)
            ).first()
            if row is None:
                return None
            table = LayerVectorsRow if channels else LayerSummaryRow
            query = select(table.step).where(table.series_id == row.id)
            if since_step is not None:
                query = query.where(table.step > since_step)
            steps = list(session.scalars(query.order_by(table.step).limit(limit)))
            chosen = [steps[i] for i in downsample(len(steps), max_points or len(steps) or 1)]
            summaries = {
                step: (epoch, blob)
                for step, epoch, blob in session.execute(
                    select(LayerSummaryRow.step, LayerSummaryRow.epoch, LayerSummaryRow.summary).where(
                        LayerSummaryRow.series_id == row.id, LayerSummaryRow.step.in_(chosen)
                    )
                )
            }
            blocks: dict[int, bytes] = {}
            if channels:
                query = select(LayerVectorsRow.step, LayerVectorsRow.vectors).where(
                    LayerVectorsRow.series_id == row.id, LayerVectorsRow.step.in_(chosen)
                )
                blocks = dict(session.execute(query).all())
        points = []
        for step in chosen:
            if step not in summaries:
                continue
            epoch, blob = summaries[step]
            stats = decode_summary(blob, row.channels)
            if step in blocks:
                stats |= decode_vector_arrays(blocks[step]) if arrays else decode_vectors(blocks[step])
            points.append(LayerPointData(step=step, epoch=epoch, stats=stats))
        return LayerHistory(points=points, available=len(steps))

    def layer_storage_bytes(self, job_id: str) -> dict[str, int]:
        """Bytes of binary payload a job's layer statistics hold: `summaries`, `vectors`, and row counts."""
        with self._read() as session:
            ids = select(LayerSeriesRow.id).where(LayerSeriesRow.job_id == job_id).scalar_subquery()
            out: dict[str, int] = {}
            for name, table, column in (
                ("summaries", LayerSummaryRow, LayerSummaryRow.summary),
                ("vectors", LayerVectorsRow, LayerVectorsRow.vectors),
            ):
                count, size = session.execute(
                    select(func.count(), func.coalesce(func.sum(func.length(column)), 0)).where(
                        table.series_id.in_(ids)
                    )
                ).one()
                out[f"{name}_rows"], out[f"{name}_bytes"] = int(count), int(size)
            return out

    def logs(self, job_id: str, *, after: int = 0, limit: int = 1000) -> list[LogLineRow]:
        """Log lines with `seq > after`, oldest first."""
        query = select(LogLineRow).where(LogLineRow.job_id == job_id, LogLineRow.seq > after)
        with self._read() as session:
            return list(session.scalars(query.order_by(LogLineRow.seq).limit(limit)))

    def events(
        self, job_id: str, *, after: int = 0, limit: int = 500, layers_after_step: int | None = None
    ) -> list[JobEventRow]:
        """Events with `seq > after`, in order (the SSE stream's source).

        A `layers` event is stored as its step only; its `layers` summaries are read from `layer_summaries`
        here, one query per batch of events (events stored before that change carry them inline). With
        `layers_after_step`, `layers` events of earlier steps are left bare (the caller skips them).
        """
        query = select(JobEventRow).where(JobEventRow.job_id == job_id, JobEventRow.seq > after)
        with self._read() as session:
            rows = list(session.scalars(query.order_by(JobEventRow.seq).limit(limit)))
            bare = [
                r
                for r in rows
                if r.kind == "layers"
                and isinstance(r.data, dict)
                and "layers" not in r.data
                and (layers_after_step is None or _integer(r.data.get("step")) > layers_after_step)
            ]
            if not bare:
                return rows
            series = self._series_rows(session, job_id)
            names = {row.id: (row.layer, row.channels) for row in series}
            steps = sorted({_integer(r.data.get("step")) for r in bare})
            found: dict[int, dict[str, Any]] = {step: {} for step in steps}
            for chunk in range(0, len(steps), 500):
                query = (
                    select(LayerSummaryRow.series_id, LayerSummaryRow.step, LayerSummaryRow.summary)
                    .where(LayerSummaryRow.series_id.in_(list(names)))
                    .where(LayerSummaryRow.step.in_(steps[chunk : chunk + 500]))
                    .order_by(LayerSummaryRow.step, LayerSummaryRow.series_id)
                )
                for series_id, step, blob in session.execute(query):
                    name, channels = names[series_id]
                    found[step][name] = decode_summary(blob, channels)
        order = {row.layer: row.position for row in series}
        for row in bare:
            layers = found.get(_integer(row.data.get("step")), {})
            row.data = {**row.data, "layers": dict(sorted(layers.items(), key=lambda item: order[item[0]]))}
        return rows

    def last_event_seq(self, job_id: str) -> int:
        """The newest event id of a job in the database (0 if none)."""
        with self._read() as session:
            return session.scalar(select(JobRow.event_seq).where(JobRow.id == job_id)) or 0


@dataclass
class _LayerIngest:
    """What one `ingest` transaction learns about a job's layers: its series (name -> id), the newest recorded
    step (so a new step skips the delete of a re-recorded one), and a series it wrote vectors of (the reference
    of the retention that then runs at the end; None when it wrote none)."""

    series: dict[str, int] | None = None
    last_step: int | None = None
    reference: int | None = None


_HANDLERS = {
    "step": JobStore._ingest_step,
    "epoch": JobStore._ingest_epoch,
    "layers": JobStore._ingest_layers,
    "log": JobStore._ingest_log,
    "end": JobStore._ingest_end,
}


def _point_dict(point: Any, model: Any) -> dict[str, Any]:
    """The public fields of a metric point (its table's columns minus id and job_id)."""
    return {
        column.name: getattr(point, column.name)
        for column in model.__table__.columns
        if column.name not in ("id", "job_id")
    }
