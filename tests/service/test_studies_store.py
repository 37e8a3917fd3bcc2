"""Studies in the store, without Ray: 0005_studies upgrades a database that holds rows (its jobs read back as plain
jobs, then take studies), a study and its trials are created in one transaction (a failure leaves neither), the
derived status follows the trials, and the verdict derived from stored records is `study_verdict` of the same
numbers (best val_acc per trial, mean samples/s, wall time, the local arm's per-layer skew); on SQLite and the
real PostgreSQL server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from service.jobs.early_stop import stop_study_if_settled
from service.status import JobStatus
from service.store import JobStore
from service.store.engine import make_engine
from service.store.migration import alembic_config, head_revision, upgrade_database
from service.store.study_results import StudyStatus, derive_status, read_study
from service.store.verdict import ArmResult, study_verdict
from service.study_spec import StudySpec

pytestmark = pytest.mark.timeout(120)

BASE = {"model": "small_resnet", "dataset": {"kind": "digits"}, "workers": 2, "cpus_per_worker": 1, "epochs": 2}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: an SQLite file, or a fresh schema in the module's PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'syncbn.db'}"
    import psycopg

    base = request.getfixturevalue("postgres_url")
    schema = f"s_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base.replace("postgresql+psycopg", "postgresql"), autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    return f"{base}?options=-csearch_path%3D{schema}"


@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    opened = JobStore(database_url)
    yield opened
    opened.close()


def _trials(spec: StudySpec) -> list[tuple[str, int, int, dict[str, Any]]]:
    return [(uuid.uuid4().hex, arm, seed, job.model_dump(mode="json")) for arm, seed, job in spec.trial_specs()]


def test_0005_upgrades_a_database_with_rows_and_its_jobs_stay_plain_jobs(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        upgrade_database(engine, "0003_layer_stats")
        now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO jobs (id, owner, name, status, spec, created_at, cancel_requested, epochs_done, "
                    "record_seq, event_seq) VALUES (:id, 'alice', 'old', 'succeeded', :spec, :at, false, 2, 0, 0)"
                ),
                {"id": "a" * 32, "spec": '{"name": "old", "seed": 7}', "at": now},
            )
            connection.execute(
                text("INSERT INTO epoch_points (job_id, epoch, step, val_acc) VALUES (:id, 1, 4, 0.75)"),
                {"id": "a" * 32},
            )
    finally:
        engine.dispose()

    opened = JobStore(database_url)
    try:
        assert opened.schema.before == "0003_layer_stats" and opened.schema.after == head_revision()
        old = opened.get_job("a" * 32)
        assert (old.owner, old.name, old.status, old.spec["seed"]) == ("alice", "old", "succeeded", 7)
        assert (old.study_id, old.study_arm, old.study_seed) == (None, None, None)
        assert [e.val_acc for e in opened.metrics(old.id)[1]] == [0.75]
        assert opened.list_jobs(study="b" * 32) == ([], 0)

        spec = StudySpec.model_validate({"base": BASE, "seeds": 2})
        study, jobs = opened.create_study("b" * 32, spec.model_dump(mode="json"), _trials(spec), owner="alice")
        assert [(j.study_arm, j.study_seed) for j in opened.study_trials(study.id)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
        assert opened.list_jobs(study=study.id)[1] == 4 and opened.list_jobs()[1] == 5
        assert opened.list_studies(owner="alice")[1] == 1 and opened.list_studies(owner="bob")[1] == 0
        assert opened.queue_positions() == {job.id: index for index, job in enumerate(jobs, start=1)}
    finally:
        opened.close()

    engine = make_engine(database_url)
    try:  # and back: the study's columns and table go, the jobs stay
        with engine.begin() as connection:
            config = alembic_config(connection)
            command.downgrade(config, "0003_layer_stats")
        with engine.connect() as connection:
            assert "studies" not in inspect(connection).get_table_names()
            assert "study_id" not in {c["name"] for c in inspect(connection).get_columns("jobs")}
            assert connection.scalar(text("SELECT count(*) FROM jobs")) == 5
    finally:
        engine.dispose()


def test_0006_keeps_the_studies_and_they_did_not_stop_early(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        upgrade_database(engine, "0005_studies")
        spec = StudySpec.model_validate({"base": BASE, "seeds": 2}).model_dump_json()
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO studies (id, owner, name, spec, created_at, cancel_requested) "
                    "VALUES (:id, 'alice', 'old study', :spec, :at, false)"
                ),
                {"id": "c" * 32, "spec": spec, "at": datetime(2026, 1, 2, tzinfo=timezone.utc)},
            )
    finally:
        engine.dispose()
    opened = JobStore(database_url)
    try:
        assert opened.schema.before == "0005_studies" and opened.schema.after == head_revision()
        old = opened.get_study("c" * 32)
        assert (old.owner, old.name, old.stopped_early_at, old.stopped_early_pairs) == (
            "alice",
            "old study",
            None,
            None,
        )
        state = read_study(opened, old)
        assert (state.status, state.stopped_early, state.spec.early_stop) == (StudyStatus.FAILED, None, False)
        assert opened.mark_study_stopped_early(old.id, 3)
    finally:
        opened.close()
    engine = make_engine(database_url)
    try:  # and back: the two columns go, the study stays
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), "0005_studies")
        with engine.connect() as connection:
            assert "stopped_early_at" not in {c["name"] for c in inspect(connection).get_columns("studies")}
            assert connection.scalar(text("SELECT name FROM studies")) == "old study"
    finally:
        engine.dispose()


def test_a_study_is_created_whole_or_not_at_all(store: JobStore) -> None:
    spec = StudySpec.model_validate({"base": BASE, "seeds": 2})
    taken, _ = store.create_job(uuid.uuid4().hex, {"name": "already there"})
    trials = _trials(spec)
    trials[-1] = (taken.id, *trials[-1][1:])  # the last trial's id collides: the whole insert must fail
    with pytest.raises(IntegrityError):
        store.create_study(uuid.uuid4().hex, spec.model_dump(mode="json"), trials)
    assert store.list_studies() == ([], 0)
    assert store.list_jobs()[1] == 1, "no trial of the failed study was left behind"


@pytest.mark.parametrize(
    ("cancel", "statuses", "verdict", "expected"),
    [
        (False, ["queued", "queued"], False, StudyStatus.QUEUED),
        (False, ["running", "queued"], False, StudyStatus.RUNNING),
        (False, ["succeeded", "queued"], False, StudyStatus.RUNNING),
        (False, ["succeeded", "succeeded"], True, StudyStatus.SUCCEEDED),
        (False, ["succeeded", "failed"], False, StudyStatus.FAILED),
        (False, ["cancelled", "succeeded"], True, StudyStatus.SUCCEEDED),
        (True, ["running", "succeeded"], False, StudyStatus.CANCELLED),
        (True, ["succeeded", "succeeded"], True, StudyStatus.CANCELLED),
    ],
)
def test_the_status_is_derived_from_the_trials(cancel: bool, statuses: list[str], verdict: bool, expected: str) -> None:
    assert derive_status(cancel, [JobStatus(s) for s in statuses], verdict) == expected


def _run(store: JobStore, job_id: str, accuracies: list[float], speed: float, skew: float | None) -> None:
    """Store a finished run: two steps (with layer statistics when `skew` is given), an epoch per accuracy, the end."""
    store.transition(job_id, JobStatus.RUNNING)
    records: list[dict[str, Any]] = []
    for step in (1, 2):
        records.append({"kind": "step", "step": step, "epoch": 1, "samples_per_s": speed * step})
        if skew is not None:
            layers = {
                name: {"mean": [0.0], "var": [1.0], "skew_between_share_mean": skew * factor}
                for name, factor in (("bn1", 1.0), ("bn2", 0.5 * step))
            }
            records.append({"kind": "layers", "step": step, "epoch": 1, "layers": layers})
    for epoch, accuracy in enumerate(accuracies, start=1):
        records.append({"kind": "epoch", "epoch": epoch, "step": 2, "val_acc": accuracy, "val_loss": 1 - accuracy})
    records.append({"kind": "end", "status": "succeeded", "verdict": "completed"})
    store.ingest(job_id, [{**record, "seq": seq} for seq, record in enumerate(records, start=1)])


def test_the_verdict_is_derived_from_the_stored_records(store: JobStore) -> None:
    spec = StudySpec.model_validate({"base": BASE, "seeds": [3, 5, 8]})
    study, jobs = store.create_study(uuid.uuid4().hex, spec.model_dump(mode="json"), _trials(spec))
    state = read_study(store, study)
    assert (state.status, state.verdict) == (StudyStatus.QUEUED, None)

    # Best accuracy per trial (not the last epoch's): sync 0.9, 0.8, 0.85; local 0.7, 0.62, 0.66.
    runs = {
        (0, 3): ([0.5, 0.9], 100.0),
        (0, 5): ([0.8, 0.7], 90.0),
        (0, 8): ([0.85], 95.0),
        (1, 3): ([0.7], 200.0),
        (1, 5): ([0.62, 0.1], 180.0),
        (1, 8): ([0.66, 0.55], 190.0),
    }
    by_key = {(job.study_arm, job.study_seed): job for job in jobs}
    for key in [(0, 3), (1, 3)]:
        _run(store, by_key[key].id, *runs[key], skew=0.2 if key[0] == 1 else None)
    state = read_study(store, study)
    assert state.status == StudyStatus.RUNNING and state.verdict is None, "one pair is not enough"
    for key in [(0, 5), (0, 8), (1, 5), (1, 8)]:
        _run(store, by_key[key].id, *runs[key], skew=0.2 if key[0] == 1 else None)

    state = read_study(store, study)
    assert state.status == StudyStatus.SUCCEEDED
    walls: list[list[float]] = [[], []]
    for job in store.study_trials(study.id):
        walls[job.study_arm].append((job.finished_at - job.started_at).total_seconds())
    expected = study_verdict(
        [
            ArmResult({3: 0.9, 5: 0.8, 8: 0.85}, [150.0, 135.0, 142.5], walls[0]),
            ArmResult({3: 0.7, 5: 0.62, 8: 0.66}, [300.0, 270.0, 285.0], walls[1]),
        ],
        metric="val_accuracy",
        confidence=0.95,
        margin=0.005,
        labels=["sync_bn=true", "sync_bn=false"],
        sync_only=True,
        # bn1: 0.2 at both steps of 3 trials; bn2: 0.1 then 0.2 (float32 in the store).
        layer_shares={"bn1": [0.2] * 6, "bn2": [0.1, 0.2] * 3},
    )
    got = state.verdict
    assert got.outcome == expected.outcome == "pays"
    assert got.sentence == expected.sentence
    assert got.sentence.startswith("Synchronised BatchNorm pays: +19.0 points of validation accuracy")
    assert got.comparisons[0].difference.mean == pytest.approx(expected.comparisons[0].difference.mean)
    assert got.comparisons[0].difference.p_value == pytest.approx(expected.comparisons[0].difference.p_value)
    assert got.comparisons[0].cost_ratio == pytest.approx(2.0)
    assert [a.mean for a in got.arms] == pytest.approx([a.mean for a in expected.arms])
    assert [a.wall_s for a in got.arms] == pytest.approx([a.wall_s for a in expected.arms])
    assert [(layer["layer"], layer["points"]) for layer in got.layers] == [("bn1", 6), ("bn2", 6)]
    assert got.layers[1]["between_share_mean"] == pytest.approx(0.15, rel=1e-6)


def test_an_early_stop_study_cancels_its_queued_trials_once_the_verdict_settles(store: JobStore) -> None:
    """Seeds 0..3, queued seed by seed; after 2 settled pairs the 4 trials still queued are cancelled (never the
    running one), the study succeeds once that one ends, and its sentence says it stopped early."""
    spec = StudySpec.model_validate({"base": BASE, "seeds": 4, "early_stop": True})
    study, jobs = store.create_study(uuid.uuid4().hex, spec.model_dump(mode="json"), _trials(spec))
    assert [(job.study_arm, job.study_seed) for job in jobs][:4] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    by_key = {(job.study_arm, job.study_seed): job for job in jobs}
    # sync 0.90 / 0.91, local 0.70 / 0.72: the differences 0.20, 0.19 lie far above the 0.005 margin.
    for key, accuracy in [((0, 0), 0.90), ((1, 0), 0.70), ((0, 1), 0.91)]:
        _run(store, by_key[key].id, [accuracy], 100.0, None)
    assert stop_study_if_settled(store, study.id) == 0, "one pair does not settle anything"
    store.transition(by_key[(0, 2)].id, JobStatus.RUNNING)  # started before the second pair ended
    _run(store, by_key[(1, 1)].id, [0.72], 100.0, None)

    assert stop_study_if_settled(store, study.id) == 3
    assert stop_study_if_settled(store, study.id) == 0, "a second check cancels nothing more"
    trials = {(job.study_arm, job.study_seed): job for job in store.study_trials(study.id)}
    assert trials[(0, 2)].status == "running"
    for key in [(1, 2), (0, 3), (1, 3)]:
        assert trials[key].status == "cancelled"
        assert trials[key].error == "cancelled before it started: its study settled early, after 2 paired seeds"
    state = read_study(store, store.get_study(study.id))
    assert state.status == StudyStatus.RUNNING, "the running trial still counts"
    assert state.stopped_early is not None and state.stopped_early.paired_seeds == 2
    assert state.stopped_early.cancelled_trials == 3

    _run(store, trials[(0, 2)].id, [0.93], 100.0, None)  # (its move to running is refused: it runs already)
    state = read_study(store, store.get_study(study.id))
    assert state.status == StudyStatus.SUCCEEDED and state.verdict.outcome == "pays"
    assert state.verdict.comparisons[0].difference.n_pairs == 2, "seed 2 has no local trial: it pairs with nothing"
    assert state.verdict.sentence.endswith(" It stopped early after 2 paired seeds (3 queued trials not run).")


def test_an_unsettled_or_plain_study_keeps_its_queue_and_a_stop_interrupted_midway_is_finished(store: JobStore) -> None:
    plain = StudySpec.model_validate({"base": BASE, "seeds": 3})
    straddling = StudySpec.model_validate({"base": BASE, "seeds": 3, "early_stop": True, "margin": 0.05})
    results = {(0, 0): 0.90, (1, 0): 0.70, (0, 1): 0.91, (1, 1): 0.72}
    for spec, expected in [(plain, 0), (straddling, 0)]:
        study, jobs = store.create_study(uuid.uuid4().hex, spec.model_dump(mode="json"), _trials(spec))
        by_key = {(job.study_arm, job.study_seed): job for job in jobs}
        accuracies = dict(results)
        if spec.margin:  # differences 0.20 and 0.01: the interval reaches across the 0.05 band's edge
            accuracies[(1, 1)] = 0.90
        for key, accuracy in accuracies.items():
            _run(store, by_key[key].id, [accuracy], 100.0, None)
        assert stop_study_if_settled(store, study.id) == expected
        assert {job.status for job in store.study_trials(study.id) if job.study_seed == 2} == {"queued"}
        assert read_study(store, store.get_study(study.id)).stopped_early is None

    # A leader that recorded the stop and died before cancelling: the next check cancels without deciding again.
    spec = StudySpec.model_validate({"base": BASE, "seeds": 3, "early_stop": True})
    study, jobs = store.create_study(uuid.uuid4().hex, spec.model_dump(mode="json"), _trials(spec))
    assert store.mark_study_stopped_early(study.id, 2)
    assert not store.mark_study_stopped_early(study.id, 2), "recorded once"
    assert [row.id for row in store.studies_with_queued_trials()][-1] == study.id
    assert stop_study_if_settled(store, study.id) == 6
    assert study.id not in [row.id for row in store.studies_with_queued_trials()]
    # A cancelled study is never stopped early.
    cancelled, _ = store.create_study(uuid.uuid4().hex, spec.model_dump(mode="json"), _trials(spec))
    store.mark_study_cancel_requested(cancelled.id)
    assert not store.mark_study_stopped_early(cancelled.id, 2)
