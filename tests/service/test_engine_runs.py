"""Real training runs on a real local Ray (Ray Train V2, gloo): records, per-layer statistics, the saved model,
recovery from a killed worker, cancellation, and the `syncbn train` command.

Runs are tiny (a few steps) so the module takes about a minute and a half on two cores; most of it is Ray Train
starting worker groups.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from service.cli import main
from service.engine.data import load_data
from service.engine.model_registry import build_model
from service.engine.runner import JobRun, attach_run, driver_name, launch_run
from service.spec import JobSpec
from service.store.layer_codec import decode_vectors

pytestmark = pytest.mark.timeout(240)

SMALL_RESNET_BN = {
    "stem.1",
    "stages.0.0.bn1",
    "stages.0.0.bn2",
    "stages.1.0.bn1",
    "stages.1.0.bn2",
    "stages.1.0.shortcut.1",
    "stages.2.0.bn1",
    "stages.2.0.bn2",
    "stages.2.0.shortcut.1",
}


def _job_id() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _follow(run: JobRun, timeout: float = 180.0, on_record: Any = None) -> list[dict[str, Any]]:
    """Every record of the run until its end record (fails the test after `timeout` seconds)."""
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        new = run.poll(records[-1]["seq"] if records else 0)
        for record in new:
            records.append(record)
            if on_record is not None:
                on_record(record)
        if records and records[-1]["kind"] == "end":
            return records
        if not new and run.done() and not run.poll(records[-1]["seq"] if records else 0):
            pytest.fail(f"run {run.job_id} is done but wrote no end record: {records[-3:]}")
        assert time.monotonic() < deadline, f"run {run.job_id} did not end in {timeout} s: {records[-3:]}"
        time.sleep(0.1)


def _wait_for_record(run: JobRun, kind: str, timeout: float = 120.0) -> list[dict[str, Any]]:
    """The run's records once one of `kind` has arrived (fails the test after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        records = run.poll(0)
        if any(r["kind"] == kind for r in records):
            return records
        assert time.monotonic() < deadline, f"no {kind} record in {timeout} s: {records[-3:]}"
        time.sleep(0.2)


