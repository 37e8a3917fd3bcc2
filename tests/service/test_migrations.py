"""Alembic owns the schema: the initial revision creates exactly the models' tables, a database made by syncbn
0.1.0 (`create_all`, no `alembic_version`, with rows) is stamped and upgraded with every row readable through the
store, a database at a revision this code does not know is refused (by the store, `syncbn serve` and
`syncbn db`), and `syncbn db upgrade|current|history` work; on SQLite and on the real PostgreSQL server (a fresh
schema per test in the module's database).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    text,
)

from service.api.models import JobPublic
from service.cli import main
from service.status import JobStatus
from service.store import JobStore
from service.store.engine import make_engine
from service.store.migration import (
    INITIAL_REVISION,
    UNVERSIONED,
    DatabaseNewerThanCodeError,
    SchemaError,
    current_revision,
    head_revision,
    revision_history,
    upgrade_database,
)
from service.store.models import Base

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: an SQLite file, or a fresh schema in the module's PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'syncbn.db'}"
    import psycopg

    base = request.getfixturevalue("postgres_url")
    schema = f"m_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base.replace("postgresql+psycopg", "postgresql"), autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    return f"{base}?options=-csearch_path%3D{schema}"


@pytest.fixture
def engine(database_url: str) -> Iterator[Any]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


# -- syncbn 0.1.0's tables, frozen: what `Base.metadata.create_all` made before Alembic (service/store/models.py
#    at 0.1.0, written out in Core so that later changes to the models cannot change this copy) ---------------

V010 = MetaData()
Table(
    "jobs",
    V010,
    Column("number", Integer, primary_key=True, autoincrement=True),
    Column("id", String(32), unique=True, index=True, nullable=False),
    Column("name", String(100)),
    Column("status", String(16), index=True, nullable=False),
    Column("spec", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("error", Text),
    Column("cancel_requested", Boolean, nullable=False),
    Column("verdict", String(16)),
    Column("epochs_done", Integer, nullable=False),
    Column("last_val_acc", Float),
    Column("best_val_acc", Float),
    Column("final_val_acc", Float),
    Column("final_train_loss", Float),
    Column("last_step", Integer),
    Column("model_path", Text),
    Column("record_seq", Integer, nullable=False),
    Column("event_seq", Integer, nullable=False),
)


def _job_id_column() -> Column:
    return Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)


Table(
    "step_points",
    V010,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _job_id_column(),
    Column("step", Integer, nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("train_loss", Float),
    Column("lr", Float),
    Column("samples_per_s", Float),
    Column("step_time_s", Float),
    Index("ix_step_points_job_step", "job_id", "step"),
)
Table(
    "epoch_points",
    V010,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _job_id_column(),
    Column("epoch", Integer, nullable=False),
    Column("step", Integer, nullable=False),
    Column("train_loss", Float),
    Column("train_acc", Float),
    Column("val_loss", Float),
    Column("val_acc", Float),
    Column("epoch_time_s", Float),
    Index("ix_epoch_points_job_epoch", "job_id", "epoch"),
)
Table(
    "layer_stats",
    V010,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _job_id_column(),
    Column("step", Integer, nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("layer", String(300), nullable=False),
    Column("stats", JSON, nullable=False),
    Index("ix_layer_stats_job_step", "job_id", "step"),
    Index("ix_layer_stats_job_layer_step", "job_id", "layer", "step"),
)
Table(
    "log_lines",
    V010,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _job_id_column(),
    Column("seq", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("level", String(16), nullable=False),
    Column("source", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Index("ix_log_lines_job_seq", "job_id", "seq"),
)
Table(
    "job_events",
    V010,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _job_id_column(),
    Column("seq", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("data", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),
)
Table(
    "idempotency_keys",
    V010,
    Column("key", String(255), primary_key=True),
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), index=True, nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def v010_rows() -> dict[str, list[dict[str, Any]]]:
    """Rows as syncbn 0.1.0 wrote them: one job per state, with points, layer statistics, logs, events and a key."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in V010.tables}
    # Inserted in this order, the jobs get numbers 1, 2, ... from the database as they did in 0.1.0.
    for number, state in enumerate(JobStatus, start=1):
        job_id = f"{number:032x}"
        finished = state.is_terminal
        rows["jobs"].append(
            {
                "id": job_id,
                "name": f"job-{state.value}",
                "status": state.value,
                "spec": {"name": f"job-{state.value}", "model": "mlp", "workers": 2, "epochs": 2, "seed": number},
                "created_at": T0 + timedelta(minutes=number),
                "started_at": T0 + timedelta(minutes=number, seconds=5) if state is not JobStatus.QUEUED else None,
                "finished_at": T0 + timedelta(minutes=number + 1) if finished else None,
                "error": "rank 1: boom" if state is JobStatus.FAILED else None,
                "cancel_requested": state is JobStatus.CANCELLED,
                "verdict": "completed" if state is JobStatus.SUCCEEDED else None,
                "epochs_done": 2 if finished else 0,
                "last_val_acc": 0.5 + number / 100 if finished else None,
                "best_val_acc": 0.6 + number / 100 if finished else None,
                "final_val_acc": 0.5 + number / 100 if state is JobStatus.SUCCEEDED else None,
                "final_train_loss": 0.25 if finished else None,
                "last_step": 7 if finished else None,
                "model_path": f"/data/jobs/{job_id}/model.pt" if state is JobStatus.SUCCEEDED else None,
                "record_seq": 6 if finished else 0,
                "event_seq": 3,
            }
        )
        for step in (0, 4):
            rows["step_points"].append(
                {
                    "job_id": job_id,
                    "step": step,
                    "epoch": 1 + step // 4,
                    "train_loss": 2.0 - step / 10,
                    "lr": 0.1,
                    "samples_per_s": 100.0 + number,
                    "step_time_s": 0.05,
                }
            )
            rows["layer_stats"].append(
                {
                    "job_id": job_id,
                    "step": step,
                    "epoch": 1 + step // 4,
                    "layer": "net.1",
                    "stats": {"mean": [0.1 * step, 0.2], "var": [1.0, 1.5], "ranks_agree": True, "ranks": 2},
                }
            )
        rows["epoch_points"].append(
            {
                "job_id": job_id,
                "epoch": 1,
                "step": 3,
                "train_loss": 1.5,
                "train_acc": 0.4,
                "val_loss": 1.6,
                "val_acc": 0.45,
                "epoch_time_s": 1.25,
            }
        )
        for seq, kind in ((1, "status"), (2, "log"), (3, "step")):
            rows["job_events"].append(
                {
                    "job_id": job_id,
                    "seq": seq,
                    "kind": kind,
                    "data": {"seq": seq, "kind": kind},
                    "created_at": T0 + timedelta(minutes=number, seconds=seq),
                }
            )
        rows["log_lines"].append(
            {
                "job_id": job_id,
                "seq": 2,
                "created_at": T0 + timedelta(minutes=number, seconds=2),
                "level": "info",
                "source": "service",
                "message": f"job submitted and queued ({state.value})",
            }
        )
    rows["idempotency_keys"].append(
        {"key": "retry-me", "job_id": f"{1:032x}", "request_hash": "ab" * 32, "created_at": T0}
    )
    return rows


