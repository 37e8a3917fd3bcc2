"""Precise BatchNorm on digits: validation accuracy with the running (EMA) statistics vs the exact ones, per epoch.

The case of issue 22: scikit-learn's digits upsampled to 16x16, the example plugin's two-conv model with global
average pooling (`tests/fixtures/model_plugin`: conv-BN-ReLU, strided conv-BN-ReLU, pool, linear), 2 workers of 32
samples, SGD (lr 0.1, momentum 0.9, weight decay 5e-4: the spec's defaults), constant learning rate vs cosine
decay, seeds 0 1 2. After every epoch the model is scored on the validation split twice: with its running
statistics (momentum 0.1), and after `syncbn.recalibrate` over one epoch of training batches (precise statistics);
the running statistics are put back before training goes on, as `precise_bn: {every: epoch}` does.

Two workers with synchronized BatchNorm normalise every layer with the statistics of their 64-sample global batch;
that is exactly (tests/syncbn) BatchNorm on the concatenated batch, which is what this script runs, in one process,
so the figures do not depend on the machine's load. It prints a table per schedule (mean over seeds, and the
worst epoch), writes the raw numbers to bench/results/precise_bn.json and, with matplotlib, the curves to
bench/results/precise_bn.png.

    .venv/bin/python bench/bench_precise_bn.py                 # 10 epochs, seeds 0 1 2
    .venv/bin/python bench/bench_precise_bn.py --epochs 4 --seeds 0
    .venv/bin/python bench/bench_precise_bn.py --replot
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests" / "fixtures" / "model_plugin"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from syncbn_example_models import tiny_convnet  # noqa: E402

import syncbn  # noqa: E402
from service.engine.data import load_data  # noqa: E402
from service.engine.running_lag import LAG_THRESHOLD, LAG_WINDOW, excess_drift  # noqa: E402
from service.spec import DatasetSpec  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORKERS, PER_WORKER = 2, 32
SCHEDULES = ("constant", "cosine")


def _digits_16(seed: int) -> tuple[torch.Tensor, ...]:
    data = load_data(DatasetSpec(kind="digits"), seed)
    up = [F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) for x in (data.x_train, data.x_val)]
    return up[0], data.y_train, up[1], data.y_val


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    accuracy = float((model(x).argmax(1) == y).double().mean())
    model.train()
    return accuracy


def run(schedule: str, seed: int, epochs: int) -> dict[str, Any]:
    """One training run; per epoch the validation accuracy with running and with precise statistics."""
    torch.manual_seed(seed)
    x_train, y_train, x_val, y_val = _digits_16(seed)
    model = tiny_convnet((1, 16, 16), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    batch = WORKERS * PER_WORKER
    steps_per_epoch = len(y_train) // batch
    total = steps_per_epoch * epochs
    ema, precise, step = [], [], 0
    drifts: list[float] = []  # every layer's excess drift at each of the last LAG_WINDOW steps, in layer order
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for epoch in range(epochs):
        order = torch.randperm(len(y_train))
        for i in range(steps_per_epoch):
            measure = epoch == epochs - 1 and i >= steps_per_epoch - LAG_WINDOW
            hooks = [layer.register_forward_pre_hook(_drift_hook(drifts)) for layer in layers] if measure else []
            lr = 0.1 if schedule == "constant" else 0.5 * 0.1 * (1 + math.cos(math.pi * step / total))
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = order[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(x_train[rows]), y_train[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            for hook in hooks:
                hook.remove()
        ema.append(_accuracy(model, x_val, y_val))
        saved = [b.clone() for b in model.buffers()]
        order = torch.randperm(len(y_train))
        syncbn.recalibrate(model, (x_train[order[i * batch : (i + 1) * batch]] for i in range(steps_per_epoch)))
        precise.append(_accuracy(model, x_val, y_val))
        with torch.no_grad():
            for b, value in zip(model.buffers(), saved, strict=True):
                b.copy_(value)
    # As the job's warning: each layer's mean over the last steps, then the worst layer.
    lag = max(statistics.mean(drifts[j :: len(layers)]) for j in range(len(layers)))
    return {"schedule": schedule, "seed": seed, "ema": ema, "precise": precise, "lag": lag}


def _drift_hook(out: list[float]) -> Any:
    """Record a layer's drift beyond batch noise, as the job's lag warning computes it from the recorded steps."""

    def hook(layer: nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach()
        mean = x.mean((0, 2, 3))
        drift = ((layer.running_mean - mean).abs() / torch.sqrt(layer.running_var + layer.eps)).mean()
        out.append(excess_drift({"drift_mean": float(drift), "count": x.numel() // x.shape[1]}) or 0.0)

    return hook


def _table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "schedule  | EMA mean | EMA worst epoch | precise mean | precise worst epoch | last epoch EMA -> precise"
        f" | lag at the end (warning above {LAG_THRESHOLD})"
    ]
    for schedule in SCHEDULES:
        mine = [r for r in runs if r["schedule"] == schedule]
        ema = [a for r in mine for a in r["ema"][1:]]  # epoch 1 is still warm-up noise for both
        precise = [a for r in mine for a in r["precise"][1:]]
        last_ema = statistics.mean(r["ema"][-1] for r in mine)
        last_precise = statistics.mean(r["precise"][-1] for r in mine)
        lines.append(
            f"{schedule:9} | {statistics.mean(ema):8.4f} | {min(ema):15.4f} | {statistics.mean(precise):12.4f} | "
            f"{min(precise):19.4f} | {last_ema:.4f} -> {last_precise:.4f}"
            " | " + ", ".join(f"{r['lag']:.3f}" for r in mine)
        )
    return "\n".join(lines)


def _plot(runs: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, schedule in zip(axes, SCHEDULES, strict=True):
        for r in (r for r in runs if r["schedule"] == schedule):
            epochs = range(1, len(r["ema"]) + 1)
            ax.plot(
                epochs, r["ema"], color="tab:orange", alpha=0.8, label="running (EMA) stats" if r["seed"] == 0 else None
            )
            ax.plot(
                epochs, r["precise"], color="tab:green", alpha=0.8, label="precise stats" if r["seed"] == 0 else None
            )
        ax.set_title(f"digits 16x16, 2 workers x {PER_WORKER}, lr {schedule}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (3 seeds)")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--replot", action="store_true", help="redraw the plot from the saved JSON")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / "precise_bn.json"
    if args.replot:
        runs = json.loads(raw.read_text())["runs"]
    else:
        torch.set_num_threads(1)
        started = time.perf_counter()
        runs = []
        for schedule in SCHEDULES:
            for seed in args.seeds:
                runs.append(run(schedule, seed, args.epochs))
                r = runs[-1]
                print(f"{schedule} seed {seed}: EMA {r['ema']}\n{'':>17}precise {r['precise']}\n{'':>17}lag {r['lag']}")
        elapsed = time.perf_counter() - started
        raw.write_text(json.dumps({"epochs": args.epochs, "seeds": args.seeds, "wall_s": elapsed, "runs": runs}))
        print(f"{len(runs)} runs in {elapsed:.0f} s")
    print(_table(runs))
    if _plot(runs, RESULTS / "precise_bn.png"):
        print(f"plot: {RESULTS / 'precise_bn.png'}")


if __name__ == "__main__":
    main()
