"""The store keeps every record exactly once, enforces the job state machine, and reads back the same on SQLite
and on the real PostgreSQL server (a fresh database per test run, dropped afterwards).

No Ray here: records are fed in the shape `JobRun.poll` returns them (see the engine contract in the brief).
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.status import JobStatus
from service.store import IdempotencyKeyReusedError, JobStore

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        # One database per run, one schema per test: every test starts from empty tables.
        import psycopg

        base = request.getfixturevalue("postgres_url")
        schema = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(base.replace("postgresql+psycopg", "postgresql"), autocommit=True) as connection:
            connection.execute(f'CREATE SCHEMA "{schema}"')
        url = f"{base}?options=-csearch_path%3D{schema}"
    store = JobStore(url)
    yield store
    store.close()


def new_job(store: JobStore, **spec: Any) -> str:
    job_id = uuid.uuid4().hex
    store.create_job(job_id, {"name": "t", **spec})
    return job_id


def layer(mean: float) -> dict[str, Any]:
    return {
        "synchronized": True,
        "mean": [mean, mean + 1],
        "var": [1.0, 2.0],
        "batch_mean_mean": mean + 0.5,
        "dead_channels": 0,
        "skew_max_gap": float("nan"),
    }


def records(start_seq: int = 1) -> list[dict[str, Any]]:
    """A short run: two steps with layer stats, one epoch, a log line, the end."""
    out = [
        {"kind": "log", "level": "info", "message": "2 workers on cpu"},
        {
            "kind": "step",
            "step": 2,
            "epoch": 1,
            "train_loss": 2.0,
            "lr": 0.1,
            "samples_per_s": 100.0,
            "step_time_s": 0.1,
        },
        {"kind": "layers", "step": 2, "epoch": 1, "layers": {"bn1": layer(0.0), "bn2": layer(1.0)}},
        {
            "kind": "step",
            "step": 4,
            "epoch": 1,
            "train_loss": float("nan"),
            "lr": 0.1,
            "samples_per_s": 110.0,
            "step_time_s": 0.09,
        },
        {"kind": "layers", "step": 4, "epoch": 1, "layers": {"bn1": layer(2.0), "bn2": layer(3.0)}},
        {
            "kind": "epoch",
            "epoch": 1,
            "step": 4,
            "train_loss": 1.5,
            "train_acc": 0.5,
            "val_loss": 1.6,
            "val_acc": 0.55,
            "epoch_time_s": 1.0,
        },
        {
            "kind": "end",
            "status": "succeeded",
            "verdict": "completed",
            "error": None,
            "epochs_done": 1,
            "best_val_acc": 0.55,
            "final_val_acc": 0.55,
            "final_train_loss": 1.5,
            "model_path": None,
        },
    ]
    return [{"seq": start_seq + i, **r} for i, r in enumerate(out)]


def test_new_job_is_queued_with_a_status_event_and_a_log_line(store: JobStore) -> None:
    job_id = new_job(store, workers=2)
    job = store.get_job(job_id)
    assert job is not None and job.status == "queued" and job.spec == {"name": "t", "workers": 2}
    events = store.events(job_id)
    assert [(e.seq, e.kind) for e in events] == [(1, "status"), (2, "log")]
    assert events[0].data["status"] == "queued"
    assert [line.message for line in store.logs(job_id)] == ["job submitted and queued"]
    assert store.get_job("nope") is None


def test_transitions_follow_the_state_machine(store: JobStore) -> None:
    job_id = new_job(store)
    assert store.transition(job_id, JobStatus.SUCCEEDED) is None  # queued cannot succeed
    running = store.transition(job_id, JobStatus.RUNNING)
    assert running is not None and running.started_at is not None
    assert store.transition(job_id, JobStatus.QUEUED) is None
    failed = store.transition(job_id, JobStatus.FAILED, error="boom")
    assert failed is not None and failed.finished_at is not None and failed.error == "boom"
    for target in JobStatus:
        assert store.transition(job_id, target) is None, f"a failed job must not become {target}"
    assert store.transition("missing", JobStatus.RUNNING) is None
    statuses = [e.data["status"] for e in store.events(job_id) if e.kind == "status"]
    assert statuses == ["queued", "running", "failed"]


def test_ingest_stores_each_record_once_and_fills_the_summary(store: JobStore) -> None:
    job_id = new_job(store)
    store.transition(job_id, JobStatus.RUNNING)
    batch = records()
    first = store.ingest(job_id, batch[:4])
    assert first.record_seq == 4 and first.ended is None
    again = store.ingest(job_id, batch)  # seqs 1-4 come again (a re-attached poll): stored once
    assert again.record_seq == 7 and again.stored == 3 and again.ended is JobStatus.SUCCEEDED

    steps, epochs = store.metrics(job_id)
    assert [s.step for s in steps] == [2, 4]
    assert steps[1].train_loss is None, "a NaN loss is stored as null, not as NaN"
    assert [(e.epoch, e.val_acc) for e in epochs] == [(1, 0.55)]
    assert [s.step for s in store.metrics(job_id, since_step=2)[0]] == [4]

    job = store.get_job(job_id)
    assert job.status == "succeeded" and job.verdict == "completed" and job.epochs_done == 1
    assert (job.best_val_acc, job.final_val_acc, job.final_train_loss) == (0.55, 0.55, 1.5)
    assert job.last_step == 4 and job.record_seq == 7

    assert store.layer_steps(job_id) == [2, 4]
    latest = store.layers_at(job_id, None)
    assert latest.step == 4 and latest.requested_step is None and latest.kept_steps == [2, 4]
    assert {name: stats["mean"] for name, stats in latest.layers.items()} == {"bn1": [2.0, 3.0], "bn2": [3.0, 4.0]}
    assert latest.layers["bn1"]["skew_max_gap"] is None, "NaN becomes null"
    assert latest.layers["bn1"]["running_mean"] is None, "a layer without running stats has none"
    assert set(store.layers_at(job_id, 2).layers) == {"bn1", "bn2"}
    assert store.layers_at(job_id, 3).step == 2, "the nearest recorded step answers (the earlier on a tie)"
    assert [p.step for p in store.layer_history(job_id, "bn2").points] == [2, 4]
    assert store.layer_history(job_id, "bn9") is None
    assert store.layer_names(job_id) == ["bn1", "bn2"]

    events = store.events(job_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), "event ids are gap-free"
    kinds = [e.kind for e in events]
    assert kinds.count("step") == 2 and kinds.count("layers") == 2 and kinds.count("epoch") == 1
    layer_event = next(e for e in events if e.kind == "layers")
    assert "mean" not in layer_event.data["layers"]["bn1"], "SSE layer events carry summaries only"
    assert layer_event.data["layers"]["bn1"]["batch_mean_mean"] == 0.5
    assert events[-2].kind == "status" and events[-2].data["status"] == "succeeded"
    assert store.last_event_seq(job_id) == events[-1].seq
    assert [e.seq for e in store.events(job_id, after=events[-3].seq)] == [events[-2].seq, events[-1].seq]


def test_end_of_a_job_whose_cancel_was_requested_is_cancelled(store: JobStore) -> None:
    job_id = new_job(store)
    store.transition(job_id, JobStatus.RUNNING)
    assert store.mark_cancel_requested(job_id).cancel_requested
    end = {"seq": 1, "kind": "end", "status": "failed", "error": "rank 0: killed", "verdict": None}
    assert store.ingest(job_id, [end]).ended is JobStatus.CANCELLED
    job = store.get_job(job_id)
    assert job.status == "cancelled" and job.error == "cancelled on request"
    assert store.mark_cancel_requested(job_id) is None, "only running jobs can be flagged"


def test_failed_end_keeps_the_workers_error(store: JobStore) -> None:
    job_id = new_job(store)
    store.transition(job_id, JobStatus.RUNNING)
    end = {"seq": 1, "kind": "end", "status": "failed", "error": "rank 1: RuntimeError: boom"}
    store.ingest(job_id, [end, {"seq": 2, "kind": "mystery"}])
    job = store.get_job(job_id)
    assert job.status == "failed" and job.error == "rank 1: RuntimeError: boom"
    assert store.logs(job_id)[-1].level == "error" and "rank 1" in store.logs(job_id)[-1].message


def test_idempotency_key_returns_the_first_job_and_refuses_another_body(store: JobStore) -> None:
    key = f"key-{uuid.uuid4().hex}"
    first, created = store.create_job(uuid.uuid4().hex, {"a": 1}, idempotency_key=key, request_hash="h1")
    assert created
    again, created_again = store.create_job(uuid.uuid4().hex, {"a": 1}, idempotency_key=key, request_hash="h1")
    assert not created_again and again.id == first.id
    with pytest.raises(IdempotencyKeyReusedError, match="different request body"):
        store.create_job(uuid.uuid4().hex, {"a": 2}, idempotency_key=key, request_hash="h2")
    assert store.list_jobs()[1] == 1


def test_concurrent_submissions_with_one_key_create_one_job(store: JobStore) -> None:
    key = f"race-{uuid.uuid4().hex}"
    ids: list[str] = []

    def submit() -> None:
        job, _ = store.create_job(uuid.uuid4().hex, {"a": 1}, idempotency_key=key, request_hash="h")
        ids.append(job.id)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 8 and len(set(ids)) == 1
    assert store.list_jobs()[1] == 1


def test_listing_pagination_filter_counts_and_queue_positions(store: JobStore) -> None:
    ids = [new_job(store) for _ in range(5)]
    store.transition(ids[0], JobStatus.RUNNING)
    store.transition(ids[1], JobStatus.CANCELLED)
    page, count = store.list_jobs(offset=0, limit=2)
    assert count == 5 and [j.id for j in page] == [ids[4], ids[3]], "newest first"
    queued, queued_count = store.list_jobs(status=JobStatus.QUEUED)
    assert queued_count == 3 and {j.id for j in queued} == set(ids[2:])
    assert store.queue_positions() == {ids[2]: 1, ids[3]: 2, ids[4]: 3}
    assert [j.id for j in store.jobs_with_status(JobStatus.QUEUED)] == ids[2:], "queue order is FIFO"
    counts = store.count_by_status()
    assert counts[JobStatus.QUEUED] == 3 and counts[JobStatus.RUNNING] == 1 and counts[JobStatus.SUCCEEDED] == 0


def test_delete_removes_every_row_of_the_job_only(store: JobStore) -> None:
    doomed, kept = new_job(store), new_job(store)
    for job_id in (doomed, kept):
        store.transition(job_id, JobStatus.RUNNING)
        store.ingest(job_id, records())
    assert store.delete_job(doomed)
    assert store.get_job(doomed) is None and not store.delete_job(doomed)
    assert store.metrics(doomed) == ([], []) and store.layer_steps(doomed) == []
    assert store.logs(doomed) == [] and store.events(doomed) == []
    assert len(store.metrics(kept)[0]) == 2 and len(store.layers_at(kept, None).layers) == 2
    assert store.layer_storage_bytes(doomed) == {
        "summaries_rows": 0,
        "summaries_bytes": 0,
        "vectors_rows": 0,
        "vectors_bytes": 0,
    }


def test_data_survives_reopening_the_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'reopen.db'}"
    first = JobStore(url)
    job_id = new_job(first)
    first.transition(job_id, JobStatus.RUNNING)
    first.ingest(job_id, records())
    first.close()
    second = JobStore(url)
    job = second.get_job(job_id)
    assert job.status == "succeeded" and job.record_seq == 7
    assert len(second.metrics(job_id)[0]) == 2 and len(second.layer_history(job_id, "bn1").points) == 2
    assert math.isclose(second.layers_at(job_id, 2).layers["bn1"]["batch_mean_mean"], 0.5)
    second.close()


def test_limits_are_read_from_the_column_types() -> None:
    """The API's bounds come from here: a column's type decides them (see service/store/limits.py)."""
    from sqlalchemy import BigInteger, Column, SmallInteger, String

    from service.store.limits import find_unstorable_text, integer_range, string_length
    from service.store.models import IdempotencyKeyRow, StepPointRow

    assert integer_range(StepPointRow.step) == (-(2**31), 2**31 - 1)
    assert integer_range(Column("n", BigInteger)) == (-(2**63), 2**63 - 1)
    assert integer_range(Column("n", SmallInteger)) == (-(2**15), 2**15 - 1)
    assert string_length(IdempotencyKeyRow.key) == 255
    with pytest.raises(TypeError, match="expected an integer column"):
        integer_range(Column("s", String(8)))
    assert find_unstorable_text({"name": "ok", "dataset": {"path": ["a", "b\x00"]}}) == (
        "dataset.path.1",
        "contains a NUL character (\\x00), which the database cannot store",
    )
    assert find_unstorable_text({"name": "half \ud800 pair"})[1].startswith("contains an unpaired UTF-16 surrogate")
    assert find_unstorable_text({"name": "ünïcödé ✓", "n": 3, "x": None}) is None