def make_v010_database(url: str) -> dict[str, list[dict[str, Any]]]:
    """A database exactly as syncbn 0.1.0 left it: its tables (create_all) with rows in each, no Alembic table."""
    rows = v010_rows()
    engine = make_engine(url)
    try:
        V010.create_all(engine)
        with engine.begin() as connection:
            for table in V010.sorted_tables:
                connection.execute(table.insert(), rows[table.name])
    finally:
        engine.dispose()
    return rows


def test_the_revisions_at_head_create_exactly_the_models_tables(engine: Any) -> None:
    change = upgrade_database(engine)
    assert (change.before, change.after, change.adopted_unversioned) == (None, head_revision(), False)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        tables = set(inspect(connection).get_table_names())
    assert diff == [], f"the migrations and service/store/models.py disagree: {diff}"
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
    assert upgrade_database(engine) == type(change)(before=head_revision(), after=head_revision())


def test_the_initial_revision_creates_exactly_the_010_tables(engine: Any) -> None:
    """What 0001_initial creates is the test's frozen copy of 0.1.0 (so adopting a 0.1.0 database is sound)."""
    assert upgrade_database(engine, INITIAL_REVISION).after == INITIAL_REVISION
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), V010)
    assert diff == [], diff


def test_a_010_database_with_rows_is_upgraded_and_every_job_reads_back(database_url: str) -> None:
    rows = make_v010_database(database_url)
    engine = make_engine(database_url)
    try:
        assert current_revision(engine) == UNVERSIONED
    finally:
        engine.dispose()

    store = JobStore(database_url)
    try:
        assert store.schema.adopted_unversioned and store.schema.before == INITIAL_REVISION
        assert store.schema.after == head_revision()
        listed, count = store.list_jobs(limit=100)
        assert count == len(rows["jobs"]) == len(JobStatus)
        assert [job.id for job in listed] == [job["id"] for job in reversed(rows["jobs"])], "newest first"
        for expected in rows["jobs"]:
            job = store.get_job(expected["id"])
            assert job is not None, expected["id"]
            for column, value in expected.items():
                got = getattr(job, column)
                if isinstance(value, datetime):
                    got = got if got.tzinfo else got.replace(tzinfo=timezone.utc)
                assert got == value, (expected["id"], column, got, value)
            assert JobPublic.from_row(job).spec.seed == expected["spec"]["seed"], "the API reads the 0.1.0 spec"
            steps, epochs = store.metrics(job.id)
            assert [(p.step, p.train_loss) for p in steps] == [
                (r["step"], r["train_loss"]) for r in rows["step_points"] if r["job_id"] == job.id
            ]
            assert [(p.epoch, p.val_acc) for p in epochs] == [(1, 0.45)]
            # 0004_precise_bn: rows from before precise BatchNorm have no precise results and no warning.
            assert [(p.val_loss_precise, p.val_acc_precise) for p in epochs] == [(None, None)]
            assert (job.final_val_acc_precise, job.warning) == (None, None)
            assert store.layer_steps(job.id) == [0, 4]
            stats = store.layers_at(job.id, 4).layers["net.1"]  # converted to the binary form (float32)
            assert stats["mean"] == pytest.approx([0.4, 0.2], rel=1e-7) and stats["var"] == [1.0, 1.5]
            assert stats["ranks_agree"] is True and stats["ranks"] == 2
            assert [line.message for line in store.logs(job.id)] == [f"job submitted and queued ({job.status})"]
            assert [(e.seq, e.kind, e.data) for e in store.events(job.id)] == [
                (r["seq"], r["kind"], r["data"]) for r in rows["job_events"] if r["job_id"] == job.id
            ]
        assert store.job_for_idempotency_key("retry-me", "ab" * 32).id == rows["jobs"][0]["id"]
        # 0002_job_owner: the jobs and keys of 0.1.0 belong to "default" (what a bare token acts as).
        assert {store.get_job(job["id"]).owner for job in rows["jobs"]} == {"default"}
        assert store.list_jobs(owner="default", limit=100)[1] == len(rows["jobs"])
        assert store.list_jobs(owner="alice", limit=100)[1] == 0
        assert store.job_for_idempotency_key("retry-me", "cd" * 32, owner="alice") is None, "keys are per owner"
        # The upgraded database takes new work where 0.1.0 left off.
        new_job, created = store.create_job(uuid.uuid4().hex, {"name": "after the upgrade"})
        assert created and new_job.number == len(rows["jobs"]) + 1
        assert store.queue_positions() == {rows["jobs"][0]["id"]: 1, new_job.id: 2}
        alices, created = store.create_job(
            uuid.uuid4().hex, {"name": "same key"}, idempotency_key="retry-me", request_hash="cd" * 32, owner="alice"
        )
        assert created and alices.owner == "alice"
    finally:
        store.close()


