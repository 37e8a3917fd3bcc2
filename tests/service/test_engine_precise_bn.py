"""precise_bn in real runs on a real local Ray (2 gloo workers, synchronized BatchNorm): both validation accuracies
are reported every epoch, the saved model carries the exact population statistics of the recalibration batches
(checked against plain BatchNorm on each round's concatenated global batch) and scores what was reported; the lag
warning's rule, and the spec's bounds."""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
from torch import nn

from service.engine.data import load_data
from service.engine.data.rank_batches import MemoryBatches
from service.engine.model_registry import build_model
from service.engine.runner import JobRun, launch_run
from service.engine.running_lag import LAG_THRESHOLD, lag_warning
from service.spec import JobSpec

pytestmark = pytest.mark.timeout(600)


def _follow(run: JobRun, timeout: float = 500.0) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not records or records[-1]["kind"] != "end":
        records += run.poll(records[-1]["seq"] if records else 0)
        assert time.monotonic() < deadline, f"run {run.job_id} did not end in {timeout} s: {records[-3:]}"
        time.sleep(0.2)
    return records


def _population_stats(model: nn.Module, spec: JobSpec, epoch: int, batches: int) -> dict[str, torch.Tensor]:
    """Running stats precise_bn must leave: plain BatchNorm in train mode on each round's global batch, pooled."""
    data = load_data(spec.dataset, spec.seed)
    ranks = [MemoryBatches(data, spec.batch_size, spec.steps_per_epoch, spec.seed, r, 2, False) for r in (0, 1)]
    streams = [iter(r.train(epoch)) for r in ranks]
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for name, layer in layers.items():
        layer.register_forward_pre_hook(lambda _m, args, n=name: seen[n].append(args[0].double()))
    model.eval()
    for layer in layers.values():
        layer.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.cat([next(s)[0] for s in streams]))
    expected = {}
    for name in layers:
        x = torch.cat(seen[name])
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        expected[f"{name}.running_mean"] = flat.mean(1)
        expected[f"{name}.running_var"] = flat.var(1)
    return expected


def test_precise_bn_reports_both_accuracies_and_saves_the_exact_statistics(ray_cluster: dict, tmp_path: Path) -> None:
    spec = JobSpec(
        model="cnn",
        workers=2,
        epochs=2,
        batch_size=16,
        steps_per_epoch=6,
        stats_every=3,
        sync_bn=True,
        seed=3,
        optimizer={"name": "sgd", "lr": 0.1},
        precise_bn={"batches": 4, "every": "epoch"},
    )
    run = launch_run(spec, f"test-{uuid.uuid4().hex[:8]}", tmp_path)
    records = _follow(run)
    end = records[-1]
    assert end["status"] == "succeeded", end
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert 0 <= e["val_acc"] <= 1 and 0 <= e["val_acc_precise"] <= 1 and e["val_loss_precise"] > 0
    assert end["final_val_acc_precise"] == epochs[-1]["val_acc_precise"]
    assert end["final_val_acc"] == epochs[-1]["val_acc"]

    state = torch.load(end["model_path"], weights_only=True)
    model = build_model("cnn", (1, 8, 8), 10)
    model.load_state_dict(state, strict=True)
    reference = build_model("cnn", (1, 8, 8), 10)
    reference.load_state_dict(state, strict=True)
    for key, value in _population_stats(reference, spec, epoch=2, batches=4).items():
        torch.testing.assert_close(state[key].double(), value, rtol=1e-4, atol=1e-5, msg=key)
    # The saved model is the one the precise accuracy describes.
    data = load_data(spec.dataset, spec.seed)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(data.x_val).argmax(1) == data.y_val).double().mean())
    assert accuracy == pytest.approx(end["final_val_acc_precise"], abs=1e-9)
    run.close()


