"""`syncbn db upgrade|current|history`: the service's database schema, for operators.

`syncbn serve` upgrades the database by itself at start; these commands let an operator do it ahead of a
deployment (`upgrade`), see where a database stands (`current`) and what revisions this version knows
(`history`). The database is chosen like `syncbn serve` chooses it: `--database-url`, else `--data-dir`'s SQLite
file, else the `SYNCBN_DATABASE_URL` / `SYNCBN_DATA_DIR` environment variables, else ./data/syncbn.db.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pydantic import ValidationError

from service.settings import Settings

__all__ = ["add_db_arguments", "run_db"]

logger = logging.getLogger(__name__)

_ACTIONS = {
    "upgrade": "Upgrade the database to the newest revision this version knows (or to REVISION).",
    "current": "Show the database's revision and whether it is the newest.",
    "history": "List the revisions this version knows, oldest first, marking the database's.",
}


def add_db_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `db` actions, each with `--database-url` and `--data-dir` (as `syncbn serve` has them)."""
    actions = parser.add_subparsers(dest="db_action", metavar="ACTION", required=True)
    for name, help_text in _ACTIONS.items():
        sub = actions.add_parser(name, help=help_text, description=help_text)
        for field in ("database_url", "data_dir"):
            info = Settings.model_fields[field]
            sub.add_argument(
                "--" + field.replace("_", "-"),
                dest=field,
                default=argparse.SUPPRESS,
                metavar=field.upper(),
                help=(info.description or "").replace("%", "%%") + f" [env SYNCBN_{field.upper()}]",
            )
        if name == "upgrade":
            sub.add_argument("revision", nargs="?", default="head", help="Target revision (default: head).")


def _database_url(args: argparse.Namespace) -> str:
    given: dict[str, Any] = {f: getattr(args, f) for f in ("database_url", "data_dir") if hasattr(args, f)}
    return Settings(**given).resolved_database_url()


def run_db(args: argparse.Namespace) -> int:
    """Run one `db` action; returns the exit code (1 with a sentence on stderr when the database is refused)."""
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    from service.store.engine import make_engine
    from service.store.migration import (
        INITIAL_REVISION,
        UNVERSIONED,
        SchemaError,
        current_revision,
        head_revision,
        revision_history,
        upgrade_database,
    )

    try:
        url = _database_url(args)
    except ValidationError as exc:
        sys.stderr.write(f"syncbn db: invalid settings: {exc}\n")
        return 2
    engine = make_engine(url)
    shown = engine.url.render_as_string(hide_password=True)
    try:
        if args.db_action == "upgrade":
            change = upgrade_database(engine, args.revision)
            if change.adopted_unversioned:
                done = f"a syncbn 0.1.0 database: stamped at {INITIAL_REVISION}, now at revision {change.after}"
            elif change.before == change.after:
                done = f"already at revision {change.after}"
            else:
                done = f"upgraded from {change.before or 'an empty database'} to {change.after}"
            sys.stdout.write(f"{shown}: {done}\n")
        elif args.db_action == "current":
            current, head = current_revision(engine), head_revision()
            known = {revision.id for revision in revision_history()}
            if current is None:
                state = "empty (no schema yet): run `syncbn db upgrade`"
            elif current == UNVERSIONED:
                state = f"{current}: run `syncbn db upgrade` (or `syncbn serve`) to stamp and upgrade it"
            elif current == head:
                state = f"{current} (newest)"
            elif current in known:
                state = f"{current} (the newest is {head}): run `syncbn db upgrade`"
            else:
                state = f"{current} (unknown to this version, its newest is {head}: a newer syncbn upgraded it)"
            sys.stdout.write(f"{shown}: {state}\n")
        else:
            current = current_revision(engine)
            for revision in revision_history():
                mark = "  <- database" if revision.id == current else ""
                summary = revision.description.splitlines()[0] if revision.description else ""
                sys.stdout.write(f"{revision.id}  {summary}{mark}\n")
    except SchemaError as exc:
        sys.stderr.write(f"syncbn db: {exc}\n")
        return 1
    except Exception as exc:
        sys.stderr.write(f"syncbn db: could not use the database {shown}: {type(exc).__name__}: {exc}\n")
        return 1
    finally:
        engine.dispose()
    return 0
