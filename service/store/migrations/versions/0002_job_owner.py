"""Jobs record their owner, and idempotency keys are per owner.

- `jobs.owner`: the principal whose token submitted the job (`service.settings`), indexed; the rows already there
  were submitted before jobs had owners, and get the owner "default" (the principal of a bare token, which is what
  every token of 0.1.0 becomes).
- `idempotency_keys`: the primary key becomes (owner, key), so two principals may use the same key for different
  jobs; existing keys belong to "default".

SQLite cannot change a primary key in place, so `idempotency_keys` is copied into a new table, rows included (on
PostgreSQL too, so both keep the same schema).

Revision ID: 0002_job_owner
Revises: 0001_initial
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_job_owner"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

#: The owner of every row written before this revision (kept here, not imported: revisions do not follow the code).
_DEFAULT_OWNER = "default"
_OWNER = sa.String(64)


def _owner_column() -> sa.Column:
    return sa.Column("owner", _OWNER, nullable=False, server_default=_DEFAULT_OWNER)


def _rebuild_idempotency_keys(primary_key: list[str], constraint_name: str, with_owner: bool) -> None:
    """Copy `idempotency_keys` into a table with another primary key (the one way SQLite changes a primary key;
    the same steps on PostgreSQL keep the two dialects' schemas alike)."""
    columns = [
        *([_owner_column()] if with_owner else []),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    ]
    op.create_table(
        "idempotency_keys_next",
        *columns,
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint(*primary_key, name=constraint_name),
    )
    copied = "key, job_id, request_hash, created_at"
    source = f"'{_DEFAULT_OWNER}', {copied}" if with_owner else copied
    target = f"owner, {copied}" if with_owner else copied
    op.execute(f"INSERT INTO idempotency_keys_next ({target}) SELECT {source} FROM idempotency_keys")
    op.drop_index("ix_idempotency_keys_job_id", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.rename_table("idempotency_keys_next", "idempotency_keys")
    op.create_index("ix_idempotency_keys_job_id", "idempotency_keys", ["job_id"], unique=False)


def upgrade() -> None:
    op.add_column("jobs", _owner_column())  # in place on both dialects: `jobs` is never copied (see downgrade)
    op.create_index("ix_jobs_owner", "jobs", ["owner"], unique=False)
    _rebuild_idempotency_keys(["owner", "key"], "idempotency_keys_owner_key_pkey", with_owner=True)


def downgrade() -> None:
    # A key two owners share cannot survive a key-only primary key: the default owner's is kept.
    op.execute(
        f"DELETE FROM idempotency_keys WHERE owner <> '{_DEFAULT_OWNER}' AND key IN "
        f"(SELECT key FROM idempotency_keys WHERE owner = '{_DEFAULT_OWNER}')"
    )
    _rebuild_idempotency_keys(["key"], "idempotency_keys_key_pkey", with_owner=False)
    # Not Alembic's batch mode: on SQLite it would copy `jobs` and drop the original, and with foreign keys on
    # that drop cascades to every row that references a job. SQLite >= 3.35 drops a column in place.
    op.drop_index("ix_jobs_owner", table_name="jobs")
    op.execute("ALTER TABLE jobs DROP COLUMN owner")
