"""Mixed precision, channels_last and torch.compile in real 2-worker runs on a real local Ray (gloo, CPU).

Proves that a bf16 + channels_last digits job lands in the same accuracy band as the same job in fp32 (same seed,
run side by side), with float32 BatchNorm statistics in the saved model, and that a compiled model trains.
About a minute and a half on two shared cores (compilation is most of the compile test).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from service.engine.runner import JobRun, launch_run
from service.spec import JobSpec
from service.store.layer_codec import decode_vectors

pytestmark = pytest.mark.timeout(400)


def _end(run: JobRun, timeout: float = 300.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    assert run.wait(timeout=timeout), f"run {run.job_id} did not end in {timeout} s"
    records = run.poll(0)
    run.close()
    return records[-1], records


def test_bf16_channels_last_lands_in_the_fp32_accuracy_band(ray_cluster: dict, tmp_path: Path) -> None:
    common: dict[str, Any] = {
        "model": "small_resnet",
        "workers": 2,
        "epochs": 2,
        "batch_size": 32,
        "stats_every": 10,
        "seed": 3,
        "optimizer": {"name": "sgd", "lr": 0.1},
        "lr_schedule": {"name": "cosine"},
        "checkpoint_every": 0,
    }
    specs = {
        "fp32": JobSpec(**common),
        "bf16": JobSpec(**common, precision="bf16", channels_last=True),
    }
    runs = {key: launch_run(spec, f"prec-{key}-{uuid.uuid4().hex[:6]}", tmp_path / key) for key, spec in specs.items()}
    ends = {key: _end(run) for key, run in runs.items()}
    for key, (end, _) in ends.items():
        assert end["status"] == "succeeded", (key, end)
    acc = {key: end["final_val_acc"] for key, (end, _) in ends.items()}
    print(f"validation accuracy: fp32 {acc['fp32']:.4f}, bf16 + channels_last {acc['bf16']:.4f}")  # with -s
    assert acc["fp32"] >= 0.85 and acc["bf16"] >= 0.85, acc
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.05, acc

    # BatchNorm statistics stayed float32 under autocast, and the recorded global statistics are finite.
    state = torch.load(ends["bf16"][0]["model_path"], weights_only=True)
    running = {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}
    assert len(running) == 18 and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in running.values())
    layers = [r for r in ends["bf16"][1] if r["kind"] == "layers"]
    last = layers[-1] if layers else {"layers": {}}
    assert layers and all(
        layer["ranks_agree"] is True and all(v == v for v in decode_vectors(last["vectors"][name])["var"])
        for name, layer in last["layers"].items()
    )


def test_compiled_model_trains(ray_cluster: dict, tmp_path: Path) -> None:
    spec = JobSpec(
        model="cnn",
        workers=2,
        epochs=1,
        batch_size=16,
        steps_per_epoch=2,
        stats_every=1,  # every step records: one compiled variant (toggling recording would recompile)
        compile=True,
        checkpoint_every=0,
    )
    started = time.monotonic()
    end, records = _end(launch_run(spec, f"compile-{uuid.uuid4().hex[:6]}", tmp_path))
    assert end["status"] == "succeeded", (end, [r for r in records if r["kind"] == "log"][-5:])
    steps = [r for r in records if r["kind"] == "step"]
    assert [s["step"] for s in steps] == [1, 2] and all(s["train_loss"] > 0 for s in steps)
    assert [r["step"] for r in records if r["kind"] == "layers"] == [1, 2]  # statistics recorded under compile
    assert time.monotonic() - started < 300