def test_the_lag_warning_counts_drift_beyond_batch_noise_only() -> None:
    def steps(drift: float, count: int) -> list[dict[str, dict[str, Any]]]:
        return [{"a": {"drift_mean": 0.01, "count": count}, "b": {"drift_mean": drift, "count": count}}] * 5

    noise = math.sqrt(2 / (math.pi * 16))  # a batch of 16 values per channel misses the mean by this much
    assert lag_warning(steps(noise + LAG_THRESHOLD / 2, 16), precise_bn_ran=False) is None
    warning = lag_warning(steps(noise + 2 * LAG_THRESHOLD, 16), precise_bn_ran=False)
    assert warning is not None and "layer 'b'" in warning and "precise_bn" in warning and "cosine" in warning
    done = lag_warning(steps(0.3, 10_000), precise_bn_ran=True)
    assert done is not None and "saved model carries the precise statistics" in done
    assert lag_warning([{"a": {"drift_mean": None, "count": 0}}], precise_bn_ran=False) is None


def test_precise_bn_fields_are_bounded_and_named() -> None:
    assert JobSpec().precise_bn is None
    assert JobSpec(precise_bn={}).precise_bn.model_dump() == {"batches": 200, "every": "end"}
    for bad in ({"every": "step"}, {"batches": 0}, {"size": 3}):
        with pytest.raises(pydantic.ValidationError, match="precise_bn"):
            JobSpec(precise_bn=bad)


def test_the_record_log_puts_the_lag_warning_in_the_end_record() -> None:
    from service.engine.recorder import RecordLog

    def layers(step: int, drift: float) -> dict[str, Any]:
        return {"kind": "layers", "step": step, "epoch": 1, "layers": {"bn": {"drift_mean": drift, "count": 4096}}}

    lagging = RecordLog("lagging")
    lagging.push([layers(s, 0.01 if s < 6 else 0.2) for s in range(1, 11)])  # the last 5 steps lag
    end = lagging.finish("succeeded")
    assert end["warning"] is not None and "layer 'bn'" in end["warning"]
    assert any(r["kind"] == "log" and r["level"] == "warning" for r in lagging.poll(0))

    steady = RecordLog("steady")
    steady.push([layers(s, 0.2 if s < 6 else 0.01) for s in range(1, 11)])  # lagged early, caught up at the end
    assert steady.finish("succeeded")["warning"] is None


def test_the_store_and_the_api_carry_both_accuracies_and_the_warning(tmp_path: Path) -> None:
    from service.api.models import EpochPoint, JobPublic
    from service.status import JobStatus
    from service.store import JobStore

    store = JobStore(f"sqlite:///{tmp_path / 'syncbn.db'}")
    try:
        job_id = uuid.uuid4().hex
        store.create_job(job_id, JobSpec(precise_bn={"every": "epoch"}).model_dump(mode="json"))
        store.transition(job_id, JobStatus.RUNNING)
        epoch = {"kind": "epoch", "epoch": 1, "step": 5, "val_acc": 0.5, "val_acc_precise": 0.9, "seq": 1}
        end = {"kind": "end", "status": "succeeded", "final_val_acc": 0.5, "final_val_acc_precise": 0.9, "seq": 2}
        store.ingest(job_id, [epoch, {**end, "warning": "the BatchNorm running statistics lag the weights"}])
        summary = JobPublic.from_row(store.get_job(job_id)).summary
        assert (summary.final_val_acc, summary.final_val_acc_precise) == (0.5, 0.9)
        assert summary.warning == "the BatchNorm running statistics lag the weights"
        points = [EpochPoint.model_validate(p) for p in store.metrics(job_id)[1]]
        assert [(p.val_acc, p.val_acc_precise, p.val_loss_precise) for p in points] == [(0.5, 0.9, None)]
        status = [e.data for e in store.events(job_id) if e.kind == "status"][-1]
        assert status["final_val_acc_precise"] == 0.9 and status["warning"].startswith("the BatchNorm")
    finally:
        store.close()
