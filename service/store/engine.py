"""Opening the service's database: one SQLAlchemy engine per URL, with the settings each backend needs.

SQLite (the default, a file in the data folder) gets WAL, a busy timeout and enforced foreign keys, and its
folder is created; any other URL (PostgreSQL in production) gets a pool that checks connections before use
(`pool_pre_ping`: after a database restart or failover, stale connections are replaced on their next use instead
of failing a request), a short connect timeout and TCP keepalives, so that while the database is unreachable a
request fails within seconds (the API answers 503) instead of hanging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

__all__ = ["CONNECT_TIMEOUT_S", "make_engine", "postgres_connect_args"]

#: Seconds a new PostgreSQL connection may take before the attempt fails.
CONNECT_TIMEOUT_S = 5


def postgres_connect_args() -> dict[str, Any]:
    """libpq options for every PostgreSQL connection: give up connecting after CONNECT_TIMEOUT_S, and notice a
    peer that vanished (a failover, a cut network) through keepalives within about 10 s."""
    return {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
    }


def make_engine(url: str) -> Engine:
    """An engine for `url` (no connection is opened yet)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        connect_args = postgres_connect_args() if parsed.get_backend_name() == "postgresql" else {}
        return create_engine(
            url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=10, connect_args=connect_args
        )
    database = parsed.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        pool_size=10,
        max_overflow=20,
    )

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine
