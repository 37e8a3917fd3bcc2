"""Database tables of the service (SQLAlchemy 2 declarative models; the same schema on SQLite and Postgres).

- `jobs`: one row per submitted job: its owner (the principal whose token submitted it), spec, status,
  timestamps, error, the run's summary and two cursors:
  `record_seq` (last record drained from the run's recorder, so a re-attached run resumes without duplicates)
  and `event_seq` (last event id handed to Server-Sent-Events clients).
- `step_points`, `epoch_points`: the convergence metrics, one row per reported step / finished epoch.
- `layer_series`: one row per (job, BatchNorm layer): the small integer key of the two tables below, the layer's
  place in the model and its channel count.
- `layer_summaries`: one narrow row per (layer, recorded step): the merged scalars as float32 binary
  (`service.store.layer_codec`), kept for every recorded step.
- `layer_vectors`: the per-channel vectors of a kept snapshot as float32 binary, bounded per job by the retention
  rule of `service.store.retention` (`stats_keep` snapshots per layer).
- `log_lines`: progress and error lines of the run and of the service about the job.
- `job_events`: the ordered event log streamed by `GET /v1/jobs/{id}/events`; ids are per job and gap-free,
  which is what makes `Last-Event-ID` resumption lossless, even across restarts.
- `idempotency_keys`: (owner, `Idempotency-Key` header) -> job, with a hash of the request body; each
  principal has its own keys.
- `studies`: one row per study (owner, name, its StudySpec, whether a cancel was asked for); its trials are
  ordinary `jobs` rows carrying `study_id`, `study_arm` and `study_seed`, and its status and verdict are derived
  from them when read (`service.store.study_results`).

Tables reference jobs by their public id; rows of a job are deleted together with it by the repository.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "DEFAULT_OWNER",
    "OWNER_LENGTH",
    "Base",
    "EpochPointRow",
    "IdempotencyKeyRow",
    "JobEventRow",
    "JobRow",
    "LayerSeriesRow",
    "LayerSummaryRow",
    "LayerVectorsRow",
    "LogLineRow",
    "StepPointRow",
    "StudyRow",
]

JOB_ID_LENGTH = 32
#: Longest principal name (see `service.settings.PRINCIPAL_PATTERN`).
OWNER_LENGTH = 64
#: Owner of the jobs submitted before jobs had owners, and of every job submitted with a bare token.
DEFAULT_OWNER = "default"


class Base(DeclarativeBase):
    """Declarative base of the service's tables."""


class JobRow(Base):
    """A job: what was asked (spec), where it is (status), and what came out (summary)."""

    __tablename__ = "jobs"

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(JOB_ID_LENGTH), unique=True, index=True)
    owner: Mapped[str] = mapped_column(
        String(OWNER_LENGTH), index=True, default=DEFAULT_OWNER, server_default=DEFAULT_OWNER
    )
    name: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    verdict: Mapped[str | None] = mapped_column(String(16))
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    last_val_acc: Mapped[float | None] = mapped_column(Float)
    best_val_acc: Mapped[float | None] = mapped_column(Float)
    final_val_acc: Mapped[float | None] = mapped_column(Float)
    final_val_acc_precise: Mapped[float | None] = mapped_column(Float)
    final_train_loss: Mapped[float | None] = mapped_column(Float)
    warning: Mapped[str | None] = mapped_column(Text)
    last_step: Mapped[int | None] = mapped_column(Integer)
    model_path: Mapped[str | None] = mapped_column(Text)
    record_seq: Mapped[int] = mapped_column(Integer, default=0)
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    # A trial of a study: the study, the arm's index in its spec and the seed (all null for a plain job).
    study_id: Mapped[str | None] = mapped_column(String(JOB_ID_LENGTH), index=True)
    study_arm: Mapped[int | None] = mapped_column(Integer)
    study_seed: Mapped[int | None] = mapped_column(Integer)


class StepPointRow(Base):
    """Training metrics of one reported step."""

    __tablename__ = "step_points"
    __table_args__ = (Index("ix_step_points_job_step", "job_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    samples_per_s: Mapped[float | None] = mapped_column(Float)
    step_time_s: Mapped[float | None] = mapped_column(Float)


class EpochPointRow(Base):
    """Training and validation metrics at the end of one epoch."""

    __tablename__ = "epoch_points"
    __table_args__ = (Index("ix_epoch_points_job_epoch", "job_id", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float)
    train_acc: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_acc: Mapped[float | None] = mapped_column(Float)
    val_loss_precise: Mapped[float | None] = mapped_column(Float)
    val_acc_precise: Mapped[float | None] = mapped_column(Float)
    epoch_time_s: Mapped[float | None] = mapped_column(Float)


class LayerSeriesRow(Base):
    """One BatchNorm layer of a job: the key its summaries and vectors are stored under."""

    __tablename__ = "layer_series"
    __table_args__ = (UniqueConstraint("job_id", "layer", name="uq_layer_series_job_layer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    layer: Mapped[str] = mapped_column(String(300))
    channels: Mapped[int] = mapped_column(Integer)


class LayerSummaryRow(Base):
    """The merged scalars of one layer at one recorded step (`service.store.layer_codec.encode_summary`)."""

    __tablename__ = "layer_summaries"
    # The primary key is the row (SQLite WITHOUT ROWID): no second copy of it in a rowid table.
    __table_args__: ClassVar[dict[str, Any]] = {"sqlite_with_rowid": False}

    series_id: Mapped[int] = mapped_column(ForeignKey("layer_series.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    epoch: Mapped[int] = mapped_column(Integer)
    summary: Mapped[bytes] = mapped_column(LargeBinary)


class LayerVectorsRow(Base):
    """The per-channel vectors of one layer at one kept snapshot (`layer_codec.encode_vectors`)."""

    __tablename__ = "layer_vectors"
    __table_args__: ClassVar[dict[str, Any]] = {"sqlite_with_rowid": False}

    series_id: Mapped[int] = mapped_column(ForeignKey("layer_series.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    vectors: Mapped[bytes] = mapped_column(LargeBinary)


class LogLineRow(Base):
    """One log line about a job, from the run (`source="run"`) or from the service (`source="service"`)."""

    __tablename__ = "log_lines"
    __table_args__ = (Index("ix_log_lines_job_seq", "job_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    level: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)


class JobEventRow(Base):
    """One Server-Sent Event of a job; `seq` is the event id, gap-free and increasing per job."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class IdempotencyKeyRow(Base):
    """An `Idempotency-Key` already used, the job it created and a hash of the body it came with."""

    __tablename__ = "idempotency_keys"

    owner: Mapped[str] = mapped_column(
        String(OWNER_LENGTH), primary_key=True, default=DEFAULT_OWNER, server_default=DEFAULT_OWNER
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StudyRow(Base):
    """A study: paired runs of a job spec's arms over the same seeds. Status and verdict are derived, not kept."""

    __tablename__ = "studies"

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(JOB_ID_LENGTH), unique=True, index=True)
    owner: Mapped[str] = mapped_column(
        String(OWNER_LENGTH), index=True, default=DEFAULT_OWNER, server_default=DEFAULT_OWNER
    )
    name: Mapped[str | None] = mapped_column(String(100))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Set by the leader when a study with `early_stop` settled (its queued trials are then cancelled).
    stopped_early_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Paired seeds of the verdict at that moment.
    stopped_early_pairs: Mapped[int | None] = mapped_column(Integer)
