"""Studies that stop early: when a study's verdict settled and its queued trials were cancelled.

- `studies.stopped_early_at` (nullable): set once by the leader when a study with `early_stop` settles; the
  trials still queued then are cancelled. A leader that dies between the two finishes the cancelling after a
  takeover (it looks for studies stopped early that still hold queued trials).
- `studies.stopped_early_pairs` (nullable): how many paired seeds the verdict had at that moment, for the sentence.

Both columns are added in place and are null for the studies already stored (none of them stopped early).

Revision ID: 0006_study_early_stop
Revises: 0005_studies
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_study_early_stop"
down_revision = "0005_studies"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("studies", sa.Column("stopped_early_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("studies", sa.Column("stopped_early_pairs", sa.Integer(), nullable=True))


def downgrade() -> None:
    # SQLite >= 3.35 drops a column in place (see 0005_studies).
    for column in ("stopped_early_pairs", "stopped_early_at"):
        op.execute(f"ALTER TABLE studies DROP COLUMN {column}")
