"""Divergence: a loss that explodes without ever becoming NaN stops the run with the verdict "diverged" and a
sentence, on a real short run on a real local Ray (an mlp on digits with SGD at lr 10, whose training loss goes
from 2.3 to above 1e4 within a few steps, all finite); and the tracker's rules, their bound and its checkpoint
state. About 30 s on two cores (one 2-worker run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from service.cli import main
from service.engine.convergence import DIVERGENCE_FACTOR, ConvergenceTracker

pytestmark = pytest.mark.timeout(240)


def test_the_tracker_judges_losses_by_the_first_steps() -> None:
    tracker = ConvergenceTracker(None)
    assert "validation loss after epoch 1 is nan" in (tracker.check_val_loss(math.nan, epoch=1) or "")
    assert tracker.check_train_loss(2.3, step=1, epoch=1, lr=0.1) is None
    assert tracker.first_loss == 2.3 and tracker.loss_bound() == pytest.approx(2300.0)
    assert tracker.check_train_loss(2000.0, step=2, epoch=1, lr=0.1) is None  # large, but under the bound
    reason = tracker.check_train_loss(2301.0, step=3, epoch=1, lr=0.5)
    assert reason is not None
    assert "the training loss reached 2301 at step 3 (epoch 1, learning rate 0.5)" in reason
    assert "more than 1000 times the first step's 2.3" in reason and "lower optimizer.lr" in reason
    assert "became nan at step 4" in (tracker.check_train_loss(math.nan, step=4, epoch=1, lr=0.5) or "")

    # A finite validation loss passes, however large: early running statistics lag the weights.
    assert tracker.check_val_loss(5e6, epoch=1) is None
    exploded = tracker.check_val_loss(math.inf, epoch=3)
    assert (
        exploded is not None and "validation loss after epoch 3 is inf" in exploded and "lower optimizer.lr" in exploded
    )

    # A first loss near zero does not make every later spike a divergence: the bound is at least the factor.
    tiny = ConvergenceTracker(None)
    tiny.check_train_loss(0.01, step=1, epoch=1, lr=0.1)
    assert tiny.loss_bound() == DIVERGENCE_FACTOR and tiny.check_train_loss(50.0, 2, 1, 0.1) is None

    # The first loss is part of the checkpointed state; checkpoints of older versions lack it.
    resumed = ConvergenceTracker(None)
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.first_loss == 2.3
    old = {k: v for k, v in tracker.state_dict().items() if k != "first_loss"}
    resumed.load_state_dict(old)
    assert resumed.first_loss is None


def test_a_run_whose_loss_explodes_ends_diverged(ray_cluster: dict, tmp_path: Path, capsys: Any) -> None:
    spec = {
        "model": "mlp",
        "workers": 2,
        "epochs": 2,
        "batch_size": 32,
        "steps_per_epoch": 20,
        "stats_every": 5,
        "checkpoint_every": 0,
        "optimizer": {"name": "sgd", "lr": 10.0, "momentum": 0.9},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    code = main(["train", str(tmp_path / "spec.json"), "--output", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1, summary
    assert summary["status"] == "failed" and summary["verdict"] == "diverged", summary
    assert "more than 1000 times the first step's" in summary["error"], summary
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if r["kind"] == "step"]
    assert all(math.isfinite(loss) for loss in losses), losses  # finite throughout: NaN alone never caught it
    assert not any(r["kind"] == "epoch" for r in records)  # it stopped within the first epoch
