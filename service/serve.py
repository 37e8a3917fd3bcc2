"""`syncbn serve`: the REST service with an embedded Ray (or a joined cluster) and an SQLite file, no setup.

At start the database is upgraded to the newest schema revision (`service.store.migration`); a database that a
newer syncbn upgraded is refused with a sentence (exit status 1) before Ray starts, and so is a second replica on
one SQLite file (SQLite serves a single replica; replicas share a PostgreSQL database and a Ray cluster). A
SIGTERM stops the service gracefully: a follower just exits, the leader hands its lease over, and no run stops.

Every flag mirrors a field of `service.settings.Settings` (`--data-dir` sets `data_dir`, ...): a flag that is
not given falls back to its `SYNCBN_*` environment variable, then to the default. The flags are generated from
the settings class, so the two can never drift apart.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from pydantic import ValidationError

from service.settings import Settings

__all__ = ["add_serve_arguments", "run_serve", "settings_from_args"]

logger = logging.getLogger(__name__)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per `Settings` field (boolean fields become switches)."""
    for name, info in Settings.model_fields.items():
        help_text = (info.description or "").replace("%", "%%") + f" [env SYNCBN_{name.upper()}]"
        if info.annotation is bool:
            parser.add_argument(_flag(name), dest=name, action="store_true", default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the given flags, the environment and the defaults (in that order of precedence).

    Raises:
        ValidationError: a flag or environment variable has a bad value, or the bind is insecure.
    """
    given: dict[str, Any] = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    return Settings(**given)


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error.get("loc", ()))
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        lines.append(f"{_flag(field)}: {message}" if field else message)
    return "\n".join(lines)


def _stopped(signum: int, _frame: object) -> None:
    """Handler left in place after uvicorn's graceful shutdown: the stop already happened."""
    logger.info("stopped by signal %d", signum)


def _upgrade_database(settings: Settings) -> bool:
    """Upgrade the database to the schema this version needs before anything starts; False (with a sentence on
    stderr) when it cannot be used: unreachable, or upgraded by a newer syncbn."""
    from service.store.engine import make_engine
    from service.store.migration import SchemaError, upgrade_database

    engine = make_engine(settings.resolved_database_url())
    shown = engine.url.render_as_string(hide_password=True)
    try:
        change = upgrade_database(engine)
    except SchemaError as exc:
        sys.stderr.write(f"syncbn serve: refusing to start: {exc}\n")
        return False
    except Exception as exc:
        sys.stderr.write(f"syncbn serve: could not open the database {shown}: {type(exc).__name__}: {exc}\n")
        return False
    finally:
        engine.dispose()
    logger.info("database %s at schema revision %s", shown, change.after)
    return True


def _single_replica_check(settings: Settings) -> bool:
    """On SQLite, False (with a sentence on stderr) when another replica already uses the database file: SQLite
    serves one replica (the app takes the same lock for its whole life; this early look refuses before Ray
    starts)."""
    from service.jobs.leadership import ReplicaConflictError, SingleReplicaLease, sqlite_lock_path

    url = settings.resolved_database_url()
    try:
        SingleReplicaLease(sqlite_lock_path(url), "check", url).release()
    except ReplicaConflictError as exc:
        sys.stderr.write(f"syncbn serve: refusing to start: {exc}\n")
        return False
    return True


def run_serve(args: argparse.Namespace) -> int:
    """Start the service and block until it is stopped (Ctrl-C / SIGTERM). Returns the exit code."""
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        sys.stderr.write(f"syncbn serve: invalid settings:\n{_describe(exc)}\n")
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not _single_replica_check(settings) or not _upgrade_database(settings):
        return 1
    if settings.resolved_database_url().startswith("postgresql") and not settings.ray_address:
        logger.warning(
            "a shared database with an embedded Ray: other replicas cannot re-attach this one's runs; give every "
            "replica the same --ray-address to run several"
        )
    import ray
    import uvicorn

    from service.api import create_app
    from service.engine.cluster import ensure_ray
    from service.engine.ray_leftovers import ProcessFileWriter, stop_leftover_processes

    embedded = not settings.ray_address and not ray.is_initialized()
    recorder: ProcessFileWriter | None = None
    if embedded:
        # An earlier service on this data folder that was killed may have left its Ray's agents running.
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        stop_leftover_processes(settings.data_dir)
    try:
        # Worker output is not forwarded: it would flood the service's log with Ray Train's per-report lines,
        # and what matters (progress, worker errors with their rank) reaches the job's records and log anyway.
        ensure_ray(
            settings.ray_address,
            settings.ray_num_cpus,
            log_to_driver=False,
            join_timeout_s=settings.ray_join_timeout_s,
            allow_insecure=settings.ray_allow_insecure,
        )
    except Exception as exc:
        where = settings.ray_address or "an embedded local Ray"
        sys.stderr.write(f"syncbn serve: could not start or join {where}: {type(exc).__name__}: {exc}\n")
        return 1
    if embedded:
        recorder = ProcessFileWriter(settings.data_dir).start()
    try:
        app = create_app(settings)
        sys.stdout.write(
            f"syncbn service on http://{settings.host}:{settings.port} (docs at /docs), data in "
            f"{settings.data_dir.resolve()}\n"
        )
        sys.stdout.flush()
        # uvicorn handles SIGINT/SIGTERM with a graceful shutdown, then re-raises the signal to the handler that
        # was installed before it (Ray's driver handler exits with status 15). A stop on request is a success.
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop_signal, _stopped)
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=5,
        )
    finally:
        if embedded:
            ray.shutdown()
        if recorder is not None:
            recorder.stop()
    return 0