def _wait_for_cpus(expected: float, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        available = ray.available_resources().get("CPU", 0.0)
        if available >= expected or time.monotonic() > deadline:
            return available
        time.sleep(0.2)


def test_two_worker_sync_bn_run_records_stats_and_saves_a_plain_model(ray_cluster: dict, tmp_path: Path) -> None:
    spec = JobSpec(
        model="small_resnet",
        workers=2,
        epochs=2,
        batch_size=16,
        steps_per_epoch=6,
        stats_every=3,
        sync_bn=True,
        seed=7,
        optimizer={"name": "sgd", "lr": 0.05},
    )
    run = launch_run(spec, _job_id(), tmp_path)
    records = _follow(run)

    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    kinds = [r["kind"] for r in records]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    assert {"step", "layers", "epoch", "log"} <= set(kinds)

    steps = [r for r in records if r["kind"] == "step"]
    assert [s["step"] for s in steps] == [3, 6, 9, 12]
    for s in steps:
        assert s["train_loss"] > 0 and s["lr"] == pytest.approx(0.05)
        assert s["samples_per_s"] > 0 and s["step_time_s"] > 0 and s["epoch"] in (1, 2)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and [e["step"] for e in epochs] == [6, 12]
    assert all(0 <= e["val_acc"] <= 1 and 0 <= e["train_acc"] <= 1 and e["epoch_time_s"] > 0 for e in epochs)

    layer_records = [r for r in records if r["kind"] == "layers"]
    assert [r["step"] for r in layer_records] == [3, 6, 9, 12]
    for record in layer_records:
        assert set(record["layers"]) == SMALL_RESNET_BN
        for name, layer in record["layers"].items():
            # every rank normalised with the same global statistics: that is what synchronisation means
            assert layer["synchronized"] is True and layer["ranks_agree"] is True, name
            assert layer["ranks"] == 2 and len(layer["per_rank_count"]) == 2
            vectors = decode_vectors(record["vectors"][name])  # per-channel vectors travel as float32 blocks
            assert len(vectors["mean"]) == len(vectors["var"]) == len(vectors["running_mean"]) == layer["channels"]
            assert layer["drift_mean"] is not None and layer["skew_max_gap"] >= 0
            assert layer["weight_grad_norm"] is not None and layer["dead_channels"] >= 0
    stem = layer_records[0]["layers"]["stem.1"]
    assert stem["count"] == 2 * 16 * 8 * 8  # two ranks x 16 samples x 8x8 positions

    end = records[-1]
    assert end["status"] == "succeeded" and end["verdict"] == "completed" and end["error"] is None
    assert end["epochs_done"] == 2 and end["final_val_acc"] == epochs[-1]["val_acc"]
    # The final model lives in the run storage (default: output_dir/ray), in the run's last checkpoint.
    run_folder = tmp_path.resolve() / "ray" / f"syncbn-{run.job_id}"
    assert Path(end["model_path"]).name == "model.pt" and Path(end["model_path"]).is_relative_to(run_folder)

    # The saved model is a plain BatchNorm state dict for the architecture as build_model makes it, and it is
    # the model the reported validation accuracy describes.
    model = build_model("small_resnet", (1, 8, 8), 10)
    model.load_state_dict(torch.load(end["model_path"], weights_only=True), strict=True)
    model.eval()
    data = load_data(spec.dataset, spec.seed)
    with torch.no_grad():
        accuracy = float((model(data.x_val).argmax(1) == data.y_val).double().mean())
    assert accuracy == pytest.approx(end["final_val_acc"], abs=1e-9)

    assert run.done()
    run.close()
    assert attach_run(run.job_id) is None
    assert _wait_for_cpus(ray_cluster["cpus"]) == ray_cluster["cpus"]


def test_killed_worker_is_replaced_and_training_resumes_from_checkpoint(ray_cluster: dict, tmp_path: Path) -> None:
    spec = JobSpec(
        model="small_resnet",
        workers=2,
        epochs=3,
        batch_size=32,
        stats_every=10,
        max_failures=1,
        checkpoint_every=1,
        seed=1,
    )
    run = launch_run(spec, _job_id(), tmp_path)
    killed: list[int] = []

    def kill_rank1_after_first_epoch(record: dict[str, Any]) -> None:
        if record["kind"] == "epoch" and record["epoch"] == 1 and not killed:
            pid = next(w["pid"] for w in run.info()["workers"] if w["rank"] == 1)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    records = _follow(run, on_record=kill_rank1_after_first_epoch)
    end = records[-1]
    assert killed, "the run ended before the first epoch was reported"
    assert end["status"] == "succeeded", end
    assert end["epochs_done"] == 3
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3]
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == sorted(set(steps))  # the resumed attempt's repeated steps are recorded once
    errors = [r["message"] for r in records if r["kind"] == "log" and r["level"] == "error"]
    assert any(m.startswith("rank 1:") for m in errors), errors
    starts = [r["message"] for r in records if r["kind"] == "log" and "workers on cpu" in r["message"]]
    assert len(starts) == 2 and "resuming after epoch" in starts[1], starts
    assert killed[0] not in [w["pid"] for w in run.info()["workers"]]
    assert run.info()["resumed_from_epoch"] >= 1
    run.close()


def test_cancel_stops_the_run_and_frees_its_cpus(ray_cluster: dict, tmp_path: Path) -> None:
    total = ray_cluster["cpus"]
    # Four half-CPU workers synchronising BatchNorm in two groups of two (ranks 0-1 and 2-3).
    spec = JobSpec(model="cnn", workers=4, cpus_per_worker=0.5, sync_group_size=2, epochs=200, stats_every=5)
    run = launch_run(spec, _job_id(), tmp_path)
    _wait_for_record(run, "layers")
    assert ray.available_resources().get("CPU", 0.0) <= total - 2
    layers = next(r for r in run.poll(0) if r["kind"] == "layers")["layers"]
    for layer in layers.values():
        # each group normalises with its own global statistics, so the four ranks do not all agree
        assert layer["synchronized"] is True and layer["ranks_agree"] is False
        assert layer["per_rank_count"] == [layer["count"] / 4] * 4

    with pytest.raises(ValueError, match="still exists"):
        launch_run(spec, run.job_id, tmp_path)
    again = attach_run(run.job_id)  # what a restarted service does
    assert again is not None and again.poll(0)[:2] == run.poll(0)[:2]
    run.cancel()
    end = run.end()
    assert end is not None and end["status"] == "cancelled" and end["verdict"] is None
    assert again.done() and again.poll(0)[-1]["kind"] == "end"
    assert _wait_for_cpus(total) == total
    with pytest.raises(ValueError):
        ray.get_actor(driver_name(run.job_id), namespace="syncbn")
    run.cancel()  # cancelling a finished run changes nothing
    assert run.end() == end
    run.close()


