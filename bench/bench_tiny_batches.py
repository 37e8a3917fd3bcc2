"""Tiny per-worker batches: synchronized vs local BatchNorm, through the product (launch_run on Ray Train).

4 workers, 1 sample per worker, scikit-learn's digits, 2 epochs, the same seeds for both variants. With local
BatchNorm each rank normalises a single sample by its own statistics (and trains running statistics from single
samples); with syncbn every layer sees the 4-sample global batch. The script prints, per seed and variant, the final
validation accuracy and loss, the final training loss, the training time (sum of epoch times) and the wall time
(launch to end record, including the worker group's start-up), then the means and the time ratio. It writes the
raw numbers to JSON and, when matplotlib is installed, the curves (training loss per step, validation loss and
accuracy per epoch) to a PNG.

    .venv/bin/python bench/bench_tiny_batches.py                   # seeds 0 1 2
    .venv/bin/python bench/bench_tiny_batches.py --seeds 0 --model cnn
    .venv/bin/python bench/bench_tiny_batches.py --replot          # redraw bench/results/tiny_batches.png

The embedded Ray gets as many logical CPUs as workers (the machine may have fewer cores: workers then share them,
as they would on a busy node).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.engine.cluster import ensure_ray  # noqa: E402
from service.engine.runner import launch_run  # noqa: E402
from service.spec import JobSpec  # noqa: E402


def run_job(spec: JobSpec, output_root: Path) -> dict[str, Any]:
    """Launch one job, follow it to its end record; returns its curves, end record and timings."""
    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    run = launch_run(spec, job_id, output_root / job_id)
    records: list[dict[str, Any]] = []
    while not records or records[-1]["kind"] != "end":
        new = run.poll(records[-1]["seq"] if records else 0)
        records.extend(new)
        if not new:
            time.sleep(0.2)
    wall = time.perf_counter() - started
    run.close()
    end = records[-1]
    if end["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {end['status']}: {end['error']}")
    epochs = [r for r in records if r["kind"] == "epoch"]
    return {
        "seed": spec.seed,
        "sync_bn": spec.sync_bn,
        "steps": [(r["step"], r["train_loss"]) for r in records if r["kind"] == "step"],
        "epochs": [(r["epoch"], r["val_acc"], r["val_loss"], r["train_loss"]) for r in epochs],
        "val_acc": end["final_val_acc"],
        "val_loss": epochs[-1]["val_loss"],
        "train_loss": end["final_train_loss"],
        "train_time_s": sum(r["epoch_time_s"] for r in epochs),
        "wall_time_s": wall,
    }


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(results: list[dict[str, Any]]) -> None:
    """Print per-run rows and the per-variant means side by side."""
    header = ("seed", "BatchNorm", "val acc", "val loss", "train loss", "train s", "wall s")
    print("{:>4} {:>9} {:>8} {:>9} {:>10} {:>8} {:>7}".format(*header))
    for r in results:
        variant = "sync" if r["sync_bn"] else "local"
        print(
            f"{r['seed']:>4} {variant:>9} {r['val_acc']:>8.4f} {r['val_loss']:>9.4f} {r['train_loss']:>10.4f} "
            f"{r['train_time_s']:>8.1f} {r['wall_time_s']:>7.1f}"
        )
    by = {flag: [r for r in results if r["sync_bn"] is flag] for flag in (True, False)}
    print()
    print(f"{'':>14} {'sync BatchNorm':>22} {'local BatchNorm':>22}")
    for key, label in (
        ("val_acc", "val accuracy"),
        ("val_loss", "val loss"),
        ("train_loss", "train loss"),
        ("train_time_s", "train time s"),
        ("wall_time_s", "wall time s"),
    ):
        sync = _mean_std([r[key] for r in by[True]])
        local = _mean_std([r[key] for r in by[False]])
        print(f"{label:>14} {sync:>22} {local:>22}")
    ratio = statistics.mean(r["train_time_s"] for r in by[True]) / statistics.mean(r["train_time_s"] for r in by[False])
    wall_ratio = statistics.mean(r["wall_time_s"] for r in by[True]) / statistics.mean(
        r["wall_time_s"] for r in by[False]
    )
    print(f"\nsync / local time: training {ratio:.2f}x, wall {wall_ratio:.2f}x")


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    """Training loss per step, validation loss and accuracy per epoch, sync vs local (means; dots: seeds)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_loss, ax_val_loss, ax_acc) = plt.subplots(1, 3, figsize=(15, 4))
    for flag, color, label in ((True, "tab:blue", "syncbn (global batch 4)"), (False, "tab:red", "local BN (batch 1)")):
        runs = [r for r in results if r["sync_bn"] is flag]
        steps = [s for s, _ in runs[0]["steps"]]
        losses = [statistics.mean(r["steps"][i][1] for r in runs) for i in range(len(steps))]
        ax_loss.plot(steps, losses, color=color, label=label)
        epochs = [e for e, *_ in runs[0]["epochs"]]
        for ax, column in ((ax_acc, 1), (ax_val_loss, 2)):
            means = [statistics.mean(r["epochs"][i][column] for r in runs) for i in range(len(epochs))]
            ax.plot(epochs, means, "o-", color=color, label=label)
            for r in runs:  # each seed
                ax.plot(epochs, [e[column] for e in r["epochs"]], ".", color=color, alpha=0.4)
    ax_loss.set(xlabel="step", ylabel="training loss (mean over reporting window)", yscale="log")
    epochs_run = sorted({e for r in results for e, *_ in r["epochs"]})
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", xticks=epochs_run)
    ax_val_loss.set(xlabel="epoch", ylabel="validation loss", xticks=epochs_run)
    seeds = sorted({r["seed"] for r in results})
    fig.suptitle(f"digits, 4 workers x 1 sample, seeds {seeds}: synchronized vs local BatchNorm")
    for ax in (ax_loss, ax_val_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="small_resnet")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--stats-every", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--replot", action="store_true", help="Only redraw the PNG from the saved JSON.")
    args = parser.parse_args()
    if args.replot:
        results = json.loads((args.out / "tiny_batches.json").read_text())
        report(results)
        return 0 if plot(results, args.out / "tiny_batches.png") else 1

    ensure_ray(None, num_cpus=max(os.cpu_count() or 1, args.workers), log_to_driver=False)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        # alternate which variant goes first, so machine-load drift does not favour one of them
        order = (True, False) if seed % 2 == 0 else (False, True)
        for sync in order:
            spec = JobSpec(
                name=f"tiny-batches-{'sync' if sync else 'local'}-{seed}",
                model=args.model,
                dataset={"kind": "digits"},
                workers=args.workers,
                batch_size=1,
                epochs=args.epochs,
                sync_bn=sync,
                seed=seed,
                stats_every=args.stats_every,
                checkpoint_every=0,
                optimizer={"name": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4},
            )
            with tempfile.TemporaryDirectory(prefix="bench-tiny-") as runs:  # models and checkpoints: not kept
                result = run_job(spec, Path(runs))
            print(
                f"seed {seed} {'sync ' if sync else 'local'}: val acc {result['val_acc']:.4f}, "
                f"train {result['train_time_s']:.1f} s, wall {result['wall_time_s']:.1f} s",
                flush=True,
            )
            results.append(result)
    print()
    report(results)
    (args.out / "tiny_batches.json").write_text(json.dumps(results, indent=1) + "\n")
    png = args.out / "tiny_batches.png"
    if plot(results, png):
        print(f"curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
