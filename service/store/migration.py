"""The database schema, owned by Alembic: one revision per schema change in `service/store/migrations/versions/`.

- `upgrade_database(engine)`: bring a database to the newest revision this code knows; `JobStore` does it when it
  opens a database, so `syncbn serve` upgrades at start and nothing else creates tables. An empty database gets
  every revision. A database made by syncbn 0.1.0 (the tables of `create_all`, no `alembic_version` table) is
  recognised, stamped at the initial revision (whose tables it has) and upgraded from there, its rows untouched.
  A database at a revision this code does not know was upgraded by a newer syncbn: it is refused with
  `DatabaseNewerThanCodeError`, and left as it is.
- `current_revision`, `revision_history`: what `syncbn db current|history` show.

Alembic is configured in code (the scripts' folder inside this package, the caller's connection), so no
alembic.ini is needed at run time and an installed wheel migrates its database by itself. Revision files are
named by their id ("0001_initial.py"); `alembic_config()` is also what a developer passes to
`alembic.command.revision(config, message, rev_id=..., autogenerate=True)` (with `sqlalchemy.url` set) to write
the next one. On PostgreSQL the check and the upgrade run in one transaction under an advisory lock (its DDL is
transactional), so two services starting together cannot both upgrade, and a failed upgrade leaves nothing half
done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

__all__ = [
    "INITIAL_REVISION",
    "UNVERSIONED",
    "DatabaseNewerThanCodeError",
    "SchemaChange",
    "SchemaError",
    "SchemaRevision",
    "alembic_config",
    "current_revision",
    "head_revision",
    "revision_history",
    "upgrade_database",
]

logger = logging.getLogger(__name__)

#: Folder of env.py and versions/ (shipped as package data).
MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
#: The revision whose tables are exactly those syncbn 0.1.0 made with `Base.metadata.create_all`.
INITIAL_REVISION = "0001_initial"
#: The tables of the 0.1.0 schema: a database holding them without an `alembic_version` table is a 0.1.0 one.
UNVERSIONED_TABLES = frozenset(
    {"jobs", "step_points", "epoch_points", "layer_stats", "log_lines", "job_events", "idempotency_keys"}
)
#: What `current_revision` answers for a 0.1.0 database (its tables, no revision yet).
UNVERSIONED = "unversioned (syncbn 0.1.0)"
#: Key of the PostgreSQL advisory lock held while a database is checked and upgraded ("sbn" + 1).
_ADVISORY_LOCK_KEY = 0x73626E01


class SchemaError(RuntimeError):
    """The database's schema cannot be brought to the one this code needs."""


class DatabaseNewerThanCodeError(SchemaError):
    """The database is at a revision this code does not know: a newer syncbn upgraded it."""

    def __init__(self, url: str, revisions: tuple[str, ...], head: str) -> None:
        shown = ", ".join(repr(r) for r in revisions)
        super().__init__(
            f"the database {url} is at schema revision {shown}, which this syncbn does not know (its newest is "
            f"{head!r}): a newer syncbn upgraded it. Run that newer version, or restore a backup taken before the "
            "upgrade; this version leaves the database as it is."
        )
        self.url = url
        self.revisions = revisions
        self.head = head

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.url, self.revisions, self.head))


@dataclass(frozen=True)
class SchemaRevision:
    """One revision of the schema: its id, the revision it follows, and what it changes."""

    id: str
    down_revision: str | None
    description: str


@dataclass(frozen=True)
class SchemaChange:
    """What `upgrade_database` did: the revision before (None: an empty database) and after; `adopted_unversioned`
    when the database was syncbn 0.1.0's and was stamped at the initial revision first."""

    before: str | None
    after: str | None
    adopted_unversioned: bool = False


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the service's migrations, built in code (no alembic.ini).

    Args:
        connection: the connection env.py runs the migrations on (its transaction is the caller's). Without
            one, env.py connects to the `sqlalchemy.url` main option, which the caller then sets.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("file_template", "%%(rev)s")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this code knows."""
    head = _scripts().get_current_head()
    if head is None:
        raise SchemaError(f"no migration scripts found in {MIGRATIONS_DIR}: the installation is incomplete.")
    return head


def revision_history() -> list[SchemaRevision]:
    """Every revision this code knows, oldest first."""
    revisions = [
        SchemaRevision(
            id=script.revision,
            down_revision=script.down_revision if isinstance(script.down_revision, str) else None,
            description=(script.doc or "").strip(),
        )
        for script in _scripts().walk_revisions()
    ]
    return revisions[::-1]


def _stamped(connection: Connection) -> tuple[str, ...]:
    return tuple(MigrationContext.configure(connection).get_current_heads())


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at: None for an empty database, `UNVERSIONED` for a 0.1.0 one.

    Raises:
        SchemaError: the database holds more than one revision (branches are not used by this project).
    """
    with engine.connect() as connection:
        revisions = _stamped(connection)
        if not revisions:
            tables = set(inspect(connection).get_table_names())
            return UNVERSIONED if tables >= UNVERSIONED_TABLES else None
    if len(revisions) > 1:
        raise SchemaError(f"the database is at several revisions at once ({', '.join(revisions)}): fix it by hand.")
    return revisions[0]


def upgrade_database(engine: Engine, revision: str = "head") -> SchemaChange:
    """Upgrade the database to `revision` (default: the newest this code knows); a no-op when it is there.

    Raises:
        DatabaseNewerThanCodeError: the database is at a revision this code does not know.
        SchemaError: the database holds some of syncbn's tables but not all of them, and no revision.
    """
    url = engine.url.render_as_string(hide_password=True)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
        config = alembic_config(connection)
        scripts = ScriptDirectory.from_config(config)
        before = _stamped(connection)
        adopted = False
        if not before and _adopt_unversioned(connection, config, url):
            adopted, before = True, _stamped(connection)
        known = {script.revision for script in scripts.walk_revisions()}
        unknown = tuple(r for r in before if r not in known)
        if unknown:
            raise DatabaseNewerThanCodeError(url, unknown, scripts.get_current_head() or "none")
        command.upgrade(config, revision)
        after = _stamped(connection)
    change = SchemaChange(
        before=before[0] if before else None, after=after[0] if after else None, adopted_unversioned=adopted
    )
    if change.before != change.after:
        logger.info("database %s upgraded from revision %s to %s", url, change.before or "(none)", change.after)
    return change


def _adopt_unversioned(connection: Connection, config: Config, url: str) -> bool:
    """Stamp a database made by syncbn 0.1.0 at the initial revision; False when it has none of our tables."""
    tables = set(inspect(connection).get_table_names())
    present = UNVERSIONED_TABLES & tables
    if not present:
        return False
    missing = UNVERSIONED_TABLES - tables
    if missing:
        raise SchemaError(
            f"the database {url} has some of syncbn's tables ({', '.join(sorted(present))}) but not "
            f"{', '.join(sorted(missing))}, and no alembic_version table: it was not made by syncbn. Point "
            "database_url at syncbn's own database, or at an empty one."
        )
    logger.info("database %s has syncbn 0.1.0's tables without a revision: stamping %s", url, INITIAL_REVISION)
    command.stamp(config, INITIAL_REVISION)
    return True
