"""Who schedules: the leader lease that makes exactly one `syncbn serve` replica run the job manager's passes.

Every replica serves the whole API from the database; only the leader starts, drains, resumes and closes runs.

- PostgreSQL (`AdvisoryLease`): the lease is a session-level advisory lock (`pg_try_advisory_lock`) held on a
  connection of its own, outside the pool. PostgreSQL releases it when that session ends, so a leader that
  dies (SIGKILL, a lost node: its TCP connection closes or its keepalives fail) frees it without anyone's help,
  and a database restart frees it for everyone. Followers try to take it every `leader_poll_s`; the leader checks
  before each scheduling pass that its session is alive and still holds the lock, and steps down when it is not
  (it stops scheduling; runs live in Ray and are never stopped by a change of leader). The lock connection's
  `application_name` carries the replica's name, so any replica can say which one leads (`pg_locks` joined with
  `pg_stat_activity`).
- SQLite (`SingleReplicaLease`): one replica only. An exclusive `flock` on a file next to the database, taken
  at start, makes a second replica on the same file refuse to start with a sentence; the one that holds it
  always leads.

Nothing but the lease decides who schedules. What keeps a change of leader from storing a record twice or
running a job twice is in the store and in Ray, not in timing: records are ingested in one transaction
under the job's row lock and skipped when their `seq` is not above the job's cursor; a queued job moves to
`running` once (an atomic transition); a run's actors have unique names in Ray.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import IO, Any, Protocol

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from service.store.engine import postgres_connect_args

__all__ = [
    "LEADER_LOCK_KEY",
    "AdvisoryLease",
    "Lease",
    "ReplicaConflictError",
    "SingleReplicaLease",
    "default_replica_name",
    "open_lease",
    "sqlite_lock_path",
]

logger = logging.getLogger(__name__)

#: Key of the PostgreSQL advisory lock that is the leader lease ("sbn" + 2; the migrations' lock is "sbn" + 1).
LEADER_LOCK_KEY = 0x73626E02
#: Prefix of the lease connection's application_name; the replica's name follows it.
APPLICATION_PREFIX = "syncbn-lease:"
#: Seconds a connection attempt or an unanswered lease check may take before the lease counts as lost.
LEASE_TIMEOUT_S = 5


class ReplicaConflictError(RuntimeError):
    """Another replica already uses this SQLite database (SQLite is for a single replica)."""


class Lease(Protocol):
    """The leader lease as the job manager uses it."""

    replica: str

    def acquire(self) -> bool:
        """Try to become the leader (never blocks for long); True when this replica holds the lease."""
        ...

    def held(self) -> bool:
        """Whether this replica still holds the lease (checked against the database, not remembered)."""
        ...

    def leader(self) -> str | None:
        """The name of the replica that leads now, or None when none does (or the database does not answer)."""
        ...

    def release(self) -> None:
        """Give the lease up (a no-op when it is not held), so a follower takes over at once."""
        ...


def default_replica_name(port: int) -> str:
    """`host:port/pid`: unique among the replicas of one deployment, and says where to look."""
    return f"{socket.gethostname()}:{port}/{os.getpid()}"


def sqlite_lock_path(url: str) -> Path | None:
    """The lock file of an SQLite database file (`<file>.replica-lock`); None for other URLs and in-memory ones."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).resolve().with_name(Path(database).name + ".replica-lock")


class SingleReplicaLease:
    """The lease of an SQLite database: an exclusive lock on a file beside it, held from start to stop.

    Raises:
        ReplicaConflictError: another process holds the lock (its pid is named when it wrote one).
    """

    def __init__(self, lock_path: Path | None, replica: str, database: str) -> None:
        self.replica = replica
        self.lock_path = lock_path
        self._file: IO[str] | None = None
        if lock_path is None:
            return  # an in-memory database: nobody else can open it
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ReplicaConflictError(
                f"the SQLite database {database} is already used by {holder} (lock {lock_path}): SQLite serves a "
                "single replica. Stop that service first, or run every replica on one PostgreSQL database "
                "(--database-url postgresql+psycopg://...) to have several."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"syncbn serve {replica} (pid {os.getpid()})\n")
        handle.flush()
        self._file = handle

    def acquire(self) -> bool:
        return True

    def held(self) -> bool:
        return True

    def leader(self) -> str | None:
        return self.replica

    def release(self) -> None:
        """Free the file lock (at stop): the next replica on this file may start."""
        if self._file is not None:
            self._file.close()  # closing the file releases its flock
            self._file = None


