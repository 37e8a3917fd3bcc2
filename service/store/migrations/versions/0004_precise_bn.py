"""Precise BatchNorm results and the running-statistics lag warning.

- `epoch_points.val_loss_precise`, `epoch_points.val_acc_precise`: validation with the BatchNorm running
  statistics recomputed exactly (`precise_bn`); null for the rows already there and for epochs without it.
- `jobs.final_val_acc_precise`: the last of those (what the saved model scores); `jobs.warning`: the summary's
  warning (running statistics lagging the weights), null for the jobs already there.

Added and dropped in place (SQLite >= 3.35 drops a column in place), never through a table copy: dropping a copied
`jobs` would cascade to every row that references a job.

Revision ID: 0004_precise_bn
Revises: 0003_layer_stats
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_precise_bn"
down_revision = "0003_layer_stats"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("epoch_points", "val_loss_precise", sa.Float()),
    ("epoch_points", "val_acc_precise", sa.Float()),
    ("jobs", "final_val_acc_precise", sa.Float()),
    ("jobs", "warning", sa.Text()),
)


def upgrade() -> None:
    for table, column, kind in _COLUMNS:
        op.add_column(table, sa.Column(column, kind, nullable=True))


def downgrade() -> None:
    for table, column, _ in reversed(_COLUMNS):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