def test_0002_job_owner_downgrades_to_the_010_schema_keeping_the_default_owners_keys(engine: Any) -> None:
    from alembic import command

    from service.store.migration import alembic_config

    upgrade_database(engine)
    store = JobStore(str(engine.url.render_as_string(hide_password=False)))
    try:
        mine, _ = store.create_job(uuid.uuid4().hex, {"n": 1}, idempotency_key="k", request_hash="a" * 64)
        store.create_job(uuid.uuid4().hex, {"n": 2}, idempotency_key="k", request_hash="b" * 64, owner="alice")
    finally:
        store.close()
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), INITIAL_REVISION)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), V010) == []
        keys = connection.execute(V010.tables["idempotency_keys"].select()).mappings().all()
    assert [(k["key"], k["job_id"]) for k in keys] == [("k", mine.id)]
    upgrade_database(engine)  # and up again


def test_0004_precise_bn_keeps_the_rows_when_it_goes_down_and_up_again(engine: Any) -> None:
    from alembic import command

    from service.store.migration import alembic_config

    upgrade_database(engine)
    url = str(engine.url.render_as_string(hide_password=False))
    store = JobStore(url)
    try:
        job_id = uuid.uuid4().hex
        store.create_job(job_id, {"name": "precise"})
        store.transition(job_id, JobStatus.RUNNING)
        epoch = {"kind": "epoch", "epoch": 1, "step": 5, "val_acc": 0.5, "val_acc_precise": 0.9, "seq": 1}
        end = {"kind": "end", "status": "succeeded", "final_val_acc_precise": 0.9, "warning": "lag", "seq": 2}
        store.ingest(job_id, [epoch, end])
        assert store.get_job(job_id).final_val_acc_precise == 0.9
    finally:
        store.close()
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0003_layer_stats")
    upgrade_database(engine)
    store = JobStore(url)
    try:
        job = store.get_job(job_id)
        assert (job.status, job.final_val_acc_precise, job.warning) == ("succeeded", None, None)
        assert [(p.epoch, p.val_acc, p.val_acc_precise) for p in store.metrics(job_id)[1]] == [(1, 0.5, None)]
    finally:
        store.close()