def test_cancel_without_the_record_log_still_frees_the_cpus(ray_cluster: dict, tmp_path: Path) -> None:
    total = ray_cluster["cpus"]
    run = launch_run(JobSpec(model="mlp", workers=2, epochs=200, stats_every=5), _job_id(), tmp_path)
    _wait_for_record(run, "step")
    ray.kill(run._recorder, no_restart=True)  # as when the record log's node is lost
    run.cancel(timeout=30)  # aborts through the driver's copy of the controller handle
    with pytest.raises(ValueError):
        ray.get_actor(driver_name(run.job_id), namespace="syncbn")
    assert _wait_for_cpus(total) == total, "the run's placement group must be removed"


def test_a_killed_driver_leaves_no_placement_group_reserved(ray_cluster: dict, tmp_path: Path) -> None:
    total = ray_cluster["cpus"]
    run = launch_run(JobSpec(model="mlp", workers=2, epochs=200, stats_every=5), _job_id(), tmp_path)
    _wait_for_record(run, "step")
    assert len(ray.get(run._recorder.placement_groups.remote())) == 1
    # Killed from outside, not through cancel: the controller dies with its owner, the placement group stays.
    ray.kill(ray.get_actor(driver_name(run.job_id), namespace="syncbn"), no_restart=True)
    assert run.done() and run.end()["status"] == "failed"
    run.close()  # what the manager does with a run that is over
    assert _wait_for_cpus(total) == total, "the dead driver's placement group must be removed"


def test_launch_refuses_a_malformed_job_id(ray_cluster: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="job_id must be"):
        launch_run(JobSpec(), "../escape", tmp_path)


def test_npz_job_with_a_bad_file_fails_with_the_reason(ray_cluster: dict, tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"junk")
    spec = JobSpec(model="mlp", dataset={"kind": "npz", "path": "bad.npz"})
    run = launch_run(spec, _job_id(), tmp_path / "out", data_root=tmp_path)
    end = _follow(run, timeout=60)[-1]
    assert end["status"] == "failed" and "not a readable .npz file" in end["error"]
    run.close()


def test_worker_exception_fails_the_job_with_rank_and_message(ray_cluster: dict, tmp_path: Path) -> None:
    # One sample per rank through plain BatchNorm1d: torch refuses to normalise a single value per channel.
    spec = JobSpec(
        model="mlp",
        dataset={"kind": "synthetic", "num_samples": 64, "input_shape": [12]},
        workers=2,
        batch_size=1,
        sync_bn=False,
    )
    run = launch_run(spec, _job_id(), tmp_path)
    records = _follow(run, timeout=120)
    end = records[-1]
    assert end["status"] == "failed" and end["verdict"] is None and end["model_path"] is None
    # Both ranks fail the same way; which ones the controller has seen fail when it stops depends on timing.
    expected = r"^rank [01]: ValueError: Expected more than 1 value per channel when training"
    assert all(re.match(expected, part) for part in end["error"].split("; ")), end
    run.close()


def test_cli_train_writes_metrics_model_and_summary(ray_cluster: dict, tmp_path: Path, capsys: Any) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        "model: cnn\nworkers: 2\nepochs: 3\nbatch_size: 8\nsteps_per_epoch: 4\nstats_every: 2\nsync_bn: false\n"
        "early_stop: {target_val_acc: 0.01}\n"  # reached after the first epoch: every rank stops there
    )
    out = tmp_path / "out"
    code = main(["train", str(spec_path), "--output", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    assert summary["status"] == "succeeded" and summary["wall_time_s"] > 0
    assert summary["verdict"] == "converged" and summary["epochs_done"] == 1
    assert json.loads((out / "summary.json").read_text())["job_id"] == summary["job_id"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "end" and [r["seq"] for r in records] == list(range(1, len(records) + 1))
    layers = [r for r in records if r["kind"] == "layers"]
    assert len(layers) == 2
    for layer in layers[0]["layers"].values():
        # local BatchNorm: no global statistics of its own, so no agreement to check; skew still measured
        assert layer["synchronized"] is False and layer["ranks_agree"] is None
        assert layer["skew_between_share_mean"] >= 0
    model = build_model("cnn", (1, 8, 8), 10)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=True)
    assert JobSpec.model_validate_json((out / "spec.json").read_text()).sync_bn is False
    assert ray.is_initialized()  # the CLI leaves a Ray it did not start alone


def test_cli_train_refuses_a_bad_spec(tmp_path: Path, capsys: Any) -> None:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({"workers": 3, "sync_group_size": 2}))
    assert main(["train", str(spec_path)]) == 2
    assert "sync_group_size must divide workers" in capsys.readouterr().err
