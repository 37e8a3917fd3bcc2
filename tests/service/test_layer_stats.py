"""Per-layer statistics at scale: compact records, bounded storage on SQLite and PostgreSQL, nearest-snapshot
answers and downsampled histories.

Records are built the way the controller builds them (real `BatchStatsRecorder.packed_snapshot` of two "ranks",
merged by `service.engine.reports.records_from_reports`) and stored through the real store; no Ray here.
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import syncbn
from service.engine.recorder import RecordLog
from service.engine.reports import records_from_reports
from service.status import JobStatus
from service.store import JobStore
from service.store.layer_codec import SUMMARY_FIELDS, decode_summary, decode_vectors, encode_summary
from service.store.retention import MIN_KEEP, downsample, nearest, snapshots_to_keep
from tests.service.test_store import store  # noqa: F401  (the SQLite + PostgreSQL store fixture)

pytestmark = pytest.mark.timeout(180)

CHANNELS = (16, 8, 4)


def _model() -> nn.Module:
    return nn.Sequential(*(nn.BatchNorm1d(c) for c in CHANNELS))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: torch's thread pool only adds contention on a shared machine (30x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rank_reports(step: int) -> list[dict[str, Any]]:
    """The `step` reports of two ranks with real packed snapshots (different data per rank: skewed)."""
    reports = []
    for rank in range(2):
        torch.manual_seed(step * 10 + rank)
        model = _model()
        recorder = syncbn.BatchStatsRecorder(model)
        with recorder.recording():
            outs = [layer(torch.randn(6, layer.num_features) + rank + step / 10) for layer in model]
        sum(o.sum() for o in outs).backward()
        packed = recorder.packed_snapshot()
        recorder.close()
        reports.append(
            {
                "kind": "step",
                "step": step,
                "epoch": 1,
                "train_loss": 1.0,
                "lr": 0.1,
                "samples_per_s": 1.0,
                "step_time_s": 0.01,
                "layers": packed,
            }
        )
    return reports


def _records(steps: range) -> list[dict[str, Any]]:
    log = RecordLog("t")
    for step in steps:
        log.push(records_from_reports(_rank_reports(step)))
    return log.poll(0)


def _job(store: JobStore, **spec: Any) -> str:  # noqa: F811
    job_id = uuid.uuid4().hex
    store.create_job(job_id, {"name": "t", **spec})
    store.transition(job_id, JobStatus.RUNNING)
    return job_id


def test_records_carry_summaries_and_float32_blocks_that_the_store_returns(store: JobStore) -> None:  # noqa: F811
    reports = _rank_reports(5)
    records = records_from_reports(reports)
    layers = records[1]
    assert layers["kind"] == "layers" and set(layers["vectors"]) == {"0", "1", "2"}
    assert not any("mean" in summary for summary in layers["layers"].values()), "lists travel as bytes"
    assert len(layers["vectors"]["0"]) == 4 * 4 * 16, "float32, 4 rows x 16 channels"
    reference = syncbn.merge_rank_layer_stats([_dict_of(r["layers"], 0) for r in reports])
    job_id = _job(store)
    store.ingest(job_id, [{**r, "seq": i + 1} for i, r in enumerate(records)])
    stored = store.layers_at(job_id, None).layers["0"]
    np.testing.assert_allclose(stored["mean"], np.float32(reference["mean"]), rtol=0, atol=0)
    np.testing.assert_allclose(stored["running_var"], np.float32(reference["running_var"]), rtol=0, atol=0)
    for key in ("skew_max_gap", "batch_var_mean", "drift_max", "weight_grad_norm"):
        assert stored[key] == pytest.approx(reference[key], rel=1e-6), key
    assert stored["per_rank_count"] == reference["per_rank_count"] and stored["count"] == reference["count"]
    assert stored["ranks"] == 2 and stored["channels"] == 16 and stored["synchronized"] is False
    assert stored["ranks_agree"] is None and stored["dead_channels"] == reference["dead_channels"]
    event = next(e for e in store.events(job_id) if e.kind == "layers")
    assert list(event.data["layers"]) == ["0", "1", "2"] and "mean" not in event.data["layers"]["0"]
    assert event.data["layers"]["0"]["skew_max_gap"] == stored["skew_max_gap"]


def _dict_of(packed: Any, index: int) -> dict[str, Any]:
    """Layer `index` of a packed snapshot in the per-layer dict form (what `snapshot()` returns)."""
    start = sum(packed.channels[:index])
    block = packed.vectors[:, start : start + packed.channels[index]]
    out = {key: block[row].tolist() for row, key in enumerate(syncbn.stats.PACKED_VECTORS)}
    for column, key in enumerate(syncbn.stats.PACKED_SCALARS):
        value = float(packed.scalars[index, column])
        out[key] = None if math.isnan(value) else value
    out["synchronized"] = bool(out["synchronized"])
    for key in ("mean_global", "var_global"):
        out[key] = None
    return out


def test_vectors_are_bounded_by_stats_keep_and_summaries_kept_for_every_step(store: JobStore) -> None:  # noqa: F811
    keep = 8
    job_id = _job(store, stats_keep=keep)
    records = _records(range(1, 41))
    for start in range(0, len(records), 10):  # batches, as the manager drains them
        store.ingest(job_id, records[start : start + 10])
        kept = store.kept_steps(job_id)
        assert len(kept) <= keep
    assert store.layer_steps(job_id) == list(range(1, 41)), "summaries: every recorded step"
    kept = store.kept_steps(job_id)
    assert kept[0] == 1 and kept[-keep // 2 :] == list(range(41 - keep // 2, 41)), kept
    sizes = store.layer_storage_bytes(job_id)
    assert sizes["vectors_rows"] == len(kept) * len(CHANNELS)
    assert sizes["vectors_bytes"] == len(kept) * 16 * sum(CHANNELS), "16 bytes per channel per kept snapshot"
    assert sizes["summaries_rows"] == 40 * len(CHANNELS)
    # the two ranks saw equal counts: one float64 count is stored
    assert sizes["summaries_bytes"] == 40 * len(CHANNELS) * (4 * len(SUMMARY_FIELDS) + 8)

    gone = next(step for step in range(1, 41) if step not in kept)
    with_vectors = store.layers_at(job_id, gone)
    assert with_vectors.requested_step == gone and with_vectors.step == nearest(kept, gone) != gone
    assert len(with_vectors.layers["0"]["mean"]) == 16
    summaries = store.layers_at(job_id, gone, channels=False)
    assert summaries.step == gone and "mean" not in summaries.layers["0"]

    history = store.layer_history(job_id, "1", max_points=5, channels=False)
    assert history.available == 40 and [p.step for p in history.points] == [1, 11, 21, 30, 40]
    snapshots = store.layer_history(job_id, "1", channels=True)
    assert [p.step for p in snapshots.points] == kept and all(len(p.stats["var"]) == 8 for p in snapshots.points)
    assert [p.step for p in store.layer_history(job_id, "1", since_step=35, channels=False).points] == list(
        range(36, 41)
    )


def test_the_heatmap_matrix_matches_the_summaries_and_the_stream_can_skip_them(store: JobStore) -> None:  # noqa: F811
    job_id = _job(store)
    store.ingest(job_id, _records(range(1, 7)))
    keys = ["skew_max_gap", "dead_channels", "weight_grad_norm"]
    matrix = store.layer_matrix(job_id, keys, max_steps=4)
    assert matrix.layers == ["0", "1", "2"] and matrix.available == 6 and matrix.steps == [1, 3, 4, 6]
    for column, step in enumerate(matrix.steps):
        layers = store.layers_at(job_id, step, channels=False).layers
        for row, name in enumerate(matrix.layers):
            for key in keys:
                assert matrix.values[key][row][column] == pytest.approx(layers[name][key], rel=1e-7), (step, key)
    with pytest.raises(ValueError, match="unknown statistics"):
        store.layer_matrix(job_id, ["mean"], max_steps=4)
    events = [e for e in store.events(job_id, layers_after_step=4) if e.kind == "layers"]
    assert ["layers" in e.data for e in events] == [False, False, False, False, True, True]


def test_the_heatmap_matrix_leaves_cells_without_a_value_empty(store: JobStore) -> None:  # noqa: F811
    """A layer that appears late, one that misses a step, and statistics without a value are null cells, both
    when every recorded step is a column and when the steps are downsampled."""
    job_id = _job(store)

    def layer(skew: float | None, drift: float = 0.5) -> dict[str, Any]:
        return {"synchronized": True, "skew_max_gap": skew, "drift_mean": drift, "mean": [1.0], "var": [2.0]}

    records = [
        {"kind": "layers", "step": 1, "epoch": 1, "layers": {"a": layer(1.0), "b": layer(2.0)}},
        {"kind": "layers", "step": 2, "epoch": 1, "layers": {"a": layer(3.0), "b": layer(None), "c": layer(5.0)}},
        {"kind": "layers", "step": 3, "epoch": 2, "layers": {"a": layer(6.0, drift=math.nan), "c": layer(7.0)}},
    ]
    store.ingest(job_id, [{**record, "seq": i + 1} for i, record in enumerate(records)])
    whole = store.layer_matrix(job_id, ["skew_max_gap", "drift_mean"], max_steps=10)
    assert (whole.layers, whole.steps, whole.epochs, whole.available) == (["a", "b", "c"], [1, 2, 3], [1, 1, 2], 3)
    assert whole.values["skew_max_gap"] == [[1.0, 3.0, 6.0], [2.0, None, None], [None, 5.0, 7.0]]
    assert whole.values["drift_mean"] == [[0.5, 0.5, None], [0.5, 0.5, None], [None, 0.5, 0.5]]
    assert all(type(v) is float for row in whole.values["drift_mean"] for v in row if v is not None)
    part = store.layer_matrix(job_id, ["skew_max_gap"], max_steps=2)
    assert (part.steps, part.epochs, part.available) == ([1, 3], [1, 2], 3)
    assert part.values == {"skew_max_gap": [[1.0, 6.0], [2.0, None], [None, 7.0]]}
    empty = store.layer_matrix(_job(store), ["skew_max_gap"], max_steps=10)
    assert (empty.layers, empty.steps, empty.epochs, empty.available, empty.values) == (
        [],
        [],
        [],
        0,
        {"skew_max_gap": []},
    )


def test_retention_rule_keeps_recent_steps_a_log_spaced_past_and_the_first_step() -> None:
    kept: list[int] = []
    for step in range(1, 5001):
        kept = snapshots_to_keep([*kept, step], 64)
        assert len(kept) <= 64
    assert kept[0] == 1 and kept[-32:] == list(range(4969, 5001))
    ages = [5000 - step for step in kept[:-32]]
    gaps = [a - b for a, b in itertools.pairwise(ages)]
    assert gaps[0] > 10 * gaps[-1], f"older snapshots are sparser: {gaps}"
    assert snapshots_to_keep([3, 1, 2], 5) == [1, 2, 3]
    with pytest.raises(ValueError, match=f"keep >= {MIN_KEEP}"):
        snapshots_to_keep([1, 2, 3], 1)
    assert downsample(10, 4) == [0, 3, 6, 9] and downsample(3, 10) == [0, 1, 2] and downsample(5, 1) == [4]
    assert nearest([2, 4, 8], 3) == 2 and nearest([2, 4, 8], 7) == 8 and nearest([], 1) is None


def test_codec_round_trips_flags_nones_and_large_counts() -> None:
    stats = {"synchronized": True, "ranks_agree": False, "dead_channels": 3, "drift_max": float("nan")}
    stats |= {"skew_max_gap": None, "batch_var_mean": 0.25, "per_rank_count": [2.0**40, 7.0]}
    decoded = decode_summary(encode_summary(stats), channels=5)
    assert decoded["synchronized"] is True and decoded["ranks_agree"] is False and decoded["dead_channels"] == 3
    assert decoded["drift_max"] is None and decoded["skew_max_gap"] is None and decoded["batch_var_mean"] == 0.25
    assert decoded["per_rank_count"] == [2.0**40, 7.0] and decoded["count"] == 2.0**40 + 7 and decoded["ranks"] == 2
    block = np.array([[1.0, 2.0], [3.0, 4.0], [np.nan, np.nan], [np.nan, 1.0]], dtype=np.float32)
    assert decode_vectors(block.tobytes()) == {
        "mean": [1.0, 2.0],
        "var": [3.0, 4.0],
        "running_mean": None,
        "running_var": [None, 1.0],
    }


@pytest.mark.parametrize("ranks", [1, 2, 64])
def test_a_summary_of_equal_rank_counts_costs_the_same_for_any_number_of_ranks(ranks: int) -> None:
    stats = {"synchronized": True, "ranks": ranks, "per_rank_count": [48.0] * ranks, "drift_max": 0.5}
    blob = encode_summary(stats)
    assert len(blob) == 4 * len(SUMMARY_FIELDS) + 8
    decoded = decode_summary(blob, channels=3)
    assert decoded["ranks"] == ranks and decoded["per_rank_count"] == [48.0] * ranks
    assert decoded["count"] == 48.0 * ranks and decoded["drift_max"] == 0.5
    uneven = encode_summary({**stats, "ranks": 3, "per_rank_count": [48.0, 48.0, 47.0]})
    assert len(uneven) == 4 * len(SUMMARY_FIELDS) + 8 * 3
    assert decode_summary(uneven, channels=3)["per_rank_count"] == [48.0, 48.0, 47.0]


def test_record_log_releases_layer_payloads_once_polled_past() -> None:
    log = RecordLog("t")
    log.push(records_from_reports(_rank_reports(1)))
    log.push(records_from_reports(_rank_reports(2)))
    assert all("vectors" in r and "layers" in r for r in log.poll(0) if r["kind"] == "layers")
    log.poll(2)  # the reader stored records 1-2
    records = log.poll(0)
    first, second = (r for r in records if r["kind"] == "layers")
    assert first == {"kind": "layers", "step": 1, "epoch": 1, "seq": 2}, "only the stub of a consumed record stays"
    assert "vectors" in second and "layers" in second, "a record not yet consumed keeps its payload"
    assert records[0]["kind"] == "step" and "train_loss" in records[0], "other kinds are kept whole"


def test_json_era_layer_records_are_still_stored(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'old.db'}")  # noqa: F811
    job_id = _job(store)
    old = {"synchronized": True, "mean": [1.0, 2.0], "var": [3.0, 4.0], "running_mean": [0.5, 0.5]}
    store.ingest(job_id, [{"seq": 1, "kind": "layers", "step": 3, "epoch": 1, "layers": {"bn": old}}])
    stats = store.layers_at(job_id, None).layers["bn"]
    assert stats["mean"] == [1.0, 2.0] and stats["running_mean"] == [0.5, 0.5] and stats["running_var"] is None
    store.close()


def test_json_layer_rows_of_an_existing_job_are_migrated_and_can_be_downgraded(store: JobStore) -> None:  # noqa: F811
    """A database at 0001_initial holding JSON layer rows (as 0.1.0 wrote them, a re-recorded step included) is
    upgraded by opening the store: every step's summary and every vector reads back; the downgrade writes JSON."""
    from alembic import command
    from sqlalchemy import text

    from service.store.engine import make_engine
    from service.store.migration import INITIAL_REVISION, alembic_config

    url = store.url
    store.close()
    engine = make_engine(url)
    try:
        with engine.begin() as connection:  # back to the 0.1.0 schema, then rows as 0.1.0 stored them
            config = alembic_config(connection)
            command.downgrade(config, INITIAL_REVISION)
        job_id = uuid.uuid4().hex
        records = _records(range(1, 4))
        merged = {r["step"]: r for r in records if r["kind"] == "layers"}
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO jobs (id, status, spec, created_at, cancel_requested, epochs_done, record_seq, "
                    "event_seq) VALUES (:id, 'succeeded', '{}', CURRENT_TIMESTAMP, false, 1, 0, 0)"
                ),
                {"id": job_id},
            )
            rows = []
            for step in (1, 2, 3, 2):  # step 2 recorded twice: the later row wins, as it did in 0.1.0
                record = merged[step]
                for name, summary in record["layers"].items():
                    stats = {**summary, **decode_vectors(record["vectors"][name])}
                    if step == 2 and len(rows) >= 9:
                        stats["dead_channels"] = 7
                    rows.append({"job": job_id, "step": step, "layer": name, "stats": json.dumps(stats)})
            connection.execute(
                text(
                    "INSERT INTO layer_stats (job_id, step, epoch, layer, stats) "
                    "VALUES (:job, :step, 1, :layer, :stats)"
                ),
                rows,
            )
    finally:
        engine.dispose()

    upgraded = JobStore(url)
    try:
        assert upgraded.layer_steps(job_id) == [1, 2, 3] and upgraded.kept_steps(job_id) == [1, 2, 3]
        assert list(upgraded.layers_at(job_id, None).layers) == ["0", "1", "2"], "model order kept"
        for step in (1, 2, 3):
            layers = upgraded.layers_at(job_id, step).layers
            for name, summary in merged[step]["layers"].items():
                expected = decode_vectors(merged[step]["vectors"][name])
                assert {k: layers[name][k] for k in expected} == expected, (step, name)
                assert layers[name]["skew_max_gap"] == pytest.approx(summary["skew_max_gap"], rel=1e-6)
                assert layers[name]["dead_channels"] == (7 if step == 2 else summary["dead_channels"])
    finally:
        upgraded.close()

    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), INITIAL_REVISION)
        with engine.connect() as connection:
            back = connection.execute(
                text("SELECT step, layer, stats FROM layer_stats WHERE job_id = :id ORDER BY step, id"), {"id": job_id}
            ).all()
    finally:
        engine.dispose()
    assert [(step, layer) for step, layer, _ in back] == [(s, n) for s in (1, 2, 3) for n in ("0", "1", "2")]
    stats = back[0][2] if isinstance(back[0][2], dict) else json.loads(back[0][2])
    assert stats["mean"] == decode_vectors(merged[1]["vectors"]["0"])["mean"]


