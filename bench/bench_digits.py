"""Digits with the small ResNet on 2 CPU workers, through the real command: `syncbn train SPEC --json`.

Target: at least 97% validation accuracy. The wall time is measured from launching the command to its summary being
printed (Ray start-up, worker start-up, training and saving included). Prints the summary and PASS/FAIL.

    .venv/bin/python bench/bench_digits.py              # synchronized BatchNorm (the default)
    .venv/bin/python bench/bench_digits.py --local-bn   # the same job with local BatchNorm, for comparison
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.97

SPEC = {
    "name": "bench-digits-small-resnet",
    "model": "small_resnet",
    "dataset": {"kind": "digits", "val_fraction": 0.2},
    "workers": 2,
    "cpus_per_worker": 1,
    "epochs": 10,
    "batch_size": 32,
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "lr_schedule": {"name": "cosine", "warmup_epochs": 1},
    "sync_bn": True,
    "seed": 0,
    "stats_every": 20,
    "checkpoint_every": 5,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-bn", action="store_true", help="sync_bn=false")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec = {**SPEC, "sync_bn": not args.local_bn, "seed": args.seed}
    syncbn = Path(sys.executable).with_name("syncbn")
    with tempfile.TemporaryDirectory(prefix="bench-digits-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # embedded Ray
        started = time.perf_counter()
        done = subprocess.run(
            [str(syncbn), "train", str(spec_path), "--output", str(Path(tmp) / "out"), "--json"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            check=False,
        )
        wall = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout, done.stderr, sep="\n")
        print(f"FAIL: syncbn train exited with {done.returncode}")
        return 1
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"job: small_resnet on digits, 2 CPU workers, sync_bn={spec['sync_bn']}, {spec['epochs']} epochs")
    print(f"status {summary['status']}, verdict {summary['verdict']}, epochs {summary['epochs_done']}")
    print(f"best val acc  {summary['best_val_acc']:.4f}")
    print(f"final val acc {summary['final_val_acc']:.4f}   (target >= {TARGET})")
    print(f"final train loss {summary['final_train_loss']:.4f}")
    print(f"wall time, command to summary: {wall:.1f} s (inside the command: {summary['wall_time_s']:.1f} s)")
    ok = summary["final_val_acc"] >= TARGET
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