def test_a_database_newer_than_the_code_is_refused_and_left_alone(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    JobStore(database_url).close()
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
        with pytest.raises(DatabaseNewerThanCodeError, match=r"9999_from_the_future.*newer syncbn"):
            JobStore(database_url)
        assert main(["serve", "--database-url", database_url, "--data-dir", str(tmp_path), "--port", "0"]) == 1
        refused = capsys.readouterr().err
        assert "refusing to start" in refused and "'9999_from_the_future'" in refused, refused
        assert main(["db", "upgrade", "--database-url", database_url]) == 1
        assert "which this syncbn does not know" in capsys.readouterr().err
        assert current_revision(engine) == "9999_from_the_future", "the refused database was left as it was"
    finally:
        engine.dispose()


def test_a_database_with_only_some_of_the_tables_is_refused(engine: Any) -> None:
    V010.tables["jobs"].create(engine)
    with pytest.raises(SchemaError, match="has some of syncbn's tables \\(jobs\\) but not epoch_points"):
        upgrade_database(engine)


def test_db_commands_show_and_upgrade_the_schema(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    head = head_revision()
    assert revision_history()[0].id == INITIAL_REVISION
    assert main(["db", "current", "--database-url", database_url]) == 0
    assert "empty (no schema yet)" in capsys.readouterr().out
    assert main(["db", "upgrade", "--database-url", database_url]) == 0
    assert f"upgraded from an empty database to {head}" in capsys.readouterr().out
    assert main(["db", "upgrade", "--database-url", database_url]) == 0
    assert f"already at revision {head}" in capsys.readouterr().out
    assert main(["db", "current", "--database-url", database_url]) == 0
    assert f"{head} (newest)" in capsys.readouterr().out
    assert main(["db", "history", "--database-url", database_url]) == 0
    history = capsys.readouterr().out.splitlines()
    assert history[0].startswith(f"{INITIAL_REVISION}  The tables of syncbn 0.1.0"), history
    assert history[-1].endswith("<- database"), history


def test_db_upgrade_adopts_a_010_sqlite_database_in_the_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_v010_database(f"sqlite:///{tmp_path / 'syncbn.db'}")
    assert main(["db", "upgrade", "--data-dir", str(tmp_path)]) == 0
    assert "a syncbn 0.1.0 database: stamped at 0001_initial, now at revision" in capsys.readouterr().out
    store = JobStore(f"sqlite:///{tmp_path / 'syncbn.db'}")
    try:
        assert store.list_jobs()[1] == len(JobStatus)
    finally:
        store.close()


def test_services_starting_together_on_postgres_upgrade_once(postgres_url: str) -> None:
    """The advisory lock serialises concurrent upgrades: without it, all but one would fail on existing tables."""
    import threading

    import psycopg

    schema = f"c_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    url = f"{postgres_url}?options=-csearch_path%3D{schema}"
    engines = [make_engine(url) for _ in range(4)]
    results: list[Any] = []
    start = threading.Barrier(len(engines))

    def upgrade(engine: Any) -> None:
        start.wait()
        try:
            results.append(upgrade_database(engine))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=upgrade, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for engine in engines:
        engine.dispose()
    assert all(not isinstance(result, Exception) for result in results), results
    assert sorted(result.before or "" for result in results) == ["", *[head_revision()] * 3]
