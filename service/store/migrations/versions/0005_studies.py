"""Studies: a row per study, and each trial job pointing at its study, arm and seed.

- `studies`: one row per study (owner, optional name, the StudySpec as JSON, created_at, cancel_requested).
  A study keeps no status, verdict or cursor of its own: they are derived when read from its trials, which are
  ordinary jobs, so nothing about a study needs to survive a restart but the jobs themselves.
- `jobs.study_id` (indexed), `jobs.study_arm`, `jobs.study_seed`: null for a job that is not a trial. The rows
  already there are plain jobs and stay so.

`jobs` gains nullable columns in place on both dialects (never copied: on SQLite a copy would cascade-delete the
rows that reference a job). No foreign key from `jobs.study_id` to `studies`: adding one on SQLite would need that
copy; the repository creates a study and its trials in one transaction instead.

Revision ID: 0005_studies
Revises: 0004_precise_bn
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_studies"
down_revision = "0004_precise_bn"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("number", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False, server_default="default"),
        sa.Column("name", sa.String(100), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("number"),
    )
    op.create_index("ix_studies_id", "studies", ["id"], unique=True)
    op.create_index("ix_studies_owner", "studies", ["owner"], unique=False)
    op.add_column("jobs", sa.Column("study_id", sa.String(32), nullable=True))
    op.add_column("jobs", sa.Column("study_arm", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("study_seed", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_study_id", "jobs", ["study_id"], unique=False)


def downgrade() -> None:
    # SQLite >= 3.35 drops a column in place (Alembic's batch mode would copy `jobs`; see 0002_job_owner).
    op.drop_index("ix_jobs_study_id", table_name="jobs")
    for column in ("study_seed", "study_arm", "study_id"):
        op.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    op.drop_index("ix_studies_owner", table_name="studies")
    op.drop_index("ix_studies_id", table_name="studies")
    op.drop_table("studies")
