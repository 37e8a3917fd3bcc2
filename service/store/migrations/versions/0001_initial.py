"""The tables of syncbn 0.1.0: jobs, their metric points, layer statistics, logs, events and idempotency keys.

Exactly what 0.1.0 made with `Base.metadata.create_all` (same columns, types, nullability, indexes and constraint
names), so a 0.1.0 database is stamped at this revision without change. The tables are written out here, not
read from the models, so that this revision keeps creating the 0.1.0 schema when the models move on.

Revision ID: 0001_initial
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

_JOB_ID = sa.String(32)


def _job_fk() -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("number", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", _JOB_ID, nullable=False),
        sa.Column("name", sa.String(100), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("epochs_done", sa.Integer(), nullable=False),
        sa.Column("last_val_acc", sa.Float(), nullable=True),
        sa.Column("best_val_acc", sa.Float(), nullable=True),
        sa.Column("final_val_acc", sa.Float(), nullable=True),
        sa.Column("final_train_loss", sa.Float(), nullable=True),
        sa.Column("last_step", sa.Integer(), nullable=True),
        sa.Column("model_path", sa.Text(), nullable=True),
        sa.Column("record_seq", sa.Integer(), nullable=False),
        sa.Column("event_seq", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("number"),
    )
    op.create_index("ix_jobs_id", "jobs", ["id"], unique=True)
    op.create_index("ix_jobs_status", "jobs", ["status"], unique=False)

    op.create_table(
        "step_points",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", _JOB_ID, nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("lr", sa.Float(), nullable=True),
        sa.Column("samples_per_s", sa.Float(), nullable=True),
        sa.Column("step_time_s", sa.Float(), nullable=True),
        _job_fk(),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_step_points_job_step", "step_points", ["job_id", "step"], unique=False)

    op.create_table(
        "epoch_points",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", _JOB_ID, nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("train_acc", sa.Float(), nullable=True),
        sa.Column("val_loss", sa.Float(), nullable=True),
        sa.Column("val_acc", sa.Float(), nullable=True),
        sa.Column("epoch_time_s", sa.Float(), nullable=True),
        _job_fk(),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_epoch_points_job_epoch", "epoch_points", ["job_id", "epoch"], unique=False)

    op.create_table(
        "layer_stats",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", _JOB_ID, nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("layer", sa.String(300), nullable=False),
        sa.Column("stats", sa.JSON(), nullable=False),
        _job_fk(),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_layer_stats_job_step", "layer_stats", ["job_id", "step"], unique=False)
    op.create_index("ix_layer_stats_job_layer_step", "layer_stats", ["job_id", "layer", "step"], unique=False)

    op.create_table(
        "log_lines",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", _JOB_ID, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        _job_fk(),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_log_lines_job_seq", "log_lines", ["job_id", "seq"], unique=False)

    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", _JOB_ID, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _job_fk(),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),
    )

    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("job_id", _JOB_ID, nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _job_fk(),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index("ix_idempotency_keys_job_id", "idempotency_keys", ["job_id"], unique=False)


def downgrade() -> None:
    for table in ("idempotency_keys", "job_events", "log_lines", "layer_stats", "epoch_points", "step_points"):
        op.drop_table(table)
    op.drop_index("ix_jobs_status", table_name="jobs")
    op.drop_index("ix_jobs_id", table_name="jobs")
    op.drop_table("jobs")
