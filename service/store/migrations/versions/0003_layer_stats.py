"""Per-layer statistics in binary: narrow summaries, float32 vectors with retention, JSON rows converted.

`layer_stats` (one JSON document per layer and recorded step, ~90 bytes per channel) becomes three tables:
`layer_series` (job, layer, its place in the model and channel count), `layer_summaries` (the scalars as float32
binary for every recorded step) and `layer_vectors` (the per-channel vectors as float32 binary; bounded per job
by `stats_keep` for snapshots recorded from now on). Every existing row is converted, job by job, so no job loses
its statistics (vectors included: the retention rule only drops snapshots as new ones arrive). Downgrading writes
the JSON rows back from what the new tables hold.

The binary forms are those of `service.store.layer_codec`, whose layouts are part of the schema: they only ever
gain fields at the end of a summary's float32 part in a later revision.

Revision ID: 0003_layer_stats
Revises: 0002_job_owner
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

from service.store.layer_codec import decode_summary, decode_vectors, encode_summary, vectors_from_lists

revision = "0003_layer_stats"
down_revision = "0002_job_owner"
branch_labels = None
depends_on = None

#: Rows converted per round trip (bounded memory for databases with millions of layer rows).
_CHUNK = 2000

_OLD = sa.table(
    "layer_stats",
    sa.column("id", sa.Integer),
    sa.column("job_id", sa.String),
    sa.column("step", sa.Integer),
    sa.column("epoch", sa.Integer),
    sa.column("layer", sa.String),
    sa.column("stats", sa.JSON),
)
_SERIES = sa.table(
    "layer_series",
    sa.column("id", sa.Integer),
    sa.column("job_id", sa.String),
    sa.column("position", sa.Integer),
    sa.column("layer", sa.String),
    sa.column("channels", sa.Integer),
)
_SUMMARIES = sa.table(
    "layer_summaries",
    sa.column("series_id", sa.Integer),
    sa.column("step", sa.Integer),
    sa.column("epoch", sa.Integer),
    sa.column("summary", sa.LargeBinary),
)
_VECTORS = sa.table(
    "layer_vectors",
    sa.column("series_id", sa.Integer),
    sa.column("step", sa.Integer),
    sa.column("vectors", sa.LargeBinary),
)


def _create_new_tables() -> None:
    op.create_table(
        "layer_series",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("layer", sa.String(300), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "layer", name="uq_layer_series_job_layer"),
    )
    for name, payload in (("layer_summaries", "summary"), ("layer_vectors", "vectors")):
        columns = [
            sa.Column("series_id", sa.Integer(), nullable=False),
            sa.Column("step", sa.Integer(), autoincrement=False, nullable=False),
        ]
        if name == "layer_summaries":
            columns.append(sa.Column("epoch", sa.Integer(), nullable=False))
        op.create_table(
            name,
            *columns,
            sa.Column(payload, sa.LargeBinary(), nullable=False),
            sa.ForeignKeyConstraint(["series_id"], ["layer_series.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("series_id", "step"),
            sqlite_with_rowid=False,
        )


def _stats_of(row: Any) -> dict[str, Any]:
    stats = json.loads(row.stats) if isinstance(row.stats, str) else row.stats
    return stats if isinstance(stats, dict) else {}


def _convert_job(connection: sa.Connection, job_id: str, rows: list[Any]) -> None:
    """Write one job's JSON layer rows (in id order) as series, summaries and vectors; the latest row of a
    (layer, step) wins, as it did when reading the JSON rows."""
    latest: dict[tuple[str, int], Any] = {}
    channels: dict[str, int] = {}  # first appearance order is the model's order
    for row in rows:
        name = str(row.layer)[:300]
        stats = _stats_of(row)
        if name not in channels:
            mean = stats.get("mean")
            channels[name] = len(mean) if isinstance(mean, list) else 0
        latest[(name, int(row.step))] = (row, stats)
    series: dict[str, int] = {}
    for position, (name, count) in enumerate(channels.items()):
        insert = sa.insert(_SERIES).values(job_id=job_id, position=position, layer=name, channels=count)
        series[name] = connection.execute(insert.returning(_SERIES.c.id)).scalar_one()
    summaries, vectors = [], []
    for (name, step), (row, stats) in latest.items():
        summaries.append(
            {"series_id": series[name], "step": step, "epoch": int(row.epoch), "summary": encode_summary(stats)}
        )
        block = vectors_from_lists(stats)
        if block is not None:
            vectors.append({"series_id": series[name], "step": step, "vectors": block})
    for start in range(0, len(summaries), _CHUNK):
        connection.execute(sa.insert(_SUMMARIES), summaries[start : start + _CHUNK])
    for start in range(0, len(vectors), _CHUNK):
        connection.execute(sa.insert(_VECTORS), vectors[start : start + _CHUNK])


def upgrade() -> None:
    _create_new_tables()
    connection = op.get_bind()
    job_ids = connection.execute(sa.select(_OLD.c.job_id).distinct().order_by(_OLD.c.job_id)).scalars().all()
    for job_id in job_ids:  # one job at a time: memory bounded by the largest job, not the database
        rows = connection.execute(sa.select(_OLD).where(_OLD.c.job_id == job_id).order_by(_OLD.c.id)).all()
        _convert_job(connection, job_id, rows)
    op.drop_index("ix_layer_stats_job_layer_step", table_name="layer_stats")
    op.drop_index("ix_layer_stats_job_step", table_name="layer_stats")
    op.drop_table("layer_stats")


def downgrade() -> None:
    op.create_table(
        "layer_stats",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("layer", sa.String(300), nullable=False),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_layer_stats_job_step", "layer_stats", ["job_id", "step"], unique=False)
    op.create_index("ix_layer_stats_job_layer_step", "layer_stats", ["job_id", "layer", "step"], unique=False)
    connection = op.get_bind()
    for series in connection.execute(sa.select(_SERIES).order_by(_SERIES.c.job_id, _SERIES.c.position)).all():
        kept = dict(
            connection.execute(
                sa.select(_VECTORS.c.step, _VECTORS.c.vectors).where(_VECTORS.c.series_id == series.id)
            ).all()
        )
        summaries = connection.execute(
            sa.select(_SUMMARIES).where(_SUMMARIES.c.series_id == series.id).order_by(_SUMMARIES.c.step)
        ).all()
        rows = []
        for summary in summaries:
            stats = decode_summary(summary.summary, series.channels)
            if summary.step in kept:
                stats |= decode_vectors(kept[summary.step])
            rows.append(
                {
                    "job_id": series.job_id,
                    "step": summary.step,
                    "epoch": summary.epoch,
                    "layer": series.layer,
                    "stats": stats,
                }
            )
        for start in range(0, len(rows), _CHUNK):
            connection.execute(sa.insert(_OLD), rows[start : start + _CHUNK])
    op.drop_table("layer_vectors")
    op.drop_table("layer_summaries")
    op.drop_table("layer_series")
