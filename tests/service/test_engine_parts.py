"""The engine's parts without Ray: models, data sets (npz checks included), schedules, verdicts, report merging and
the record log. The distributed runs themselves are in test_engine_runs.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import syncbn
from service.engine.convergence import ConvergenceTracker, divergence_reason
from service.engine.data import load_data
from service.engine.model_registry import build_model
from service.engine.optimization import LearningRate, build_optimizer
from service.engine.recorder import RecordLog
from service.engine.reports import records_from_reports, steps_per_report
from service.spec import DatasetSpec, EarlyStopSpec, LrScheduleSpec, OptimizerSpec

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ models


@pytest.mark.parametrize(
    ("name", "shape", "bn_layers"),
    [("resnet18", (3, 8, 8), 20), ("small_resnet", (1, 8, 8), 9), ("cnn", (1, 8, 8), 3), ("mlp", (20,), 2)],
)
def test_models_build_with_plain_batchnorm_and_round_trip_through_syncbn(
    name: str, shape: tuple[int, ...], bn_layers: int
) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=7)
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(layers) == bn_layers
    assert all(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in layers)
    x = torch.randn(4, *shape)
    assert model(x).shape == (4, 7)

    synced = syncbn.convert_sync_batchnorm(model)
    assert sum(isinstance(m, syncbn.SyncBatchNorm) for m in synced.modules()) == bn_layers
    synced(x)  # one training step's forward: running stats move
    plain = syncbn.revert_sync_batchnorm(synced)
    fresh = build_model(name, shape, num_classes=7)
    fresh.load_state_dict(plain.state_dict(), strict=True)


def test_conv_model_refuses_vectors() -> None:
    with pytest.raises(ValueError, match="expects image samples"):
        build_model("cnn", (20,), 3)


def test_same_seed_same_weights() -> None:
    torch.manual_seed(3)
    a = build_model("small_resnet", (1, 8, 8), 10).state_dict()
    torch.manual_seed(3)
    b = build_model("small_resnet", (1, 8, 8), 10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ data


def test_digits_split_is_seeded_and_standardised() -> None:
    a = load_data(DatasetSpec(kind="digits"), seed=1)
    b = load_data(DatasetSpec(kind="digits"), seed=1)
    c = load_data(DatasetSpec(kind="digits"), seed=2)
    assert a.x_train.shape == (1438, 1, 8, 8) and a.x_val.shape == (359, 1, 8, 8)
    assert a.num_classes == 10 and a.sample_shape == (1, 8, 8)
    assert torch.equal(a.y_val, b.y_val) and not torch.equal(a.y_val, c.y_val)
    assert abs(float(a.x_train.mean())) < 1e-4 and abs(float(a.x_train.std()) - 1) < 1e-3


def test_synthetic_is_seeded() -> None:
    spec = DatasetSpec(kind="synthetic", num_samples=100, num_classes=3, input_shape=[2, 4, 4])
    a, b = load_data(spec, seed=5), load_data(spec, seed=5)
    assert a.x_train.shape == (80, 2, 4, 4) and a.num_classes == 3
    assert torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_train, load_data(spec, seed=6).x_train)


def _npz_spec(name: str) -> DatasetSpec:
    return DatasetSpec(kind="npz", path=name)


def test_npz_loads_and_uses_its_validation_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "ok.npz",
        x=rng.normal(size=(30, 8, 8)).astype(np.float32),
        y=rng.integers(0, 4, 30),
        x_val=rng.normal(size=(6, 8, 8)),
        y_val=np.arange(6) % 4,
    )
    data = load_data(_npz_spec("ok.npz"), seed=0, data_root=tmp_path)
    assert data.x_train.shape == (30, 1, 8, 8) and data.x_val.shape == (6, 1, 8, 8)
    assert data.num_classes == 4 and data.y_train.dtype == torch.int64


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 3))}, "must hold arrays 'x' and 'y'"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(3, dtype=np.int64)}, "must have shape (4,)"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(4)}, "integer class labels"),
        ({"x": np.zeros(4), "y": np.zeros(4, dtype=np.int64)}, "(N, features)"),
        ({"x": np.full((4, 3), np.nan), "y": np.zeros(4, dtype=np.int64)}, "NaN or infinite"),
        ({"x": np.zeros((4, 3)), "y": np.full(4, -1)}, "labels must lie in"),
        ({"x": np.array([{"a": 1}] * 4, dtype=object), "y": np.zeros(4, dtype=np.int64)}, "without pickle"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(4, dtype=np.int64), "x_val": np.zeros((2, 3))}, "both 'x_val'"),
    ],
)
def test_npz_refuses_bad_files_with_a_sentence(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_data(_npz_spec("bad.npz"), seed=0, data_root=tmp_path)


def test_npz_needs_a_data_root_and_a_real_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a data root"):
        load_data(_npz_spec("x.npz"), seed=0)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        load_data(_npz_spec("junk.npz"), seed=0, data_root=tmp_path)


# ------------------------------------------------------------------ optimisation and verdicts


def test_optimizers() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer(OptimizerSpec(name="sgd", nesterov=True), params), torch.optim.SGD)
    assert isinstance(build_optimizer(OptimizerSpec(name="adam", lr=1e-3), params), torch.optim.Adam)
    assert isinstance(build_optimizer(OptimizerSpec(name="adamw", lr=1e-3), params), torch.optim.AdamW)


def test_learning_rate_warmup_cosine_and_step() -> None:
    cosine = LearningRate(0.4, LrScheduleSpec(name="cosine", warmup_epochs=1, min_lr=0.0), 10, epochs=5)
    assert cosine.at(0) == pytest.approx(0.04) and cosine.at(9) == pytest.approx(0.4)
    assert cosine.at(10) == pytest.approx(0.4)
    assert cosine.at(30) == pytest.approx(0.2)  # half-way through the decay
    assert cosine.at(49) < 0.01
    step = LearningRate(1.0, LrScheduleSpec(name="step", step_epochs=2, gamma=0.5), 10, epochs=6)
    assert [step.at(s) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]
    assert LearningRate(0.1, LrScheduleSpec(), 10, 3).at(29) == 0.1


def test_convergence_verdicts() -> None:
    target = ConvergenceTracker(EarlyStopSpec(target_val_acc=0.9))
    assert [target.update(e, acc) for e, acc in enumerate((0.5, 0.8, 0.95), 1)] == [None, None, "converged"]

    patience = ConvergenceTracker(EarlyStopSpec(patience=2, min_delta=0.01))
    verdicts = [patience.update(e, acc) for e, acc in enumerate((0.5, 0.7, 0.705, 0.69), 1)]
    assert verdicts == [None, None, None, "plateaued"]
    assert patience.best_val_acc == 0.705 and patience.best_epoch == 3

    resumed = ConvergenceTracker(EarlyStopSpec(patience=2))
    resumed.load_state_dict(patience.state_dict())
    assert resumed.epochs_without_improvement == 2

    never = ConvergenceTracker(None)
    assert all(never.update(e, 0.1) is None for e in range(1, 5))


def test_divergence_reason_names_step_and_fix() -> None:
    assert divergence_reason(1.5, 3, 1, 0.1) is None
    reason = divergence_reason(math.nan, 17, 2, 0.5)
    assert reason is not None and "nan at step 17 (epoch 2" in reason and "lower optimizer.lr" in reason
    assert "inf" in (divergence_reason(math.inf, 1, 1, 0.1) or "")


# ------------------------------------------------------------------ reports and the record log


def _snapshots(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[dict, syncbn.stats.PackedLayerStats]]:
    """Real recorder snapshots of plain BatchNorm, one per simulated rank (different batches), in both forms."""
    recorder = syncbn.BatchStatsRecorder(model)
    out = []
    for x in batches:
        with recorder.recording():
            model(x).sum().backward()
        out.append((recorder.snapshot(), recorder.packed_snapshot()))
    return out


def test_records_from_reports_merges_layers_across_ranks() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10)
    batches = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8) + 2.0]  # rank 1's batch sits elsewhere: skew
    snaps = _snapshots(model, batches)
    step = {"kind": "step", "step": 4, "epoch": 1, "train_loss": 2.3, "lr": 0.1, "samples_per_s": 10.0}
    per_rank = [{**step, "step_time_s": 0.1, "layers": snaps[r][1]} for r in range(2)]  # what the train loop sends
    records = records_from_reports(per_rank)
    assert [r["kind"] for r in records] == ["step", "layers"]
    assert records[0] == {**step, "kind": "step", "step_time_s": 0.1}
    layers, vectors = records[1]["layers"], records[1]["vectors"]
    assert set(layers) == set(vectors) == {"features.1", "features.4", "features.7"}
    first = layers["features.1"]
    assert first["synchronized"] is False and first["ranks_agree"] is None
    assert first["count"] == 2 * 4 * 64 and first["channels"] == 32
    assert len(vectors["features.1"]) == 4 * 32 * 4, "mean, var, running mean, running var as float32"
    assert first["skew_between_share_max"] > 0.1  # the shifted rank shows up as cross-worker skew

    from_dicts = records_from_reports([{**r, "layers": snaps[i][0]} for i, r in enumerate(per_rank)])[1]
    assert from_dicts["vectors"] == vectors, "the per-layer dicts of older train loops give the same records"
    for name, summary in from_dicts["layers"].items():
        assert summary.keys() == layers[name].keys()
        for key, value in summary.items():
            expected = layers[name][key]
            assert value == (pytest.approx(expected, rel=1e-12) if isinstance(expected, float) else expected), key


def test_a_steps_report_gives_the_records_of_each_step_in_order() -> None:
    """With stats_every below REPORT_EVERY_STEPS the loop reports several recorded steps at once: the records are
    those of one report per step, in step order, and ranks that disagree on the steps are refused."""
    torch.manual_seed(1)
    model = build_model("cnn", (1, 8, 8), 10)
    reports = []  # per step, the two ranks' `step` reports as the loop builds them
    for step in (1, 2, 3):
        snaps = _snapshots(model, [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8) + step])
        base = {"kind": "step", "step": step, "epoch": 1, "train_loss": 2.0, "lr": 0.1, "samples_per_s": 9.0}
        reports.append([{**base, "step_time_s": 0.1, "layers": snaps[rank][1]} for rank in range(2)])
    together = records_from_reports([{"kind": "steps", "steps": [r[rank] for r in reports]} for rank in range(2)])
    one_by_one = [record for per_rank in reports for record in records_from_reports(per_rank)]
    assert [(r["kind"], r["step"]) for r in together] == [(k, s) for s in (1, 2, 3) for k in ("step", "layers")]
    assert [r["vectors"] for r in together if r["kind"] == "layers"] == [
        r["vectors"] for r in one_by_one if r["kind"] == "layers"
    ]
    with pytest.raises(ValueError, match="same number of steps"):
        records_from_reports([{"kind": "steps", "steps": reports[0][:1]}, {"kind": "steps", "steps": reports[1]}])
    assert [steps_per_report(every) for every in (1, 2, 3, 9, 10, 50)] == [10, 5, 4, 2, 1, 1]
    with pytest.raises(ValueError, match="stats_every"):
        steps_per_report(0)


def test_records_from_reports_refuses_mixed_kinds() -> None:
    with pytest.raises(ValueError, match="same kind"):
        records_from_reports([{"kind": "step"}, {"kind": "epoch"}])


def test_record_log_orders_dedups_and_ends_once() -> None:
    log = RecordLog("j1")
    log.push([{"kind": "info", "world_size": 2}, {"kind": "step", "step": 5, "epoch": 1}])
    log.push([{"kind": "layers", "step": 5, "epoch": 1, "layers": {}}])
    log.push([{"kind": "epoch", "epoch": 1, "step": 10, "val_acc": 0.5, "train_loss": 1.0}])
    # a resumed attempt reports step 5 and epoch 1 again: dropped
    log.push([{"kind": "step", "step": 5, "epoch": 1}, {"kind": "epoch", "epoch": 1, "step": 10, "val_acc": 0.4}])
    log.push([{"kind": "step", "step": 15, "epoch": 2}])
    assert [r["seq"] for r in log.poll(0)] == [1, 2, 3, 4]
    assert [r["kind"] for r in log.poll(2)] == ["epoch", "step"]
    assert log.poll(1, limit=1)[0]["seq"] == 2
    assert log.info() == {"world_size": 2}

    end = log.finish("cancelled")
    assert end["status"] == "cancelled" and end["epochs_done"] == 1 and end["best_val_acc"] == 0.5
    assert log.finish("failed", "late") is end  # the first end wins
    log.push([{"kind": "step", "step": 20, "epoch": 2}])
    assert log.poll(0)[-1]["kind"] == "end" and log.done()
    with pytest.raises(ValueError, match="expected status"):
        RecordLog("j2").finish("exploded")


def test_record_log_builds_end_from_the_summary() -> None:
    log = RecordLog("j3")
    summary = {
        "kind": "summary",
        "verdict": "converged",
        "reason": None,
        "epochs_done": 3,
        "best_val_acc": 0.97,
        "final_val_acc": 0.97,
        "final_train_loss": 0.1,
        "model_path": "/x/model.pt",
    }
    log.push([summary])
    assert "verdict converged" in log.poll(0)[0]["message"]
    end = log.finish("succeeded", model_path="/x/model.pt")
    assert end["verdict"] == "converged" and end["epochs_done"] == 3 and end["model_path"] == "/x/model.pt"


def test_record_log_keeps_the_timeline_and_puts_it_in_the_end_record() -> None:
    log = RecordLog("j4", launched_at=100.0)
    start = [{"kind": "start", "rank": r, "pid": r, "hostname": "h", "device": "cpu", "world_size": 2,
              "steps_per_epoch": 3, "total_steps": 6, "resumed_from_epoch": 0,
              "times": {"loop_started": 104.0, "model_ready": 104.5}} for r in range(2)]  # fmt: skip
    log.push(records_from_reports(start))
    log.mark("driver_started", 101.0)
    log.mark("driver_started", 150.0)  # a start-up mark keeps its first time
    log.mark("workers_ready", 103.5)
    final = {"kind": "final", "verdict": "completed", "reason": None, "epochs_done": 2, "best_val_acc": 0.9,
             "final_val_acc": 0.9, "final_val_acc_precise": None, "final_train_loss": 0.1,
             "times": {"first_step": 105.0, "last_step": 110.0,
                       "epochs": [[1, 104.6, 107.0, 107.2], [2, 107.2, 110.0, 110.3]]}}  # fmt: skip
    log.push(records_from_reports([final, final]))
    log.mark("last_step", 111.0)  # a wrap-up mark keeps its latest time (a later attempt's)
    assert all(r["kind"] not in ("timeline", "info", "summary") for r in log.poll(0))
    end = log.finish("succeeded", model_path="/x/model.pt")
    timeline = end["timeline"]
    assert timeline["launched"] == 100.0 and timeline["driver_started"] == 101.0
    assert timeline["loop_started"] == 104.0 and timeline["first_step"] == 105.0 and timeline["last_step"] == 111.0
    assert [e[0] for e in timeline["epochs"]] == [1, 2] and timeline["ended"] == end["finished_at"]
    timing = [r for r in log.poll(0) if r["kind"] == "log" and r["message"].startswith("timing:")]
    assert len(timing) == 1 and "start-up to the first step 5.00 s" in timing[0]["message"]
    assert "model build 0.50" in timing[0]["message"]


def test_digits_read_from_the_shipped_file_equal_scikit_learns_loader() -> None:
    from sklearn.datasets import load_digits

    from service.engine.data.in_memory import _digits

    x, y = _digits()
    bunch = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8))
    assert torch.equal(y, torch.from_numpy(bunch.target.astype(np.int64)))