class AdvisoryLease:
    """The lease of a PostgreSQL database: a session-level advisory lock on a dedicated connection.

    The connection is opened with a short connect timeout and TCP keepalives, so a database that stopped
    answering is noticed within seconds, and it is never shared with the pool, so the session that holds the
    lock lives exactly as long as the lease.
    """

    def __init__(self, url: str, replica: str) -> None:
        # No pool: the lock's session must end when the lease is given up, never be handed to someone else.
        self.engine = create_engine(url, poolclass=NullPool, connect_args=postgres_connect_args())
        self.replica = replica
        self._connection: Any = None  # a DBAPI (psycopg) connection in autocommit mode, while the lock is held

    def _connect(self) -> Any:
        connection = self.engine.raw_connection()
        dbapi = connection.dbapi_connection
        dbapi.autocommit = True
        with dbapi.cursor() as cursor:
            cursor.execute("SELECT set_config('application_name', %s, false)", (self._application_name(),))
            cursor.execute("SELECT set_config('statement_timeout', %s, false)", (f"{LEASE_TIMEOUT_S}s",))
        return connection

    def _application_name(self) -> str:
        return (APPLICATION_PREFIX + self.replica)[:63]  # PostgreSQL keeps 63 bytes of it

    def acquire(self) -> bool:
        if self._connection is not None and self.held():
            return True
        connection = self._connect()
        try:
            with connection.dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,))
                got = bool(cursor.fetchone()[0])
        except BaseException:
            self._discard(connection)
            raise
        if not got:
            self._discard(connection)
            return False
        self._connection = connection
        return True

    def held(self) -> bool:
        connection = self._connection
        if connection is None:
            return False
        try:
            with connection.dbapi_connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()"
                    " AND classid = %s AND objid = %s AND objsubid = 1",
                    (LEADER_LOCK_KEY >> 32, LEADER_LOCK_KEY & 0xFFFFFFFF),
                )
                still = cursor.fetchone()[0] == 1
        except Exception as exc:
            logger.warning("the leader lease's connection failed (%s: %s): the lease is lost", type(exc).__name__, exc)
            still = False
        if not still:
            self._discard(connection)
            self._connection = None
        return still

    def leader(self) -> str | None:
        if self._connection is not None:
            return self.replica
        try:
            with self.engine.connect() as connection:
                name = connection.execute(
                    text(
                        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :high AND l.objid = :low "
                        "AND l.objsubid = 1"
                    ),
                    {"high": LEADER_LOCK_KEY >> 32, "low": LEADER_LOCK_KEY & 0xFFFFFFFF},
                ).scalar()
        except Exception:
            return None
        if name is None:
            return None
        return str(name).removeprefix(APPLICATION_PREFIX)

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            with connection.dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", (LEADER_LOCK_KEY,))
        except Exception as exc:  # the session is gone: so is its lock
            logger.info("releasing the leader lease: %s: %s (its session, and so the lock, is gone)", type(exc), exc)
        self._discard(connection)

    @staticmethod
    def _discard(connection: Any) -> None:
        """Close the connection without the pool's reset (a rollback that fails on a dead session); without a pool,
        this ends the session, and with it the lock."""
        try:
            connection.invalidate()
        except Exception:
            logger.debug("closing the lease connection failed", exc_info=True)


def open_lease(url: str, replica: str) -> Lease:
    """The lease for the database at `url`: advisory lock on PostgreSQL, single-replica file lock on SQLite.

    Raises:
        ReplicaConflictError: SQLite, and another replica already uses the file.
        ValueError: a database that is neither (leadership cannot be arbitrated there).
    """
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        shown = make_url(url).render_as_string(hide_password=True)
        return SingleReplicaLease(sqlite_lock_path(url), replica, shown)
    if backend == "postgresql":
        return AdvisoryLease(url, replica)
    raise ValueError(f"database_url uses {backend!r}: expected sqlite (one replica) or postgresql (any number).")
