"""Streaming vs in-memory: samples/s of an image_folder and a Parquet job against the same images held in memory.

The digits are written as an image folder (png files, `<class>/<file>`), as one Parquet file of the same png bytes
and labels, and, decoded and resized the same way, as an npz file; the same job (model, 2 CPU workers, batch size,
seed) then runs on each, alternating, in one embedded Ray. The figure is the median of the step records'
samples/s (global samples over wall time, data waits included) after the first epoch (warm-up: worker start, the
first Ray Data execution); each job's wall time (start-up, the driver's label pass, every validation) is printed
beside it. Targets: the image folder keeps >= 80 % of the in-memory throughput, Parquet >= 80 % of the image
folder's, each ratio taken within a round.

    .venv/bin/python bench/bench_data.py                       # 32x32 RGB, small_resnet, 3 epochs, 2 rounds
    .venv/bin/python bench/bench_data.py --size 8 --channels 1 --model cnn --epochs 6
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.engine.cluster import ensure_ray  # noqa: E402
from service.engine.runner import launch_run  # noqa: E402
from service.spec import JobSpec  # noqa: E402
from tests.service.digits_files import write_digits_folder, write_digits_parquet  # noqa: E402

TARGET = 0.80


def _npz_like(folder: Path, target: Path, size: int, channels: int) -> None:
    """The image folder's files decoded, converted and resized as Ray Data's read_images does, into one npz."""
    from PIL import Image

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    xs, ys = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).glob("*.png")):
            with Image.open(path) as image:
                image = image.resize((size, size), resample=Image.BILINEAR).convert("L" if channels == 1 else "RGB")
                pixels = np.asarray(image, dtype=np.float32) / 255.0
            xs.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
            ys.append(label)
    np.savez(target, x=np.stack(xs), y=np.asarray(ys, dtype=np.int64))


def _run(spec: JobSpec, data_root: Path, out: Path) -> dict[str, Any]:
    """Run one job to its end; returns its step windows' samples/s and its epochs' samples/s after the first epoch,
    the seconds to its first step record, the end record and the wall time."""
    started = time.perf_counter()
    run = launch_run(spec, f"bench-data-{uuid.uuid4().hex[:8]}", out, data_root=data_root)
    records: list[dict[str, Any]] = []
    first_step_s = None
    while not records or records[-1]["kind"] != "end":
        records += run.poll(records[-1]["seq"] if records else 0)
        if first_step_s is None and any(r["kind"] == "step" for r in records):
            first_step_s = time.perf_counter() - started
        time.sleep(0.25)
    run.close()
    rates = [r["samples_per_s"] for r in records if r["kind"] == "step" and r["epoch"] >= 2]
    epochs = [r for r in records if r["kind"] == "epoch"]
    # An epoch's samples over its whole time: the stream's start, every data wait and the validation pass.
    epoch_rates = [
        (now["step"] - before["step"]) * spec.batch_size * spec.workers / now["epoch_time_s"]
        for before, now in itertools.pairwise(epochs)
    ]
    return {
        "rates": rates,
        "epoch_rates": epoch_rates,
        "first_step_s": first_step_s,
        "end": records[-1],
        "wall_s": time.perf_counter() - started,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="images are resized to size x size")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--model", default="small_resnet")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating (in-memory, image folder, Parquet) runs")
    args = parser.parse_args()

    ensure_ray(None, num_cpus=3, log_to_driver=False)  # 2 workers + 1 CPU a streamed job keeps for Ray Data
    common = {
        "model": args.model,
        "workers": 2,
        "epochs": args.epochs,
        "batch_size": 32,
        "stats_every": 5,
        "checkpoint_every": 0,
        "seed": 0,
    }
    image = {"image_size": [args.size] * 2, "channels": args.channels}
    specs = {
        "in_memory": JobSpec(**common, dataset={"kind": "npz", "path": "digits.npz"}),
        "image_folder": JobSpec(**common, dataset={"kind": "image_folder", "uri": "digits", **image}),
        "parquet": JobSpec(**common, dataset={"kind": "parquet", "uri": "digits_parquet/part-0.parquet", **image}),
    }
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in specs}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp) / "root"
        write_digits_folder(root / "digits")
        write_digits_parquet(root / "digits_parquet", files=1)
        _npz_like(root / "digits", root / "digits.npz", args.size, args.channels)
        for round_ in range(args.rounds):
            for name, spec in specs.items():
                result = _run(spec, root, Path(tmp) / f"{name}-{round_}")
                if result["end"]["status"] != "succeeded":
                    print(f"FAIL: the {name} job ended {result['end']['status']}: {result['end'].get('error')}")
                    return 1
                figure = {
                    "epoch": statistics.median(result["epoch_rates"]),
                    "step": statistics.median(result["rates"]),
                    "first_step_s": result["first_step_s"],
                    "wall_s": result["wall_s"],
                }
                figures[name].append(figure)
                print(
                    f"round {round_ + 1} {name:12s}: {figure['epoch']:7.1f} samples/s per epoch (median of "
                    f"{len(result['epoch_rates'])}), {figure['step']:7.1f} in the step windows, first step at "
                    f"{figure['first_step_s']:.0f} s, wall {figure['wall_s']:.0f} s, val acc "
                    f"{result['end']['final_val_acc']:.4f}",
                    flush=True,
                )
            last = {name: values[-1] for name, values in figures.items()}
            print(
                f"round {round_ + 1} ratios (samples/s per epoch): image_folder / in_memory "
                f"{last['image_folder']['epoch'] / last['in_memory']['epoch']:.2f}, parquet / image_folder "
                f"{last['parquet']['epoch'] / last['image_folder']['epoch']:.2f}; wall parquet / image_folder "
                f"{last['parquet']['wall_s'] / last['image_folder']['wall_s']:.2f}",
                flush=True,
            )

    def ratio(over: str, under: str, key: str = "epoch") -> float:
        """The median over the rounds of a same-round ratio."""
        return statistics.median(a[key] / b[key] for a, b in zip(figures[over], figures[under], strict=True))

    folder_ratio, parquet_ratio = ratio("image_folder", "in_memory"), ratio("parquet", "image_folder")
    print(
        json.dumps(
            {
                "model": args.model,
                "image": [args.channels, args.size, args.size],
                "epochs": args.epochs,
                **{
                    f"{name}_{key}": round(statistics.median(f[key] for f in runs), 1)
                    for name, runs in figures.items()
                    for key in ("epoch", "step", "first_step_s", "wall_s")
                },
                "image_folder_over_in_memory": round(folder_ratio, 3),
                "parquet_over_image_folder": round(parquet_ratio, 3),
                "parquet_over_image_folder_step": round(ratio("parquet", "image_folder", "step"), 3),
            }
        )
    )
    passed = folder_ratio >= TARGET and parquet_ratio >= TARGET
    print(
        f"samples/s per epoch: image_folder / in_memory = {folder_ratio:.2f}, parquet / image_folder = "
        f"{parquet_ratio:.2f} (median of the rounds' ratios; targets >= {TARGET:.2f}): {'PASS' if passed else 'FAIL'}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