def _only(record: dict[str, Any], names: tuple[str, ...], **changes: Any) -> dict[str, Any]:
    """`record` (a layers record) with only the layers `names`."""
    layers = {name: record["layers"][name] for name in names}
    vectors = {name: record["vectors"][name] for name in names}
    return {**record, "layers": layers, "vectors": vectors, **changes}


def test_two_writers_share_a_jobs_layer_series_and_a_re_recorded_step_replaces_the_first(
    store: JobStore,  # noqa: F811
) -> None:
    """Two stores on one database (a leader, then its successor, then the first again): each finds the layers the
    other added (the first one's cached series are not the whole truth), and a step stored twice keeps the later
    record only (a resumed run), summaries and vectors alike."""
    layers = [r for r in _records(range(1, 5)) if r["kind"] == "layers"]
    job_id = _job(store, stats_keep=4)
    successor = JobStore(store.engine.url.render_as_string(hide_password=False))
    try:
        store.ingest(job_id, [_only(layers[0], ("0",), seq=1)])
        successor.ingest(job_id, [_only(layers[1], ("0", "1"), seq=2)])
        store.ingest(job_id, [_only(layers[2], ("0", "1", "2"), seq=3)])
        assert store.layer_names(job_id) == ["0", "1", "2"]
        assert [p.step for p in store.layer_history(job_id, "1", channels=False).points] == [2, 3]
        assert [p.step for p in store.layer_history(job_id, "2", channels=False).points] == [3]

        again = _only(layers[3], ("0", "1", "2"), seq=4, step=2)  # step 2 recorded again, with step 4's numbers
        successor.ingest(job_id, [again])
        assert store.layer_steps(job_id) == [1, 2, 3], "one row per step"
        at_two = store.layers_at(job_id, 2)
        at_four = store.layers_at(job_id, None)  # still step 3: the newest step
        assert at_two.step == 2 and at_four.step == 3
        expected = decode_vectors(layers[3]["vectors"]["1"])
        np.testing.assert_array_equal(at_two.layers["1"]["mean"], expected["mean"])
        assert at_two.layers["0"]["skew_max_gap"] == pytest.approx(layers[3]["layers"]["0"]["skew_max_gap"], rel=1e-6)
    finally:
        successor.close()
